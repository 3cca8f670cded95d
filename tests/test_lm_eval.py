"""lm-evaluation-harness against `jaxllm serve`: the same per-item results and accuracy as `--model hf`.

A tiny random Llama (transformers, in the test) with the conftest BPE tokenizer is imported with
`jaxllm import-hf` and exported again with `jaxllm export-hf`; small local tasks (a JSONL file and a
task YAML written here) are run by `lm_eval --model hf` on the export and against a real `jaxllm serve`
of the import. No network.

- Multiple choice (log-likelihoods): `--model local-completions` (`/v1/completions`, `echo`, `logprobs`).
- Generation (`generate_until`, greedy): `--model local-chat-completions --apply_chat_template`
  (`/v1/chat/completions`) vs `--model hf --apply_chat_template`, on a variant of the model whose
  tokenizer has ChatML's special tokens and chat template (SmolLM2's format).
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
GEN_ITEMS = [
    {"question": "Where did the cat sit?", "answer": "on the mat"},
    {"question": "Where did the dog sit?", "answer": "on the log"},
    {"question": "Who met on a mat?", "answer": "a cat and a dog"},
    {"question": "How does a small model write?", "answer": "token by token"},
    {"question": "the cat sat on the", "answer": "mat"},
]
GEN_TASK = "jaxllm_tiny_gen"
# The server: short prompts, one at a time (num_concurrent=1), so a short warm-up (few compiled shapes)
SERVE_FLAGS = ("--slots", "4", "--max-prefill-batch", "1", "--max-context", "64", "--model-name", "tiny")
# ChatML, as SmolLM2's template renders it (no default system prompt)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_llama(root, tok) -> tuple:
    """(jaxllm params directory, its Hugging Face export) of a random 2-layer Llama over `tok`, via
    `jaxllm import-hf` and `jaxllm export-hf`."""
    import torch

    from jaxllm.cli import main

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
def model_dirs(tmp_path_factory, tokenizer_file):
    """(jaxllm params directory, its Hugging Face export)."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")
    return tiny_llama(tmp_path_factory.mktemp("lm_eval"), tok)


@pytest.fixture(scope="module")
def chat_model_dirs(tmp_path_factory, tokenizer_file):
    """The same with ChatML: `<|im_start|>`, `<|im_end|>` (the end of turn and EOS) and its chat template."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|im_end|>",
                                               additional_special_tokens=["<|im_start|>"])  # fmt: skip
    tok.chat_template = CHATML
    return tiny_llama(tmp_path_factory.mktemp("lm_eval_chat"), tok)


def write_task(d, name: str, items: list[dict], spec: str):
    """A local task: `d/data.jsonl` and `d/NAME.yaml` (the dataset lines, then `spec`)."""
    (d / "data.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (d / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\n"
        "test_split: test\n" + spec
    )
    return d


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    spec = ("output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
            "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")  # fmt: skip
    return write_task(tmp_path_factory.mktemp("task"), TASK, ITEMS, spec)


@pytest.fixture(scope="module")
def gen_task_dir(tmp_path_factory):
    spec = ("output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
            "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")  # fmt: skip
    return write_task(tmp_path_factory.mktemp("gen_task"), GEN_TASK, GEN_ITEMS, spec)


def run_lm_eval(model: str, model_args: str, task_dir, out_dir, env_extra=None, task: str = TASK,
                flags: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:  # fmt: skip
    """(the task's results, its logged samples sorted by doc id) of one `lm_eval` run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out_dir / "datasets"), **(env_extra or {})}  # fmt: skip
    argv = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", task,
            "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1", "--log_samples",
            "--output_path", str(out_dir), *flags]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"][task]
    samples = [json.loads(line) for line in next(out_dir.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
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
    with running_server(ck, tmp_path, *SERVE_FLAGS) as (_, port):
        args = (f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={export},num_concurrent=1,max_retries=1")  # fmt: skip
        api_results, api_samples = run_lm_eval("local-completions", args, task_dir, tmp_path / "api",
                                               {"OPENAI_API_KEY": API_KEY})  # fmt: skip
    assert len(hf_samples) == len(api_samples) == len(ITEMS)
    for hf, api in zip(hf_samples, api_samples, strict=True):
        assert loglikelihoods(api) == pytest.approx(loglikelihoods(hf), abs=1e-3), hf["doc_id"]
    assert api_results["acc,none"] == hf_results["acc,none"]


def test_local_chat_completions_generation_against_the_server_equals_hf(chat_model_dirs, gen_task_dir, tmp_path):
    """Greedy `generate_until` through the chat template: the same generated text for every item."""
    ck, export = chat_model_dirs
    chat = ("--apply_chat_template",)
    hf_results, hf_samples = run_lm_eval("hf", f"pretrained={export},dtype=float32", gen_task_dir, tmp_path / "hf",
                                         task=GEN_TASK, flags=chat)  # fmt: skip
    with running_server(ck, tmp_path, *SERVE_FLAGS) as (_, port):
        args = f"model=tiny,base_url=http://127.0.0.1:{port}/v1/chat/completions,num_concurrent=1,max_retries=1"
        api_results, api_samples = run_lm_eval("local-chat-completions", args, gen_task_dir, tmp_path / "api",
                                               {"OPENAI_API_KEY": API_KEY}, task=GEN_TASK, flags=chat)  # fmt: skip
    assert len(hf_samples) == len(api_samples) == len(GEN_ITEMS)
    hf_texts = [s["resps"][0][0] for s in hf_samples]
    api_texts = [s["resps"][0][0] for s in api_samples]
    assert api_texts == hf_texts
    assert any(t.strip() for t in hf_texts), "the model generated something to compare"
    assert "<|im_start|>assistant" in json.dumps(hf_samples[0]["arguments"]), "hf rendered the chat template"
    assert api_results["exact_match,none"] == hf_results["exact_match,none"]
