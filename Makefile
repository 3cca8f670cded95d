# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch on these machines; on a CUDA host pass e.g. TORCH='torch>=2.4'.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?= -n 2
# The demo dataset: the default corpus (this Python's standard library) tokenized with the mini vocab.
DATA_DIR ?= data/stdlib

.PHONY: demo test lint install clean

# DeepSpeed is installed too (its tests run on CPU); naming torch again keeps pip from replacing that build.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[dev,deepspeed]' '$(TORCH)'
	touch $@

install: $(VENV)/.installed

demo: install $(DATA_DIR)/meta.json
	$(VENV)/bin/jaxllm info mini
	$(VENV)/bin/jaxllm info advanced
	$(VENV)/bin/jaxllm info gpt2-124m
	rm -rf runs/demo
	$(VENV)/bin/jaxllm train --config mini --data $(DATA_DIR) --out runs/demo
	$(VENV)/bin/jaxllm generate --checkpoint runs/demo/final --prompt 'def ' --max-new-tokens 60 --seed 0 --num-samples 3

# meta.json is written last, so a complete dataset is kept on the next `make demo` and an
# interrupted one (no meta.json) is made again; `rm -r $(DATA_DIR)` forces a fresh one.
$(DATA_DIR)/meta.json: | $(VENV)/.installed
	$(VENV)/bin/jaxllm preprocess --out $(DATA_DIR) --vocab-size 1000

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
