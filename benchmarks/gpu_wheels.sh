#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks for benchmarks/gpu_suite.sh, into .whl/ (git-ignored).
#
# The lent GPU machine has Python 3.12, JAX (CUDA), PyTorch (CUDA), flax, optax, orbax, tokenizers,
# tiktoken, safetensors, matplotlib and pytest, but no network and no pydantic (jaxllm's config
# schema). Carry the folder with the run: carry [".whl"]; gpu_suite.sh installs it to /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
rm -rf .whl && mkdir -p .whl
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -l .whl
