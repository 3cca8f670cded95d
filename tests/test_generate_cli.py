"""`jaxllm generate` end to end: the tiny checkpoint of conftest.py (save_params) with its BPE tokenizer."""

import re
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from jaxllm import generate_text
from jaxllm.cli import main

PROMPT = "the cat"


def run_cli(capsys, *argv):
    main(["generate", *map(str, argv)])
    return capsys.readouterr()


def test_generate_command_streams_the_greedy_continuation_and_reports_tokens_per_second(checkpoint, tokenizer_file):
    full, _, cfg, params = checkpoint
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", "generate", "--checkpoint", full, "--prompt", PROMPT,
         "--max-new-tokens", "12", "--temperature", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = generate_text(cfg, params, Tokenizer.from_file(str(tokenizer_file)), PROMPT, max_new_tokens=12)[0]
    assert expected
    assert proc.stdout == PROMPT + expected + "\n"
    assert "tokens/s" in proc.stderr.splitlines()[-1]


def test_same_seed_same_text_different_seed_different_text(checkpoint, capsys):
    full = checkpoint[0]
    args = ["--checkpoint", full, "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "1.5"]
    first, again, other = (run_cli(capsys, *args, "--seed", s).out for s in (5, 5, 6))
    assert first == again
    assert first != other


def test_num_samples_prints_that_many_different_samples(checkpoint, capsys):
    out = run_cli(capsys, "--checkpoint", checkpoint[0], "--prompt", PROMPT, "--max-new-tokens", "12",
                  "--temperature", "1.5", "--num-samples", "3").out  # fmt: skip
    samples = out.split("--- sample ")[1:]
    assert [s.split(" ---")[0] for s in samples] == ["1", "2", "3"]
    assert all(PROMPT in s for s in samples)
    assert len(set(samples)) == 3


def test_stop_text_is_not_printed(checkpoint, capsys):
    full = checkpoint[0]
    args = ["--checkpoint", full, "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0"]
    text = run_cli(capsys, *args).out[len(PROMPT) : -1]
    stop = text[3:5]
    assert text.find(stop) == 3  # the first occurrence, after some text
    assert run_cli(capsys, *args, "--stop", stop).out == PROMPT + text[:3] + "\n"


def test_tokenizer_flag_serves_a_checkpoint_saved_without_one(checkpoint, tokenizer_file, capsys):
    full, bare, *_ = checkpoint
    args = ["--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0"]
    assert (
        run_cli(capsys, "--checkpoint", bare, "--tokenizer", tokenizer_file, *args).out
        == run_cli(capsys, "--checkpoint", full, *args).out
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], r"tokenizer.json not found: this checkpoint has no tokenizer; pass --tokenizer PATH"),
        (["--tokenizer", "nope.json"], r"tokenizer file not found: nope.json"),
    ],
)
def test_checkpoint_without_tokenizer_gets_one_clear_error_line(checkpoint, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "--checkpoint", checkpoint[1], "--prompt", PROMPT, *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-k", "-2"], "top_k must be between 0"),
        (["--top-k", "2147483648"], "top_k must be between 0"),
        (["--max-new-tokens", "60"], "overflows the context length 48"),
        (["--num-samples", "0"], "num_samples must be >= 1"),
    ],
)
def test_bad_options_get_one_clear_error_line(checkpoint, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "--checkpoint", checkpoint[0], "--prompt", PROMPT, *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
