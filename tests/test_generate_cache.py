"""The KV-cache engine: cached decoding equals a full forward pass, padding and slots never leak.

float32 bound: logits at every generated position within 1e-5 (max abs) of a full forward pass
over the same sequence. Both differ only in summation order (a 1-row matmul against a T-row one,
softmax over S masked entries), measured ~3e-7 here.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxllm.slots as engine
import torch_ref
from jaxllm import ModelConfig, forward, generate, init_params, to_torch_state_dict
from jaxllm.sampling import SamplingParams
from torch_ref.model import init_cache as torch_init_cache

from conftest import requires_cuda

TINY = {
    "gpt": ModelConfig.preset("mini").replace(vocab_size=101, context_length=48),
    "llama-gqa": ModelConfig.preset("advanced").replace(
        vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, context_length=48
    ),
    # Mistral's window (shorter than the sequences), Qwen2's q/k/v biases and Llama 3.1 RoPE scaling.
    "llama-window-bias-rope": ModelConfig.preset("advanced").replace(
        vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, context_length=48,
        sliding_window=4, qkv_bias=True, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
}
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3], [2], [7, 1, 8]]  # lengths 5, 11, 1, 3


def make_prompts(prompts, t, max_new, seed=0, temperature=0.0, top_k=0, top_p=1.0, stop_ids=(-1,)):
    b = len(prompts)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return engine.Prompts(
        jnp.asarray(tokens),
        jnp.asarray([len(p) for p in prompts], jnp.int32),
        jnp.full((b,), max_new, jnp.int32),
        jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(b)),
        SamplingParams.full(b, temperature, top_k, top_p),
        jnp.asarray([list(stop_ids)] * b, jnp.int32),
    )


def run_engine(cfg, params, prompts, max_new, **sampling):
    """(per-row generated tokens, per-row list of the logits each token was drawn from)."""
    state = engine.init_state(cfg, len(prompts), 32)
    state, logits_BV = engine.prefill_jit(
        cfg, params, state, make_prompts(prompts, 16, max_new, **sampling), jnp.arange(len(prompts))
    )
    step_logits = [np.asarray(logits_BV)]
    for _ in range(max_new - 1):
        state, logits_BV = engine.decode_step_jit(cfg, params, state)
        step_logits.append(np.asarray(logits_BV))
    seq, positions = np.asarray(state.seq_BS), np.asarray(state.positions_B)
    tokens = [seq[i, len(p) : positions[i] + 1].tolist() for i, p in enumerate(prompts)]
    return tokens, np.stack(step_logits, axis=1)


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_decoding_matches_a_full_forward_pass_at_every_generated_position(family, temperature):
    cfg = TINY[family]
    params = init_params(cfg, 0)
    max_new = 12
    tokens, step_logits = run_engine(cfg, params, PROMPTS, max_new, temperature=temperature, seed=3)
    # One full forward pass over each whole sequence, right-padded (causal: padding changes nothing before it).
    full_BT = np.zeros((len(PROMPTS), 32), np.int32)
    for i, (prompt, generated) in enumerate(zip(PROMPTS, tokens, strict=True)):
        assert len(generated) == max_new
        full_BT[i, : len(prompt) + max_new] = prompt + generated
    full_logits = np.asarray(jax.jit(forward, static_argnums=0)(cfg, params, full_BT))
    for i, (prompt, generated) in enumerate(zip(PROMPTS, tokens, strict=True)):
        expected = full_logits[i, len(prompt) - 1 : len(prompt) - 1 + max_new]  # what each new token came from
        np.testing.assert_allclose(step_logits[i], expected, atol=1e-5, rtol=0)
        if temperature == 0:
            assert generated == expected.argmax(-1).tolist()


@pytest.mark.parametrize("family", list(TINY))
def test_a_prompt_generates_the_same_alone_or_in_a_padded_batch(family):
    cfg = TINY[family]
    params = init_params(cfg, 1)
    batch = generate(cfg, params, PROMPTS, max_new_tokens=17)
    for prompt, together in zip(PROMPTS, batch, strict=True):
        assert generate(cfg, params, [prompt], max_new_tokens=17) == [together]


def test_grouped_query_cache_holds_only_the_kv_heads():
    cfg = TINY["llama-gqa"]
    state = engine.init_state(cfg, slots=3, cache_len=32)
    assert len(state.cache) == cfg.n_layers
    assert state.cache[0].k_BKSH.shape == state.cache[0].v_BKSH.shape == (3, 2, 32, cfg.dim_per_head)


def test_new_prompt_lengths_within_a_bucket_do_not_recompile(monkeypatch):
    cfg = TINY["gpt"].replace(vocab_size=103)
    params = init_params(cfg, 0)
    jax.clear_caches()  # whatever other tests compiled before: this test sees every trace it causes
    traces = []
    real = engine.forward_cached
    monkeypatch.setattr(engine, "forward_cached", lambda *a, **k: traces.append(a[2].shape) or real(*a, **k))
    for length in (2, 5, 9, 16):  # with 16 new tokens, one cache bucket (32)
        generate(cfg, params, [[1] * length, [2] * 3], max_new_tokens=16)
    assert traces == [(2, 32), (2, 1)]  # traced once: the prefill's chunk (min(PREFILL_CHUNK, 32)) and the decode step


def test_buckets_double_from_16_up_to_the_context_length():
    assert [engine.bucket(n, 48) for n in (1, 16, 17, 32, 33, 48)] == [16, 16, 32, 32, 48, 48]
    assert [engine.batch_bucket(n) for n in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]


def test_a_reused_slot_ignores_what_its_previous_request_left_in_the_cache():
    """Server-style use: a long request fills slot 1, then a short one replaces it mid-flight."""
    cfg = TINY["llama-gqa"]
    params = init_params(cfg, 2)
    long, short, other = [5] * 14, [7, 3], [1, 2, 3]
    state = engine.init_state(cfg, slots=2, cache_len=32)
    state, _ = engine.prefill_jit(cfg, params, state, make_prompts([other, long], 16, 17), jnp.arange(2))
    state = engine.decode_jit(cfg, params, state, 6)
    assert np.asarray(state.positions_B).tolist() == [3 + 6, 14 + 6]
    # Slot 1 gets a new, shorter request; a padding row (slot index 2 >= slots) is dropped.
    state, _ = engine.prefill_jit(cfg, params, state, make_prompts([short, [9]], 16, 17), jnp.array([1, 2]))
    state = engine.decode_jit(cfg, params, state, 100)
    assert np.asarray(state.done_B).all()
    seq = np.asarray(state.seq_BS)
    assert seq[1, : 2 + 17].tolist() == short + generate(cfg, params, [short], max_new_tokens=17)[0]
    assert seq[0, : 3 + 17].tolist() == other + generate(cfg, params, [other], max_new_tokens=17)[0]


def test_resizing_the_slots_leaves_the_busy_ones_unchanged():
    """Slots appended mid-flight are empty (done); cutting free ones off the end changes nothing either."""
    cfg = TINY["llama-gqa"]
    params = init_params(cfg, 3)
    first, second = [4, 8, 15, 16], [23, 42]
    state = engine.init_state(cfg, slots=1, cache_len=32)
    state, _ = engine.prefill_jit(cfg, params, state, make_prompts([first], 16, 17), jnp.arange(1))
    state = engine.decode_jit(cfg, params, state, 3)
    state = engine.resize_jit(state, 32, None, 4)
    assert state.seq_BS.shape == (4, 32) and np.asarray(state.done_B).tolist() == [False, True, True, True]
    state, _ = engine.prefill_jit(cfg, params, state, make_prompts([second], 16, 17), jnp.array([1]))
    state = engine.decode_jit(cfg, params, state, 5)
    assert np.asarray(state.done_B)[2:].all(), "appended slots stay empty"
    state = engine.resize_jit(state, 32, None, 2)  # slots 2 and 3 were never used
    assert state.cache[0].k_BKSH.shape[0] == 2 and state.seq_BS.shape == (2, 32)
    state = engine.decode_jit(cfg, params, state, 100)
    seq = np.asarray(state.seq_BS)
    assert np.asarray(state.done_B).all()
    assert seq[0, : 4 + 17].tolist() == first + generate(cfg, params, [first], max_new_tokens=17)[0]
    assert seq[1, : 2 + 17].tolist() == second + generate(cfg, params, [second], max_new_tokens=17)[0]


def test_slots_keep_their_own_sampling_settings():
    cfg = TINY["llama-gqa"]
    params = init_params(cfg, 0)
    state = engine.init_state(cfg, slots=2, cache_len=32)
    both = make_prompts([PROMPTS[0], PROMPTS[0]], 16, 17, seed=1)
    both = both._replace(sampling=SamplingParams(np.array([0.0, 5.0], np.float32), *both.sampling[1:]))  # greedy, hot
    state, _ = engine.prefill_jit(cfg, params, state, both, jnp.arange(2))
    state = engine.decode_jit(cfg, params, state, 100)
    seq = np.asarray(state.seq_BS)[:, 5 : 5 + 17].tolist()
    assert seq[0] == generate(cfg, params, [PROMPTS[0]], max_new_tokens=17)[0]
    assert seq[1] != seq[0]


def test_activation_checkpointing_setting_does_not_change_generation():
    cfg = TINY["gpt"]
    params = init_params(cfg, 0)
    expected = generate(cfg, params, PROMPTS, max_new_tokens=17)
    assert generate(cfg.replace(remat="save_dots"), params, PROMPTS, max_new_tokens=17) == expected


@pytest.mark.parametrize("family", list(TINY))
def test_torch_ref_cached_decoding_matches_its_full_forward_pass(family):
    cfg = TINY[family]
    torch.manual_seed(0)
    model = torch_ref.build_model(cfg).eval()
    prompts = [[3, 1, 4, 1, 5], [2, 7]]
    generated = [[8, 2, 8, 1, 8], [1, 8, 2, 8, 4]]
    cache = torch_init_cache(cfg, 2, 16)
    with torch.no_grad():
        tokens = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 0, 0, 0]])
        first = model(tokens, torch.arange(5).expand(2, 5), cache, torch.tensor([4, 1]))[:, 0]
        steps = [first]
        for j in range(4):
            step_tokens = torch.tensor([[generated[0][j]], [generated[1][j]]])
            steps.append(model(step_tokens, torch.tensor([[5 + j], [2 + j]]), cache)[:, 0])
        for i, (p, g) in enumerate(zip(prompts, generated, strict=True)):
            full = model(torch.tensor([p + g]))[0, len(p) - 1 : len(p) + 4]
            np.testing.assert_allclose(torch.stack([s[i] for s in steps]).numpy(), full.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(TINY))
def test_greedy_tokens_equal_torch_ref_for_a_batch_of_different_lengths(family):
    cfg = TINY[family]
    params = init_params(cfg, 4)
    model = torch_ref.build_model(cfg)
    model.load_state_dict(to_torch_state_dict(cfg, params))
    jax_tokens = generate(cfg, params, PROMPTS, max_new_tokens=21)  # 11 + 21 fills the 32-position cache
    torch_tokens = torch_ref.generate(model.eval(), PROMPTS, max_new_tokens=21)
    assert jax_tokens == torch_tokens
    assert all(len(t) == 21 for t in jax_tokens)
    assert len({tuple(t) for t in jax_tokens}) == len(PROMPTS)  # real, distinct continuations


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("family", list(TINY))
def test_cuda_greedy_tokens_equal_torch_ref_on_cuda(family):
    cfg = TINY[family]
    params = init_params(cfg, 4)
    model = torch_ref.build_model(cfg, "cuda")
    model.load_state_dict(to_torch_state_dict(cfg, params))
    torch.backends.cuda.matmul.allow_tf32 = False
    with jax.default_matmul_precision("highest"):
        jax_tokens = generate(cfg, jax.device_put(params, jax.devices("gpu")[0]), PROMPTS, max_new_tokens=21)
    assert jax_tokens == torch_ref.generate(model.eval(), PROMPTS, max_new_tokens=21)
