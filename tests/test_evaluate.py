"""`jaxllm eval`: perplexity and bits per byte equal a direct computation from the model's logits, and
the same numbers summed from the server's `echo` log-probabilities."""

import json
import math

import jax
import numpy as np
import pytest

from jaxllm import forward
from jaxllm.cli import main
from jaxllm.evaluate import evaluate_checkpoint, windows
from jaxllm.serve import create_app
from jaxllm.text import load_codec

TEXT = "the cat sat on the mat. the dog sat on the log. " * 6


def direct_nll(cfg, params, ids: list[int], window: int) -> tuple[float, int]:
    """Each token after the first predicted from the (up to `window`) tokens before it in its window."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        logp = np.asarray(jax.nn.log_softmax(forward(cfg, params, np.array([chunk[:-1]], np.int32))[0]), np.float64)
        total -= sum(logp[i, t] for i, t in enumerate(chunk[1:]))
        count += len(chunk) - 1
    return total, count


def test_windows_overlap_by_one_and_cover_every_target():
    chunks = list(windows(np.arange(10), 4))
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]


@pytest.mark.parametrize("window", [8, 48])
def test_text_file_perplexity_and_bits_per_byte_match_the_logits(checkpoint, tmp_path, window):
    ck, _, cfg, params = checkpoint
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    result = evaluate_checkpoint(ck, files=[path], window=window, batch_size=3)
    ids = load_codec(ck, cfg.vocab_size).encode(TEXT)
    nll, count = direct_nll(cfg, params, ids, window)
    assert result.tokens == count == len(ids) - 1
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)


def test_cli_prints_one_json_line(checkpoint, tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    main(["eval", "--checkpoint", str(checkpoint[0]), str(path), "--window", "16"])
    row = json.loads(capsys.readouterr().out)
    assert row["tokens"] > 0 and row["perplexity"] == pytest.approx(math.exp(row["nll"] / row["tokens"]))


def test_dataset_val_split_is_scored(byte_dataset, tmp_path):
    from jaxllm import ModelConfig, init_params, save_params
    from jaxllm.data.meta import open_tokens, read_meta

    meta = read_meta(byte_dataset)
    cfg = ModelConfig.preset("mini").replace(vocab_size=meta.vocab_size, context_length=32)
    ck = save_params(tmp_path / "ck", cfg, init_params(cfg, 0))
    result = evaluate_checkpoint(ck, data=byte_dataset, window=32, batch_size=64)
    assert result.tokens == len(open_tokens(byte_dataset, "val", meta)) - 1
    assert result.bytes == meta.splits.val.bytes
    assert math.log(meta.vocab_size) * 0.9 < result.nll / result.tokens < math.log(meta.vocab_size) * 1.1  # untrained


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "either --data DATA"),
        (["missing.txt"], "missing.txt: no such file"),
        (["--window", "0", "X"], "--window must be between 1"),
    ],
)
def test_bad_input_is_one_error_line(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(checkpoint[0]), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def served_nll(engine, prompts: list) -> tuple[float, int]:
    """(total NLL, tokens scored) from `/v1/completions` with `echo, logprobs: 0, max_tokens: 0`: minus the
    sum of each prompt's token log-probabilities (its first token has none)."""
    body = {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = create_app(engine).test_client().post("/v1/completions", json=body)
    assert r.status_code == 200, r.get_json()
    logps = [lp for c in r.get_json()["choices"] for lp in c["logprobs"]["token_logprobs"]]
    assert logps.count(None) == len(prompts)
    scored = [lp for lp in logps if lp is not None]
    return -math.fsum(scored), len(scored)


@pytest.mark.parametrize("window", [None, 16])
def test_eval_equals_scoring_through_the_server(checkpoint, serve_engine, tmp_path, window):
    """The server's engine (serve_engine) has the checkpoint's params and tokenizer. One window: the text
    itself is the prompt; several: each window's token ids are one prompt of the same request."""
    ck, _, cfg, _ = checkpoint
    text = TEXT if window else "the cat sat on the mat. the dog sat on the log."
    path = tmp_path / "text.txt"
    path.write_text(text)
    result = evaluate_checkpoint(ck, files=[path], window=window, batch_size=4)
    if window is None:
        assert len(load_codec(ck, cfg.vocab_size).encode(text)) <= result.window == cfg.context_length  # one window
        prompts = [text]
    else:
        ids = np.array(load_codec(ck, cfg.vocab_size).encode(text))
        prompts = [w.tolist() for w in windows(ids, window)]
        assert len(prompts) > 2
    nll, tokens = served_nll(serve_engine, prompts)
    assert tokens == result.tokens
    assert nll == pytest.approx(result.nll, rel=1e-5)
    assert math.exp(nll / tokens) == pytest.approx(result.perplexity, rel=1e-5)
    assert nll / math.log(2) / len(text.encode()) == pytest.approx(result.bits_per_byte, rel=1e-5)
