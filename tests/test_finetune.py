"""Fine-tuning: starting from a params directory (`--init CK`), chat SFT data (loss masks, packing), the
token-weighted loss, and parity with torch_ref — on a tiny random Llama with a ChatML tokenizer.

Tolerances: see parity_helpers.py.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ConfigError, InputError, ModelConfig, init_params, save_params
from jaxllm.base_checkpoint import config_from_checkpoint
from jaxllm.cli import main as jaxllm_main
from jaxllm.config import Config, TrainConfig
from jaxllm.data.chat import Example, encode_example, pack, preprocess_chat
from jaxllm.data.meta import open_split, read_meta
from jaxllm.data.preprocess import preprocess
from jaxllm.metrics import read_metrics
from jaxllm.model import forward
from jaxllm.optim import make_optimizer
from jaxllm.parity import step_losses
from jaxllm.text import load_codec
from jaxllm.train_step import init_state, loss_fn, train_step
from torch_ref import train as torch_train

from parity_helpers import LOSS_RTOL

# SmolLM2-Instruct's chat template (ChatML with a default system message), as its tokenizer_config.json has it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "log", "while", "one",
         "small", "model", "wrote", "short", "text"]  # fmt: skip
QUIET = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0", "train.warmup_steps=2",
         "train.learning_rate=1e-2"]  # fmt: skip
ONE_DEVICE = ["mesh.data=1"]


def conversation(i: int) -> dict:
    rng = np.random.default_rng(i)
    words = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": words(rng.integers(2, 6))},
            {"role": "assistant", "content": words(rng.integers(2, 9))}]  # fmt: skip
    if i % 3 == 0:
        msgs += [{"role": "user", "content": words(3)}, {"role": "assistant", "content": words(rng.integers(1, 5))}]
    return {"messages": msgs}


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A params directory as import-hf writes it: a tiny random Llama, tokenizer.json with ChatML's special
    tokens, tokenizer_config.json with SmolLM2's template, generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, initial_alphabet=alphabet,
                                  show_progress=False)
    texts = [SMOLLM2_TEMPLATE, *(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS)))]
    tok.train_from_iterator(texts, trainer)
    cfg = ModelConfig(name="tiny-chat", family="llama", vocab_size=tok.get_vocab_size(), context_length=96,
                      d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, tie_embeddings=True)  # fmt: skip
    ck = save_params(tmp_path_factory.mktemp("ck") / "tiny-chat", cfg, init_params(cfg, 7))
    tok.save(str(ck / "tokenizer.json"))
    tok_cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": SMOLLM2_TEMPLATE}
    (ck / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (ck / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return ck


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(160)))
    return path


@pytest.fixture(scope="module")
def chat_data(chat_ckpt, chat_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("chatdata") / "data"
    preprocess_chat([str(chat_file)], out, tokenizer=str(chat_ckpt), val_fraction=0.1)
    return out


def codec_of(ck):
    return load_codec(ck, ModelConfig.from_yaml(ck / "config.yaml").vocab_size)


# Chat data ------------------------------------------------------------------------------------------
def test_mask_covers_exactly_each_assistant_turns_content_and_end_token(chat_ckpt):
    codec = codec_of(chat_ckpt)
    messages = [
        {"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on a mat."},
        {"role": "user", "content": "and the dog"}, {"role": "assistant", "content": "ran to the log"},
    ]  # fmt: skip
    example = encode_example(codec, messages)
    enc = lambda text: codec.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    im_end = codec.token_to_id("<|im_end|>")
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    # By hand: (text, in the loss?) pieces of the rendered conversation.
    pieces = [
        (system + "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n", 0),
        ("sat on a mat.", 1), ("<|im_end|>", 1),
        ("\n<|im_start|>user\nand the dog<|im_end|>\n<|im_start|>assistant\n", 0),
        ("ran to the log", 1), ("<|im_end|>", 1), ("\n", 0),
    ]  # fmt: skip
    tokens = [t for text, _ in pieces for t in enc(text)]
    mask = [m for text, m in pieces for _ in enc(text)]
    assert example.tokens.tolist() == tokens == codec.encode_chat(messages, add_generation_prompt=False)
    assert example.loss_mask.tolist() == mask
    kept = example.tokens[example.loss_mask == 1]
    assert (kept == im_end).sum() == 2 and codec.decode(kept[kept != im_end]) == "sat on a mat.ran to the log"


def test_packing_keeps_whole_examples_in_order_and_masks_padding():
    rng = np.random.default_rng(0)
    width = 17
    examples = []
    for _ in range(60):
        n = int(rng.integers(1, width + 1))
        examples.append(Example(rng.integers(3, 100, n), rng.integers(0, 2, n).astype(np.uint8)))
    packed = pack(examples, width, pad_id=0)
    tokens, mask, segs = (packed[k].reshape(-1, width) for k in ("tokens", "loss_mask", "segment_ids"))
    found = []
    for w in range(len(tokens)):
        ids = segs[w]
        n_used = int((ids > 0).sum())
        assert (ids[:n_used] > 0).all() and (ids[n_used:] == 0).all(), "padding only at the end of a window"
        assert (mask[w][n_used:] == 0).all() and (tokens[w][n_used:] == 0).all()
        assert (np.diff(ids[:n_used]) >= 0).all() and ids[0] == 1
        for s in range(1, int(ids.max()) + 1):
            found.append((tokens[w][ids == s], mask[w][ids == s]))
        if w + 1 < len(tokens):  # greedy: the next window's first example did not fit here
            assert n_used + int((segs[w + 1] == 1).sum()) > width
    assert len(found) == len(examples)
    for (t, m), ex in zip(found, examples, strict=True):  # never split, never reordered
        assert t.tolist() == ex.tokens.tolist() and m.tolist() == ex.loss_mask.tolist()


def test_chat_dataset_records_its_packing_and_the_loader_yields_masked_windows(chat_data, chat_ckpt):
    from jaxllm.data.loader import make_loader

    meta = read_meta(chat_data)
    p = meta.packing
    assert p is not None and p.context == 96 and p.examples == 160 and p.malformed == p.dropped == 0
    assert meta.splits.train.documents + meta.splits.val.documents == 160
    arrays = open_split(chat_data, "train", meta)
    assert int(arrays["loss_mask"].sum()) == p.loss_tokens["train"] > 0
    assert len(arrays["tokens"]) == 97 * p.windows["train"]
    assert (chat_data / "tokenizer.json").read_bytes() == (chat_ckpt / "tokenizer.json").read_bytes()
    loader = make_loader(chat_data, "train", 96, 4, seed=0, process_index=0, process_count=1)
    batch = next(loader)
    assert sorted(batch) == ["loss_mask", "tokens"]  # plain packing: examples see each other
    assert all(v.shape == (4, 97) and v.dtype == np.int32 for v in batch.values())
    stored = arrays["segment_ids"].reshape(-1, 97)
    assert ((stored == 0) <= (arrays["loss_mask"].reshape(-1, 97) == 0)).all()  # padding is never in the loss
    masked = next(make_loader(chat_data, "train", 96, 4, seed=0, process_index=0, process_count=1, doc_mask=True))
    assert sorted(masked) == ["loss_mask", "positions", "segment_ids", "tokens"]
    np.testing.assert_array_equal(masked["tokens"], batch["tokens"])
    assert masked["segment_ids"].shape == masked["positions"].shape == (4, 96)
    # The same rows in the file: a new segment exactly where the stored example id changes (padding too).
    windows = arrays["tokens"].reshape(-1, 97)
    rows = [np.flatnonzero((windows == row).all(1))[0] for row in batch["tokens"]]
    ids = stored[rows][:, :-1]
    changes = np.diff(ids, axis=1) != 0
    np.testing.assert_array_equal(np.diff(masked["segment_ids"], axis=1), changes)
    assert (masked["positions"][:, 1:][changes] == 0).all() and (masked["positions"][:, 0] == 0).all()
    with pytest.raises(InputError, match=r"model\.context_length=96"):
        make_loader(chat_data, "train", 32, 4, process_index=0, process_count=1)


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_examples_longer_than_a_window_are_truncated_or_dropped_and_counted(chat_ckpt, tmp_path, overlong):
    long = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": " ".join(WORDS * 3)}]}  # 98 tokens
    lines = [conversation(1), long, conversation(2)]  # 43 and 47 tokens
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = preprocess_chat([str(tmp_path / "c.jsonl")], tmp_path / "d", tokenizer=str(chat_ckpt), context=59,
                             overlong=overlong, val_fraction=0)  # fmt: skip
    p = result.meta.packing
    assert (p.truncated, p.dropped, p.examples) == ((1, 0, 3) if overlong == "truncate" else (0, 1, 2))
    segs = open_split(tmp_path / "d", "train")["segment_ids"].reshape(-1, 60)
    if overlong == "truncate":
        assert (segs > 0).all(axis=1).any(), "the truncated example fills a whole window"
    assert f"1 {'truncated' if overlong == 'truncate' else 'dropped'}" in result.summary().replace(
        "0 truncated", ""
    ).replace("0 dropped", "")


def test_malformed_lines_are_skipped_with_their_line_number_or_refused_with_strict(chat_ckpt, tmp_path, capsys):
    lines = [json.dumps(conversation(1)), "{not json", json.dumps({"msgs": []}),
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "",
             json.dumps(conversation(2))]  # fmt: skip
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    warnings = []
    result = preprocess_chat([str(tmp_path / "c.jsonl")], tmp_path / "d", tokenizer=str(chat_ckpt), val_fraction=0,
                             on_warning=warnings.append)  # fmt: skip
    assert result.meta.packing.malformed == 4 and result.meta.packing.examples == 2
    assert [w.split(": ")[0].rsplit(":", 1)[1] for w in warnings] == ["2", "3", "4", "5"]
    assert "messages[0].role" in warnings[2] and "no assistant message" in warnings[3]
    code = _cli(["preprocess", "--format", "chat", str(tmp_path / "c.jsonl"), "--tokenizer", str(chat_ckpt),
                 "--out", str(tmp_path / "strict"), "--strict"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "c.jsonl:2: not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "strict").exists()


def _cli(argv) -> int:
    try:
        jaxllm_main(argv)
    except SystemExit as e:
        return e.code
    return 0


# The token-weighted loss ---------------------------------------------------------------------------
def test_loss_is_the_mean_over_unmasked_targets_of_the_whole_batch(chat_ckpt):
    cfg = ModelConfig.from_yaml(chat_ckpt / "config.yaml")
    params = init_params(cfg, 3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (4, 9)).astype(np.int32)
    mask = np.zeros((4, 9), np.int32)
    mask[0, 2:8] = 1  # 6 targets in row 0, 1 in row 1, none in rows 2-3: micro-batches of unequal weight
    mask[1, 5] = 1
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    logits = np.asarray(forward(cfg, params, tokens[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    by_hand = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    np.testing.assert_allclose(float(loss_fn(cfg, params, batch)), by_hand, rtol=1e-5)
    # Accumulated over 2 micro-batches (rows 0,2 hold 6 targets, rows 1,3 one): the same loss and update.
    results = []
    for k in (1, 2):
        tcfg = TrainConfig(batch_size=4, grad_accum=k, warmup_steps=0)
        opt = make_optimizer(tcfg)
        step = jax.jit(lambda s, b, t=tcfg, o=opt: train_step(cfg, t, o, s, b))
        state, metrics = step(init_state(params, opt), batch)
        np.testing.assert_allclose(float(metrics["loss"]), by_hand, rtol=1e-5)
        results.append(state["params"])
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_torch_ref_loss_is_the_same_token_weighted_mean(chat_ckpt):
    import torch

    from jaxllm.convert import to_torch_state_dict
    from torch_ref.model import build_model
    from torch_ref.trainer import loss_fn as torch_loss

    cfg = ModelConfig.from_yaml(chat_ckpt / "config.yaml")
    params = init_params(cfg, 3)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (3, 9))
    mask = (rng.random((3, 9)) < 0.4).astype(np.int64)
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(to_torch_state_dict(cfg, params))
    with torch.no_grad():
        theirs = float(torch_loss(model, {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask)}))
    ours = float(loss_fn(cfg, params, {"tokens": jnp.asarray(tokens, jnp.int32), "loss_mask": jnp.asarray(mask)}))
    np.testing.assert_allclose(theirs, ours, rtol=1e-5)


def test_a_packed_chat_example_with_doc_mask_has_the_logits_of_the_example_alone(chat_ckpt, chat_data):
    from jaxllm.data.loader import make_loader
    from jaxllm.data.segments import model_inputs

    cfg = ModelConfig.from_yaml(chat_ckpt / "config.yaml")
    params = init_params(cfg, 5)
    loader = make_loader(chat_data, "train", 96, 4, seed=1, process_index=0, process_count=1, doc_mask=True)
    batch = next(loader)
    row = int(np.argmax(batch["segment_ids"].max(1)))  # the row with the most segments
    assert batch["segment_ids"][row].max() >= 2  # two examples at least (and maybe padding)
    inputs, _, segments = model_inputs({k: v[row : row + 1] for k, v in batch.items()})
    packed = np.asarray(forward(cfg, params, inputs, **segments))[0]
    plain = np.asarray(forward(cfg, params, inputs))[0]
    ids = batch["segment_ids"][row]
    for s in range(1, int(ids.max()) + 1):  # every segment after the first: examples, then any padding run
        at = np.flatnonzero(ids == s)
        alone = np.asarray(forward(cfg, params, inputs[:, at]))[0]
        np.testing.assert_allclose(packed[at], alone, rtol=1e-4, atol=1e-4)
        assert np.abs(plain[at] - alone).max() > 1e-3  # without the mask the example sees the ones before it


# Starting from a checkpoint --------------------------------------------------------------------------
def test_the_model_comes_from_the_checkpoint_and_shape_changes_are_refused(chat_ckpt, tmp_path):
    cfg = config_from_checkpoint(chat_ckpt, None, ["model.dtype=bfloat16", "model.context_length=64"])
    assert cfg.model.name == "tiny-chat" and cfg.model.dtype == "bfloat16" and cfg.model.context_length == 64
    assert cfg.train == TrainConfig()  # the defaults, as without a config file
    cfg = config_from_checkpoint(chat_ckpt, "mini", ["train.steps=3"])
    assert cfg.model.d_model == 32 and cfg.train.learning_rate == 2e-3 and cfg.train.steps == 3
    # A file of train settings only (examples/finetune/lora.yaml): the model section is CK's anyway.
    (tmp_path / "lora.yaml").write_text("train:\n  steps: 7\n  lora_rank: 4\n")
    cfg = config_from_checkpoint(chat_ckpt, tmp_path / "lora.yaml")
    assert cfg.model.name == "tiny-chat" and cfg.train.steps == 7 and cfg.train.lora_rank == 4
    with pytest.raises(ConfigError, match="missing the 'model:' section"):
        Config.load(tmp_path / "lora.yaml")
    with pytest.raises(ConfigError, match=r"^model.d_model=64 would change the shapes") as err:
        config_from_checkpoint(chat_ckpt, None, ["model.d_model=64"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads=4"):
        config_from_checkpoint(chat_ckpt, None, ["model.n_kv_heads=4"])
    with pytest.raises(ConfigError, match=r"override model\.d_modle"):
        config_from_checkpoint(chat_ckpt, None, ["model.d_modle=64"])


def test_train_init_from_the_command_line_carries_tokenizer_and_template_into_final(chat_ckpt, chat_data, tmp_path,
                                                                                     capsys):  # fmt: skip
    run = tmp_path / "run"
    code = _cli(["train", "--init", str(chat_ckpt), "--data", str(chat_data), "--out", str(run), "--no-progress",
                 "train.steps=2", "train.batch_size=8", *QUIET])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (run / "final" / name).read_bytes() == (chat_ckpt / name).read_bytes()
    capsys.readouterr()
    code = _cli(["generate", "--checkpoint", str(run / "final"), "--chat", "the cat", "--max-new-tokens", "3",
                 "--temperature", "0"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    # torch_ref takes the same command line (no --config) and gives the same losses.
    try:
        torch_train.main(torch_train.parser(), torch_train._start, [
            "--init", str(chat_ckpt), "--data", str(chat_data), "--out", str(tmp_path / "torch"), "--no-progress",
            "train.steps=2", "train.batch_size=8", *QUIET])  # fmt: skip
    except SystemExit as e:
        raise AssertionError(capsys.readouterr().err) from e
    assert (tmp_path / "torch" / "final" / "tokenizer_config.json").is_file()
    jax_l, torch_l = step_losses(run), step_losses(tmp_path / "torch")
    np.testing.assert_allclose(list(torch_l.values()), list(jax_l.values()), rtol=LOSS_RTOL, atol=0)
    # A dataset made with another tokenizer is refused, in one line.
    other = tmp_path / "bytes"
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n" * 50)
    preprocess([str(tmp_path / "t.txt")], other, tokenizer="byte", val_fraction=0)
    code = _cli(["train", "--init", str(chat_ckpt), "--data", str(other), "--out", str(tmp_path / "r2"), *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "tokenized with another tokenizer" in err and f"--tokenizer {chat_ckpt}" in err
    code = _cli(["train", "--init", str(chat_ckpt), "--data", str(chat_data), "--out", str(tmp_path / "r3"),
                 "model.n_layers=3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: model.n_layers=3 would change") and len(err.splitlines()) == 1


def test_preprocess_with_a_checkpoint_uses_its_tokenizer_and_training_accepts_it(chat_ckpt, tmp_path):
    for i in range(2):
        (tmp_path / f"t{i}.txt").write_text(f"the cat sat on the mat and the dog ran to the log {i}\n" * 40)
    result = preprocess([str(tmp_path / "t0.txt"), str(tmp_path / "t1.txt")], tmp_path / "d", tokenizer=str(chat_ckpt))
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == (chat_ckpt / "tokenizer.json").read_bytes()
    assert result.meta.tokenizer.source == str(chat_ckpt.absolute())
    from jaxllm.base_checkpoint import check_data_tokenizer

    check_data_tokenizer(tmp_path / "d", chat_ckpt)  # no error
    # The same tokenizer written with other formatting is still the same tokenizer (canonical hash).
    pretty = tmp_path / "pretty"
    shutil.copytree(tmp_path / "d", pretty)
    (pretty / "tokenizer.json").write_text(json.dumps(json.loads((chat_ckpt / "tokenizer.json").read_text()), indent=3))
    meta = json.loads((pretty / "meta.json").read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    (pretty / "meta.json").write_text(json.dumps(meta))
    check_data_tokenizer(pretty, chat_ckpt)


# Parity with torch_ref --------------------------------------------------------------------------------
def _jax_train(cfg, run_dir, init=None):
    from jaxllm.train import train

    return train(cfg, run_dir, devices=jax.devices()[:1], progress=False, init=init)


@pytest.mark.parametrize("doc_mask", [False, True])
def test_jaxllm_and_torch_ref_match_on_masked_chat_data_from_a_checkpoint(chat_ckpt, chat_data, tmp_path, doc_mask):
    cfg = config_from_checkpoint(chat_ckpt, None, [f"data.path={chat_data}", "train.steps=6", "train.batch_size=8",
                                                   "train.grad_accum=2", f"data.doc_mask={doc_mask}", *QUIET,
                                                   *ONE_DEVICE])  # fmt: skip
    _jax_train(cfg, tmp_path / "jax", init=chat_ckpt)
    torch_train.train(cfg, tmp_path / "torch", init=chat_ckpt, progress=False)
    jax_losses, torch_losses = step_losses(tmp_path / "jax"), step_losses(tmp_path / "torch")
    assert sorted(jax_losses) == list(range(1, 7))
    np.testing.assert_allclose(list(torch_losses.values()), list(jax_losses.values()), rtol=LOSS_RTOL, atol=0)
    assert jax_losses[6] < jax_losses[1] - 0.5  # it learned: the comparison is not vacuous
    assert (tmp_path / "torch" / "final" / "tokenizer_config.json").is_file()
    if doc_mask:
        return
    # From the checkpoint's weights, not train.seed's init.
    _jax_train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 1})}), tmp_path / "seed")
    assert abs(step_losses(tmp_path / "seed")[1] - jax_losses[1]) > 1e-3


def test_torch_ref_starts_from_jaxllm_init_by_default_and_from_its_own_with_init_torch(byte_dataset, tmp_path):
    from jaxllm.config import Config

    cfg = Config.load("mini", ["model.vocab_size=257", "model.n_layers=1", "train.batch_size=4", "train.steps=3",
                               f"data.path={byte_dataset}", *QUIET, *ONE_DEVICE])  # fmt: skip
    _jax_train(cfg, tmp_path / "jax")
    torch_train.train(cfg, tmp_path / "torch", progress=False)  # no --init, no export by hand
    torch_train.train(cfg, tmp_path / "own", init="torch", progress=False)
    jax_l, torch_l, own_l = (step_losses(tmp_path / r) for r in ("jax", "torch", "own"))
    np.testing.assert_allclose(list(torch_l.values()), list(jax_l.values()), rtol=LOSS_RTOL, atol=0)
    assert abs(own_l[1] - jax_l[1]) / jax_l[1] > 10 * LOSS_RTOL
    assert [r["step"] for r in read_metrics(tmp_path / "torch" / "metrics.jsonl")] == [1, 2, 3]


def test_two_ddp_ranks_weight_masked_tokens_as_one_process(chat_ckpt, chat_data, tmp_path):
    """The ranks' rows hold different numbers of loss tokens: a mean of per-rank means would differ."""
    from torchrun_helpers import fresh, torchrun

    overrides = ["train.steps=3", "train.batch_size=8", "train.grad_accum=2", *QUIET]
    cfg = config_from_checkpoint(chat_ckpt, None, [f"data.path={chat_data}", *overrides])
    torch_train.train(cfg, tmp_path / "one", init=chat_ckpt, progress=False)
    args = ["-m", "torch_ref.train", "--init", str(chat_ckpt), "--data", str(chat_data), "--out", str(tmp_path / "ddp"),
            "--no-progress", *overrides]  # fmt: skip
    torchrun(args, nproc=2, prepare=fresh(tmp_path / "ddp"), timeout=300)
    one, ddp = step_losses(tmp_path / "one"), step_losses(tmp_path / "ddp")
    assert sorted(ddp) == [1, 2, 3]
    np.testing.assert_allclose(list(ddp.values()), list(one.values()), rtol=1e-5)
