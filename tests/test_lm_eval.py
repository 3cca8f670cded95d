"""lm-evaluation-harness against `jaxllm serve`: the same per-item log-likelihoods and accuracy as `--model hf`.

A tiny random Llama (transformers, in the test) with the conftest BPE tokenizer is imported with
`jaxllm import-hf` and exported again with `jaxllm export-hf`; a small local multiple-choice task (a
JSONL file and a task YAML written here) is run by `lm_eval --model hf` on the export and by
`lm_eval --model local-completions` against a real `jaxllm serve` of the import. No network.
"""

import json
import os
import subprocess
import sys

import pytest

from test_serve_server import API_KEY, running_server

pytest.importorskip("lm_eval", reason="lm-eval (dev extra) is needed for the harness comparison")
transformers = pytest.importorskip("transformers")

ITEMS = [
    {"question": "the cat sat on the", "choices": [" mat", " dog", " sky", " the"], "answer": 0},
    {"question": "the dog ran to the", "choices": [" park", " cat", " mat"], "answer": 1},
    {"question": "a bird flew over", "choices": [" the house", " a tree", " the cat", " it"], "answer": 2},
    {"question": "one two three", "choices": [" four", " five"], "answer": 0},
    {"question": "the quick brown", "choices": [" fox", " dog", " cat"], "answer": 0},
    {"question": "hello", "choices": [" world", " there", " you"], "answer": 1},
]
TASK = "jaxllm_tiny_mc"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_file):
    """(jaxllm params directory, its Hugging Face export)."""
    import torch

    from jaxllm.cli import main

    root = tmp_path_factory.mktemp("lm_eval")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, initializer_range=0.2,
                                      eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    main(["import-hf", str(root / "hf"), str(root / "ck")])
    main(["export-hf", str(root / "ck"), str(root / "export")])
    return root / "ck", root / "export"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    (d / "data.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    return d


def run_lm_eval(model: str, model_args: str, task_dir, out_dir, env_extra=None) -> tuple[dict, list[dict]]:
    """(the task's results, its logged samples sorted by doc id) of one `lm_eval` run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out_dir / "datasets"), **(env_extra or {})}  # fmt: skip
    argv = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", TASK,
            "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1", "--log_samples",
            "--output_path", str(out_dir)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"][TASK]
    samples = [json.loads(line) for line in next(out_dir.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def loglikelihoods(sample: dict) -> list[float]:
    """Each choice's log-likelihood in a logged sample (`filtered_resps`: [loglikelihood, is_greedy] per choice)."""
    out = []
    for resp in sample["filtered_resps"]:
        while isinstance(resp, list):
            resp = resp[0]
        out.append(float(resp))
    return out


def test_local_completions_against_the_server_equals_hf(model_dirs, task_dir, tmp_path):
    ck, export = model_dirs
    hf_results, hf_samples = run_lm_eval("hf", f"pretrained={export},dtype=float32", task_dir, tmp_path / "hf")
    with running_server(ck, tmp_path, "--slots", "4", "--model-name", "tiny") as (_, port):
        args = (f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={export},num_concurrent=1,max_retries=1")  # fmt: skip
        api_results, api_samples = run_lm_eval("local-completions", args, task_dir, tmp_path / "api",
                                               {"OPENAI_API_KEY": API_KEY})  # fmt: skip
    assert len(hf_samples) == len(api_samples) == len(ITEMS)
    for hf, api in zip(hf_samples, api_samples, strict=True):
        assert loglikelihoods(api) == pytest.approx(loglikelihoods(hf), abs=1e-3), hf["doc_id"]
    assert api_results["acc,none"] == hf_results["acc,none"]
