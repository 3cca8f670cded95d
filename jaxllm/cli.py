"""`jaxllm` command line: parses arguments and calls library functions, nothing more.

User mistakes (`JaxllmError`) print one `error:` line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxllm.config import INFERENCE_DTYPES
from jaxllm.errors import InputError, JaxllmError
from jaxllm.interrupt import Interrupted


def cmd_info(args: argparse.Namespace) -> None:
    from jaxllm.info import describe, format_description

    desc = describe(args.config)
    print(json.dumps(desc, indent=2) if args.json else format_description(desc))


def cmd_import_hf(args: argparse.Namespace) -> None:
    from jaxllm.hf import import_hf, model_type_of

    cfg = import_hf(args.hf_dir, args.out_dir)
    print(
        f"imported {model_type_of(args.out_dir, cfg)} ({cfg.n_layers} layers, {cfg.d_model} wide) "
        f"from {args.hf_dir} into {args.out_dir}"
    )


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from jaxllm.gguf import import_gguf

    cfg = import_gguf(args.file, args.out_dir)
    print(f"imported {cfg.n_layers}-layer llama ({cfg.d_model} wide) from {args.file} into {args.out_dir}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from jaxllm.hf import export_hf, model_type_of

    cfg = export_hf(args.ckpt_dir, args.out_dir)
    print(
        f"exported {cfg.name} as {model_type_of(args.ckpt_dir, cfg)} from {args.ckpt_dir} to {args.out_dir} "
        "(config.json + model.safetensors)"
    )


def cmd_export_torch(args: argparse.Namespace) -> None:
    from jaxllm.torch_io import export_torch

    cfg = export_torch(args.ckpt_dir, args.out)
    print(f"exported {cfg.name} from {args.ckpt_dir} to {args.out} (torch_ref state dict, safetensors)")


def cmd_import_torch(args: argparse.Namespace) -> None:
    from jaxllm.torch_io import import_torch

    cfg = import_torch(args.file, args.out_dir, args.config)
    print(f"imported {cfg.name} from {args.file} into {args.out_dir}")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from jaxllm.data.preprocess import preprocess

    chat_only = {"--context": args.context, "--overlong": args.overlong, "--strict": args.strict or None}
    if args.format == "chat":
        from jaxllm.data.chat import preprocess_chat

        if args.vocab_size is not None:
            raise InputError("--vocab-size does not apply to --format chat (the checkpoint's tokenizer is used)")
        result = preprocess_chat(args.inputs, args.out, tokenizer=args.tokenizer, context=args.context,
                                 overlong=args.overlong or "drop", strict=args.strict, val_fraction=args.val_fraction,
                                 seed=args.seed, overwrite=args.overwrite)  # fmt: skip
        print(result.summary())
        return
    for flag, value in chat_only.items():
        if value is not None:
            raise InputError(f"{flag} applies to --format chat only")
    result = preprocess(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        workers=args.workers,
        seed=args.seed,
        glob=args.glob,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
    )
    print(result.summary())


def cmd_train(args: argparse.Namespace) -> None:
    from jaxllm import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxllm.base_checkpoint import is_params_dir
    from jaxllm.loop import load_config
    from jaxllm.train import train

    if args.init is not None and not is_params_dir(args.init):
        raise InputError(f"--init {args.init}: not a jaxllm params directory (needs config.yaml and params/)")
    config = load_config(args)
    out = args.out or f"runs/{config.model.name}"
    result = train(config, out, resume=args.resume, progress=not args.no_progress, handle_signals=True,
                   init=args.init)  # fmt: skip
    print(f"trained steps {result.start_step + 1}-{result.end_step}, last loss {result.last_loss:.4f}; "
          f"params in {result.final_dir}")


# `jaxllm generate`'s flags by the names its errors (from the Python API) use for them.
GENERATE_FLAGS = {"max_new_tokens": "--max-new-tokens", "top_k": "--top-k", "top_p": "--top-p",
                  "num_samples": "--num-samples", "temperature": "--temperature", "seed": "--seed"}  # fmt: skip


def flag_names(message: str, flags: dict[str, str]) -> str:
    """`message` with parameter names replaced by the flags the user typed (top_k -> --top-k)."""
    pattern = r"(?<![\w-])(" + "|".join(map(re.escape, flags)) + r")(?!\w)"
    return re.sub(pattern, lambda m: flags[m.group(1)], message)


def check_text_args(**texts: str | list[str] | None) -> None:
    """Arguments that are not text (bytes that are not UTF-8 reach Python as lone surrogates): `InputError`."""
    for name, value in texts.items():
        for text in [value] if isinstance(value, str) else value or []:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} is not valid UTF-8 text: {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> None:
    from jaxllm.generate_command import sample_checkpoint

    check_text_args(prompt=args.prompt, chat=args.chat, stop=args.stop)
    try:
        stats = sample_checkpoint(
            args.checkpoint,
            args.chat if args.chat is not None else args.prompt,
            chat=args.chat is not None,
            ignore_eos=args.ignore_eos,
            tokenizer_path=args.tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            num_samples=args.num_samples,
            stop=args.stop,
            mesh_overrides=args.overrides,
            dtype=args.dtype,
            profile=args.profile,
        )
    except InputError as err:
        raise InputError(flag_names(str(err), GENERATE_FLAGS)) from None
    print(stats.summary(), file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    from jaxllm.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, files=args.files, window=args.window,
                                 batch_size=args.batch_size, progress=sys.stderr.isatty())  # fmt: skip
    print(json.dumps(result.to_dict()))


def cmd_serve(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:  # before importing JAX and loading the model
        raise InputError(f"--port must be between 0 and 65535 (0: any free port), got {args.port}")
    check_text_args(host=args.host, allow_host=args.allow_host, cors_origin=args.cors_origin)
    from jaxllm.serve import EngineSettings, serve

    settings = EngineSettings(
        slots=args.slots,
        max_queue=args.max_queue,
        steps_per_call=args.steps_per_call,
        max_prefill_batch=args.max_prefill_batch,
        timeout_s=args.timeout,
        max_context=args.max_context,
    )
    serve(args.checkpoint, args.host, args.port, settings=settings, tokenizer_path=args.tokenizer,
          dtype=args.dtype, model_name=args.model_name, threads=args.threads, connection_limit=args.connection_limit,
          channel_timeout_s=args.channel_timeout, allowed_hosts=args.allow_host,
          public_metrics=args.public_metrics, cors_origins=args.cors_origin,
          mesh_overrides=args.overrides)  # fmt: skip


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=INFERENCE_DTYPES,
                   help="weights and computation in this dtype: sets model.param_dtype and model.dtype; "
                   "bfloat16-weights: bfloat16 weights, float32 computation (default: the checkpoint's)")  # fmt: skip


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

    p = command("import-hf", cmd_import_hf, "import a Hugging Face directory (gpt2, llama, qwen2, mistral) as params")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json + model.safetensors")
    p.add_argument("out_dir", metavar="OUT_DIR", help="jaxllm params directory to create")

    p = command("import-gguf", cmd_import_gguf, "import a llama-architecture GGUF file into a jaxllm params directory")
    p.add_argument("file", metavar="FILE", help="a .gguf file (llama.cpp format; F32/F16/BF16 or quantized weights)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="jaxllm params directory to create")

    p = command("export-hf", cmd_export_hf, "export a jaxllm params directory as a Hugging Face directory")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="jaxllm params directory (from save_params / train)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (config.json + model.safetensors)")

    p = command("export-torch", cmd_export_torch, "export a jaxllm params directory as a torch_ref state dict")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="jaxllm params directory (from save_params / train)")
    p.add_argument("out", metavar="OUT.safetensors", help="file to create (torch_ref names, float32)")

    p = command("import-torch", cmd_import_torch, "import a torch_ref state dict into a jaxllm params directory")
    p.add_argument("file", metavar="IN.safetensors", help="torch_ref state dict (e.g. RUN/final/model.safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="jaxllm params directory to create")
    p.add_argument("--config", help="preset or YAML whose model section fits the weights (default: the file's own)")

    p = command("preprocess", cmd_preprocess, "tokenize text into DATA_DIR: token files, tokenizer, meta.json")
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="text files, directories (recursive), glob patterns or - for stdin; "
        "none: the Python standard library's .py files (the default corpus)",
    )
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="dataset directory to write")
    p.add_argument(
        "--tokenizer",
        default="bpe",
        metavar="bpe|byte|PATH|CK",
        help="train a byte-level BPE (default), plain bytes, an existing tokenizer.json, or a params "
        "directory's own (to fine-tune it: `jaxllm train --init CK`)",
    )
    p.add_argument("--vocab-size", type=int, metavar="N", help="BPE vocabulary size (default 1000, as mini)")
    p.add_argument(
        "--val-fraction", type=float, default=0.05, metavar="F", help="share of documents held out (default 0.05)"
    )
    p.add_argument("--workers", type=int, metavar="W", help="encoding threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--glob", default="*", metavar="PATTERN", help="names of files to take in directories (default *)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in DATA_DIR")
    p.add_argument("--format", choices=["text", "chat"], default="text",
                   help="text: each INPUT a document (default); chat: JSONL files of {\"messages\": [...]}, "
                   "rendered with --tokenizer CK's chat template, loss on assistant tokens only, packed")  # fmt: skip
    p.add_argument("--context", type=int, metavar="N",
                   help="chat: pack into windows of N + 1 tokens (default: the checkpoint's context_length)")
    p.add_argument("--overlong", choices=["truncate", "drop"],
                   help="chat: an example longer than a window is truncated or dropped (default drop); counted")
    p.add_argument("--strict", action="store_true", help="chat: a malformed line is an error (default: a warning)")
    p = command("train", cmd_train, "train a model on a preprocessed dataset (sharded over all devices)")
    from jaxllm.loop import add_overrides, add_run_flags  # the flags torch_ref's training commands share

    add_run_flags(p, sections="model/data/train/mesh", default_out="runs/MODEL_NAME")
    p.add_argument("--init", metavar="CK", help="start from this params directory (import-hf/import-gguf/train): "
                   "its model section, weights, tokenizer and chat template")  # fmt: skip
    p.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id (or JAX_PROCESS_ID)")
    add_overrides(p)

    p = command("generate", cmd_generate, "sample text from a checkpoint, streaming it; prints tokens/s at the end")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="params directory (config.yaml, params/)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", default="", help="text to continue (default: empty, start from BOS/end-of-text)")
    what.add_argument("--chat", metavar="MESSAGE", help="a user message, sent through the checkpoint's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end tokens (fixed lengths)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json to use (default: DIR/tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="default: what the context leaves, at most 256")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same text (default 0)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples of the prompt (default 1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    add_mesh_overrides(p)
    add_dtype_flag(p)
    p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of the generation to DIR (xprof)")

    p = command("eval", cmd_eval, "perplexity and bits per byte on a dataset's val split or on text files (JSON)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="params directory (config.yaml, params/)")
    p.add_argument("--data", metavar="DATA", help="a preprocessed dataset: score its val split")
    p.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files to score (instead of --data)")
    p.add_argument("--window", type=int, metavar="W", help="tokens of context per window (default min(context, 1024))")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per call (default 8)")

    p = command("serve", cmd_serve, "serve a checkpoint over an OpenAI-compatible HTTP API (see docs/serve.md)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="params directory (config.yaml, params/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json to use (default: DIR/tokenizer.json)")
    p.add_argument("--model-name", metavar="ID", help="model id in the API (default: the config's name)")
    add_dtype_flag(p)
    p.add_argument("--slots", type=int, default=16, metavar="N", help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting requests before 429 (default 64)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-request time limit (default 120)")
    p.add_argument("--steps-per-call", type=int, default=4, metavar="K", help="decode steps between joins (default 4)")
    p.add_argument("--max-prefill-batch", type=int, default=4, metavar="N", help="prompts per prefill (default 4)")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="positions per slot, prompt + completion (default: the model's context)")  # fmt: skip
    p.add_argument("--threads", type=int, metavar="N", help="HTTP threads (default: slots + queue + 8)")
    p.add_argument("--connection-limit", type=int, default=1000, metavar="N",
                   help="open connections, idle ones included, before new ones wait (default 1000)")  # fmt: skip
    p.add_argument("--channel-timeout", type=int, default=30, metavar="S",
                   help="close a connection idle this long, in seconds (default 30)")  # fmt: skip
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; * for any); "
                   "loopback names and --host are always allowed")  # fmt: skip
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (when JAXLLM_API_KEY is set)")  # fmt: skip
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://chat.example.com) call the API from a browser "
                   "(repeatable; CORS)")  # fmt: skip
    add_mesh_overrides(p)
    return parser


def add_mesh_overrides(p: argparse.ArgumentParser) -> None:
    """generate's and serve's trailing `mesh.*=` overrides, as train takes them (docs/launch.md)."""
    p.add_argument("overrides", nargs="*", metavar="mesh.KEY=VALUE",
                   help="shard the model and its KV cache over devices, e.g. mesh.tensor=2 (docs/launch.md)")


# Commands that run XLA on the CPU: glibc's malloc is set before their first JAX work (jaxllm/host_memory.py).
XLA_COMMANDS = {"train", "generate", "serve", "eval"}


def main(argv: Sequence[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    if args.command == "train":  # SIGINT/SIGTERM: exit 130/143 at any moment, never a crash in JAX's start-up
        from jaxllm.interrupt import exit_on_signal

        exit_on_signal()
    if args.command in XLA_COMMANDS:
        from jaxllm.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
        if argv is None:  # from the command line (not a caller's process): compiled programs kept on disk
            from jaxllm.compile_cache import enable

            enable()
    try:
        args.func(args)
    except JaxllmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stopped:  # training checkpointed its last step on a signal
        print(stopped, file=sys.stderr, flush=True)
        sys.exit(stopped.exit_status)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
