"""benchmarks.real_model's roofline: the weights read alone, timed as one more "decode", and the table."""

from __future__ import annotations

from benchmarks import real_model as rm


def test_read_runner_reads_the_bytes_once_per_new_token() -> None:
    reads = []
    make = rm.read_runner(4096, lambda x: reads.append(x.nbytes) or x.sum())
    make(1)()
    assert reads == []  # t(1) reads nothing: t(N) - t(1) is N - 1 reads
    make(4)()
    assert reads == [4096] * 3


def test_markdown_divides_by_the_same_rounds_read_and_judges_the_goals() -> None:
    def row(batch: int, impl: str, tps: float, fraction: float) -> dict:
        return {"batch": batch, "impl": impl, "prompt": 37, "new_tokens": 64, "tokens_per_s": tps,
                "roofline_fraction": fraction, "timings_discarded_for_load": 0}  # fmt: skip

    rows = [row(1, "jaxllm", 80.0, 0.72), row(1, "transformers", 25.0, 0.23),
            row(8, "jaxllm", 400.0, 0.4), row(8, "transformers", 210.0, 0.2)]  # fmt: skip
    run = {"weights": "GGUF Q4_1", "device": "cpu", "dtype": "float32", "command": "c", "load_average_at_end": 1.0,
           "weight_bytes": 538e6, "read_gb_s_by_batch": {1: 60.0, 8: 55.5}, "reader": "kernel_read",
           "bandwidth_probes_gb_s": {"jax_sum": 41.0, "kernel_read": 77.0}}  # fmt: skip
    parity = {"tokens": 37, "max_abs": 1e-4, "rel_l2": 2e-6, "same_argmax": True}
    info = {"cpu": "AMD EPYC", "cores": 2, "python": "3.11", "load_average_at_start": 0.5}
    md = rm.markdown(rows, parity, info, run, 3)
    assert "60.0 / 55.5 GB/s in the batch 1 / 8 rounds (batch-1 decode bounded near 112 steps/s)" in md
    assert "41.0 GB/s (a jitted JAX sum) and 77.0 GB/s (jaxllm's stream_sum kernel)" in md
    assert "| 1 | 37 | 64 | jaxllm | 80.0 | 3.20x | 72% |" in md
    assert "Goal: float32 batch 1 >= 70% of the memory roofline: 72% (met)." in md
    assert "Goal: float32 batch 8 >= 2x transformers: 1.90x (NOT met)." in md
    assert "Time to first token" not in md  # no prefill timed: no table
    assert "bfloat16-weights" not in md and "bfloat16 weights at batch 1" not in md  # no bfloat16 row: no line
    md = rm.markdown([*rows, row(1, rm.BF16_ROW, 45.0, 0.4)], parity, info, run, 3)
    assert f'"{rm.BF16_ROW}": `--dtype bfloat16-weights`' in md
    assert "Goal: bfloat16 weights at batch 1 >= 1.5x transformers float32: 1.80x (met)." in md
    run |= {"prefill_tokens": 512, "first_token_s": {"jaxllm": 0.64, "transformers": 0.8}}
    md = rm.markdown(rows, parity, info, run, 3)
    assert "Time to first token at a 512-token prompt" in md
    assert "| jaxllm | 640 ms | 1.25x |" in md and "| transformers | 800 ms | 1.00x |" in md
