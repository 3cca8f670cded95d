"""`jaxllm` command line: parses arguments and calls library functions, nothing more.

User mistakes (`JaxllmError`) print one `error:` line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxllm.errors import JaxllmError


def cmd_info(args: argparse.Namespace) -> None:
    from jaxllm.info import describe, format_description

    desc = describe(args.config)
    print(json.dumps(desc, indent=2) if args.json else format_description(desc))


def cmd_import_hf(args: argparse.Namespace) -> None:
    from jaxllm.hf import import_hf

    cfg = import_hf(args.hf_dir, args.out_dir)
    print(f"imported {cfg.n_layers}-layer GPT-2 ({cfg.d_model} wide) from {args.hf_dir} into {args.out_dir}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from jaxllm.hf import export_hf

    cfg = export_hf(args.ckpt_dir, args.out_dir)
    print(f"exported {cfg.name} from {args.ckpt_dir} to {args.out_dir} (config.json + model.safetensors)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = command("info", cmd_info, "parameter count, FLOPs per token and shapes of a preset or config file")
    p.add_argument(
        "config", metavar="CONFIG_OR_PRESET", help="a preset name (mini, advanced, gpt2-124m) or a YAML path"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = command("import-hf", cmd_import_hf, "import a Hugging Face GPT-2 directory into a jaxllm params directory")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json + model.safetensors")
    p.add_argument("out_dir", metavar="OUT_DIR", help="jaxllm params directory to create")

    p = command("export-hf", cmd_export_hf, "export a jaxllm params directory as a Hugging Face GPT-2 directory")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="jaxllm params directory (from save_params / train)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (config.json + model.safetensors)")
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except JaxllmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
