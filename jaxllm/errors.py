"""User-facing errors: the CLI prints these as one clear line and exits non-zero (no traceback)."""


class JaxllmError(Exception):
    """A mistake in user input (a config, a file, a flag, a value), not a bug in jaxllm."""


class ConfigError(JaxllmError, ValueError):
    """A config file, preset name or config value is invalid."""


class InputError(JaxllmError, ValueError):
    """Invalid data given to a library call (token ids out of range, bad shapes, bad files)."""
