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
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-k", "-2"], "--top-k must be between 0"),
        (["--top-k", "2147483648"], "--top-k must be between 0"),
        (["--max-new-tokens", "60"], "+ --max-new-tokens 60 = 62 tokens overflows the context length 48; use "
                                     "--max-new-tokens <= 46"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295"),
        (["--seed", str(2**32)], "--seed must be between 0 and 4294967295"),
        (["--seed", str(2**64)], "--seed must be between 0 and 4294967295"),
    ],
)
def test_bad_options_get_one_clear_error_line(checkpoint, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "--checkpoint", checkpoint[0], "--prompt", PROMPT, *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_python_api_errors_keep_the_parameter_names(checkpoint):
    from jaxllm.errors import InputError
    from jaxllm.generate_command import sample_checkpoint

    with pytest.raises(InputError, match=r"^top_k must be between 0"):
        sample_checkpoint(checkpoint[0], PROMPT, top_k=-1)
    with pytest.raises(InputError, match=r"^seed must be between 0 and 4294967295 \(32 bits\), got -1"):
        sample_checkpoint(checkpoint[0], PROMPT, seed=-1)


def test_the_largest_seed_is_used_whole(checkpoint, capsys):
    args = ["--checkpoint", checkpoint[0], "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "1"]
    top = run_cli(capsys, *args, "--seed", str(2**32 - 1)).out
    assert top == run_cli(capsys, *args, "--seed", str(2**32 - 1)).out != run_cli(capsys, *args, "--seed", "0").out


@pytest.mark.parametrize("flag", ["--prompt", "--chat", "--stop"])
def test_arguments_that_are_not_utf8_get_one_error_line_and_exit_2(checkpoint, flag):
    """Bytes that are not UTF-8 reach Python's argv as lone surrogates (surrogateescape): b"a\xff" -> "a\udcff"."""
    argv = [sys.executable, "-m", "jaxllm.cli", "generate", "--checkpoint", str(checkpoint[0]), flag, b"a\xff"]
    proc = subprocess.run(argv, capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.decode("utf-8", "replace")
    assert err.startswith(f"error: {flag} is not valid UTF-8 text") and err.count("\n") == 1, err


def test_a_tokenizer_that_is_not_the_checkpoints_own_is_refused_naming_both(checkpoint, tmp_path, capsys):
    from jaxllm.data.tokenizer import byte_tokenizer

    other = tmp_path / "bytes.json"
    byte_tokenizer().save(str(other))  # 257 tokens: fits the model's 300, but maps ids to other text
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "--checkpoint", checkpoint[0], "--tokenizer", other, "--prompt", PROMPT)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(other) in err and str(checkpoint[0] / "tokenizer.json") in err and "sha256" in err
    run_cli(capsys, "--checkpoint", checkpoint[1], "--tokenizer", other, "--prompt", "", "--max-new-tokens", "2")


def test_a_copy_of_the_checkpoints_own_tokenizer_is_accepted_also_when_the_model_pads_its_vocabulary(
    checkpoint, tokenizer_file, tmp_path
):
    """Real checkpoints (Qwen2) have more embedding rows than tokens: the same tokenizer, smaller, fits."""
    import shutil

    from jaxllm.text import load_codec

    padded = tmp_path / "padded"
    padded.mkdir()
    shutil.copy(tokenizer_file, padded / "tokenizer.json")
    copy = shutil.copy(tokenizer_file, tmp_path / "copy.json")
    assert load_codec(padded, 320, copy).encode(PROMPT) == load_codec(padded, 320).encode(PROMPT)
    assert load_codec(checkpoint[0], 300, copy).encode(PROMPT)
