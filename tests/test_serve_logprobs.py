"""`logprobs` / `echo` on `/v1/completions` and `logprobs` / `top_logprobs` on chat, through Flask's test client.

The model is a tiny random Llama built with transformers in the test and imported with
`jaxllm.hf.import_hf`; its log-probabilities must equal transformers' float32 `log_softmax(logits)`.
"""

import json

import numpy as np
import pytest

from jaxllm import load_params
from jaxllm.hf import import_hf
from jaxllm.scoring import score_tokens
from jaxllm.serve import Engine, EngineSettings, create_app
from jaxllm.serve.logprobs import Scores, bytes_string, chat_content, legacy, text_offsets, token_bytes, token_string

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers (dev extra) builds the reference model")

TOL = 1e-4
PROMPT = "the cat sat on the mat."


@pytest.fixture(scope="module")
def llama(tmp_path_factory, serve_tokenizer):
    """(transformers model, jaxllm cfg, params): 2 layers, hidden 64, the conftest BPE's vocabulary."""
    vocab = serve_tokenizer.get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root / "hf")
    import_hf(root / "hf", root / "ckpt")
    cfg, params = load_params(root / "ckpt")
    return model, cfg, params


@pytest.fixture(scope="module")
def app(llama, chat_codec):
    _, cfg, params = llama
    settings = EngineSettings(slots=4, max_prefill_batch=2, max_score_batch=2, warmup=False)
    engine = Engine(cfg, params, chat_codec, settings).start()
    assert engine.wait_ready(300)
    yield create_app(engine)
    engine.stop()


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def hf_logprobs(model, ids) -> np.ndarray:
    """transformers' float32 log_softmax(logits) at each position of `ids`: (len(ids), V)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def post(client, body, path="/v1/completions"):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.json
    return r.json


def test_echo_with_max_tokens_0_scores_the_prompt_as_transformers_does(client, llama, serve_tokenizer):
    model, _, _ = llama
    ids = serve_tokenizer.encode(PROMPT).ids
    body = post(client, {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 1})
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = hf_logprobs(model, ids)
    want = np.array([ref[p - 1, ids[p]] for p in range(1, len(ids))])
    got = np.array(lp["token_logprobs"][1:])
    delta = float(np.max(np.abs(got - want)))
    print(f"echo prompt logprobs: max |delta| vs transformers {delta:.2e}")
    assert delta < TOL
    for p in range(1, len(ids)):  # logprobs=1: the most likely token at each position
        [(token, value)] = lp["top_logprobs"][p].items()
        best = int(np.argmax(ref[p - 1]))
        assert token == token_string(serve_tokenizer, best) and abs(value - ref[p - 1, best]) < TOL
    assert body["usage"]["completion_tokens"] == 0


def test_echo_with_max_tokens_1_adds_one_scored_token(client, llama, serve_tokenizer):
    """lm-eval-harness's `local-completions` loglikelihood request: echo, logprobs 1, max_tokens 1."""
    model, _, _ = llama
    ids = serve_tokenizer.encode(PROMPT).ids
    body = post(client, {"prompt": ids, "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0})
    lp = body["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and body["usage"]["completion_tokens"] == 1
    ref = hf_logprobs(model, ids)
    greedy = int(np.argmax(ref[-1]))
    assert lp["tokens"][-1] == token_string(serve_tokenizer, greedy)
    want = np.array([ref[p - 1, ids[p]] for p in range(1, len(ids))] + [ref[-1, greedy]])
    assert float(np.max(np.abs(np.array(lp["token_logprobs"][1:]) - want))) < TOL
    assert body["choices"][0]["text"] == PROMPT + serve_tokenizer.decode([greedy])


def test_top_logprobs_are_the_true_top_k(client, llama, serve_tokenizer):
    model, _, _ = llama
    ids = serve_tokenizer.encode(PROMPT).ids
    body = post(client, {"prompt": PROMPT, "max_tokens": 6, "logprobs": 5, "temperature": 0, "ignore_eos": True})
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 6
    # Re-derive the generated ids greedily from transformers and compare every position.
    seq = list(ids)
    deltas = []
    for p in range(6):
        ref = torch.from_numpy(hf_logprobs(model, seq)[-1])
        values, top_ids = torch.topk(ref, 5)
        got = lp["top_logprobs"][p]
        assert list(got) == [token_string(serve_tokenizer, int(i)) for i in top_ids]
        deltas.append(float(np.max(np.abs(np.array(list(got.values())) - values.numpy()))))
        assert lp["tokens"][p] == token_string(serve_tokenizer, int(top_ids[0]))
        deltas.append(abs(lp["token_logprobs"][p] - float(values[0])))
        seq.append(int(top_ids[0]))
    assert choice["text"] == serve_tokenizer.decode(seq[len(ids) :])
    print(f"top-5 logprobs: max |delta| vs torch.topk {max(deltas):.2e}")
    assert max(deltas) < TOL


def test_text_offset_points_at_each_token_in_the_text(client):
    body = post(client, {"prompt": ["the dog", "a cat and"], "echo": True, "max_tokens": 5, "logprobs": 0, "seed": 1})
    for choice in body["choices"]:
        lp, text = choice["logprobs"], choice["text"]
        offsets = lp["text_offset"]
        assert offsets == sorted(offsets) and offsets[0] == 0
        for i, token in enumerate(lp["tokens"]):
            if not token.startswith("bytes:"):
                assert text[offsets[i] : offsets[i] + len(token)] == token
        assert all(t == {} for t in lp["top_logprobs"][1:])  # logprobs 0: no alternatives


def test_without_logprobs_the_choice_has_null_and_echo_alone_prefixes_the_prompt(client):
    body = post(client, {"prompt": PROMPT, "echo": True, "max_tokens": 3, "seed": 2})
    assert body["choices"][0]["logprobs"] is None and body["choices"][0]["text"].startswith(PROMPT)


def test_several_rows_are_scored_together_and_agree_with_one_by_one(client):
    one = post(client, {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 2})["choices"][0]["logprobs"]
    many = post(client, {"prompt": [PROMPT, "the dog sat", PROMPT], "echo": True, "max_tokens": 0, "logprobs": 2})
    for i in (0, 2):
        got = many["choices"][i]["logprobs"]
        assert got["tokens"] == one["tokens"]
        assert np.allclose(np.array(got["token_logprobs"][1:]), np.array(one["token_logprobs"][1:]), atol=1e-5)


def test_rows_that_finish_together_are_scored_in_one_padded_call(client, monkeypatch):
    import jaxllm.serve.engine as engine_module

    shapes = []

    def counting(cfg, params, tokens_BT, *args):
        shapes.append(tokens_BT.shape)
        return score_tokens(cfg, params, tokens_BT, *args)

    monkeypatch.setattr(engine_module, "score_tokens", counting)
    post(client, {"prompt": [PROMPT, "the dog"], "echo": True, "max_tokens": 2, "logprobs": 1, "ignore_eos": True})
    assert shapes == [(2, 16)]  # both rows finish in one loop: one call, a (batch, length) bucket


def test_one_token_scoring_is_done_by_the_prefill_alone(client, llama, serve_tokenizer, monkeypatch):
    """echo with max_tokens 0 or 1 (lm-eval's loglikelihood): no second pass, the same values and top-k."""
    import jaxllm.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "score_tokens", lambda *a: pytest.fail("scored by a second pass"))
    model, _, _ = llama
    ids = serve_tokenizer.encode(PROMPT).ids
    for max_tokens in (0, 1):
        body = post(client, {"prompt": ids, "echo": True, "max_tokens": max_tokens, "logprobs": 5, "temperature": 0})
        lp = body["choices"][0]["logprobs"]
        seq = ids + [int(np.argmax(hf_logprobs(model, ids)[-1]))] * max_tokens
        ref = hf_logprobs(model, seq)
        assert lp["tokens"] == [token_string(serve_tokenizer, i) for i in seq]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for p in range(1, len(seq)):
            assert abs(lp["token_logprobs"][p] - ref[p - 1, seq[p]]) < TOL
            values, top_ids = torch.topk(torch.from_numpy(ref[p - 1]), 5)
            assert list(lp["top_logprobs"][p]) == [token_string(serve_tokenizer, int(i)) for i in top_ids]
            assert np.max(np.abs(np.array(list(lp["top_logprobs"][p].values())) - values.numpy())) < TOL


def test_chat_logprobs_have_openai_shape(client, llama, chat_codec):
    model, _, _ = llama
    messages = [{"role": "user", "content": "the cat"}]
    body = post(client, {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True,
                         "top_logprobs": 3, "ignore_eos": True}, "/v1/chat/completions")  # fmt: skip
    [choice] = body["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == 4
    joined = bytes(b for e in content for b in e["bytes"])
    assert joined.decode("utf-8", "replace") == choice["message"]["content"]
    ids = chat_codec.encode_chat(messages)
    seq = list(ids)
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes_string(bytes(e["bytes"])) == e["token"]
        assert len(e["top_logprobs"]) == 3 and all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
        ref = hf_logprobs(model, seq)[-1]
        best = int(np.argmax(ref))
        assert abs(e["logprob"] - ref[best]) < TOL and e["top_logprobs"][0]["logprob"] == e["logprob"]
        seq.append(best)
    no = post(client, {"messages": messages, "max_tokens": 2, "logprobs": True}, "/v1/chat/completions")
    assert all(e["top_logprobs"] == [] for e in no["choices"][0]["logprobs"]["content"])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"logprobs": "x"}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"echo": "yes"}, "echo"),
        ("/v1/completions", {"logprobs": 1, "stream": True}, "logprobs"),
        ("/v1/completions", {"echo": True, "stream": True}, "echo"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "stream": True}, "logprobs"),
    ],
)
def test_bad_values_get_400_naming_the_field(client, path, body, param):
    key = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = client.post(path, json={**key, **body})
    assert r.status_code == 400, r.json
    assert r.json["error"]["param"] == param, r.json


def test_metrics_count_scored_tokens_and_requests(app, serve_tokenizer):
    client = app.test_client()
    metrics = app.extensions["jaxllm"]["metrics"]
    before = metrics.scored_tokens.labels("prompt")._value.get(), metrics.scoring_requests._value.get()
    post(client, {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 1})
    n = len(serve_tokenizer.encode(PROMPT).ids)
    assert metrics.scored_tokens.labels("prompt")._value.get() == before[0] + n
    assert metrics.scoring_requests._value.get() == before[1] + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert 'jaxllm_scored_tokens_total{part="prompt"}' in text and "jaxllm_scoring_requests_total" in text


# Token strings (no model) ------------------------------------------------------------------------


def test_a_partial_utf8_token_is_shown_as_bytes():
    from jaxllm.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()  # id b is byte b
    assert token_string(tok, ord("a")) == "a" and token_string(tok, ord(" ")) == " "
    assert token_bytes(tok, 0xE2) == b"\xe2"
    assert token_string(tok, 0xE2) == "bytes:\\xe2" and token_string(tok, 0x82) == "bytes:\\x82"
    assert bytes_string("€".encode()[:2]) == "bytes:\\xe2\\x82" and bytes_string("€".encode()) == "€"
    # "é€" as bytes: the offsets of the pieces of a character point at that character.
    pieces = [b"a", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"b"]
    assert text_offsets(pieces) == [0, 1, 1, 2, 2, 3]
    scores = Scores([0xE2, ord("a")], [None, -1.5], [None, [(ord("b"), -0.5), (0xE2, -2.0)]])
    lp = legacy(scores, tok, 2)
    assert lp["tokens"] == ["bytes:\\xe2", "a"] and lp["top_logprobs"] == [None, {"b": -0.5, "bytes:\\xe2": -2.0}]
    chat = chat_content(scores, tok, 1)["content"]
    assert chat[0]["bytes"] == [0xE2] and chat[1]["top_logprobs"] == [{"token": "b", "logprob": -0.5, "bytes": [98]}]
    assert json.dumps(lp)  # JSON-ready
