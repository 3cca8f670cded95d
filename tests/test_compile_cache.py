"""The persistent compilation cache of jaxllm's commands (jaxllm/compile_cache.py): where it lives, that a
command run from the shell fills it and reads it back, and that it stays off when asked."""

import os
import subprocess
import sys

import jax

from jaxllm import compile_cache, cpu_kernels
from jaxllm.cli import main

PROMPT = "the cat"


def test_folder_follows_the_switch_and_the_xdg_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compile_cache.SWITCH, raising=False)
    key = f"kernels-{cpu_kernels.build_key()}"
    assert compile_cache.folder() == tmp_path / "xdg" / "jaxllm" / "xla" / key
    monkeypatch.setenv(compile_cache.SWITCH, str(tmp_path / "mine"))
    assert compile_cache.folder() == tmp_path / "mine" / key
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv(compile_cache.SWITCH, off)
        assert compile_cache.folder() is None


def _generate(checkpoint_dir, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", "generate", "--checkpoint", checkpoint_dir, "--prompt", PROMPT,
         "--max-new-tokens", "6", "--temperature", "0"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_a_command_fills_the_cache_and_the_next_run_reads_it(checkpoint, tmp_path, capsys):
    env = {
        **os.environ,
        compile_cache.SWITCH: str(tmp_path / "cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    first = _generate(checkpoint[0], env)
    assert first.returncode == 0, first.stderr
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder.name == f"kernels-{cpu_kernels.build_key()}"
    entries = {p.name.split("-")[0] for p in folder.glob("*-cache")}
    assert {"jit_prefill", "jit_decode"} <= entries, sorted(folder.iterdir())
    read_at = {p: p.read_bytes() for p in folder.glob("jit_*-atime")}  # JAX stamps an entry when it reads it
    assert len(read_at) == len(list(folder.glob("jit_*-cache")))
    again = _generate(checkpoint[0], env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout  # the same text from the programs read back
    assert all(p.read_bytes() != stamp for p, stamp in read_at.items()), "the programs were not read back"

    off = _generate(checkpoint[0], {**env, compile_cache.SWITCH: "off"})
    assert off.returncode == 0 and off.stdout == first.stdout
    assert list((tmp_path / "cache").iterdir()) == [folder]  # nothing new

    # A caller's process (main with argv) keeps its own choice: no cache is turned on for it.
    main(["generate", "--checkpoint", str(checkpoint[0]), "--prompt", PROMPT, "--max-new-tokens", "2"])
    capsys.readouterr()
    assert jax.config.jax_compilation_cache_dir is None
