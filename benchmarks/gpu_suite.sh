#!/usr/bin/env bash
# The GPU check, as one prepared script: CUDA parity tests, the parity benchmark on CUDA, SmolLM2-135M's
# shape (random weights: parity at highest precision, bfloat16 decode vs transformers), and the
# speed suite (mini, advanced, gpt2-124m; bfloat16, cuDNN attention) with a profiler trace of 5
# gpt2-124m training steps, saved beside its MFU figure as one file, trace_gpt2-124m.tar.gz (under
# 16 MiB: deep folders and big files do not come back). Results go under $OUT (the device tool's
# folder; default benchmarks/results/gpu_suite), a short table is printed last.
#
#   bash benchmarks/gpu_wheels.sh          # here, once: the wheels the GPU machine lacks -> .whl/
#   device run, carry [".whl"], timeout_s 540:  bash benchmarks/gpu_suite.sh
#
# Each stage has a time limit (7.5 minutes together at most; 4-5 expected), and parity and the speed
# suite rewrite their results after every case, so a stage cut short still leaves what it measured.
# Needs no grain, deepspeed or flask. Without a GPU it runs the same stages on the CPU, small: the
# CUDA tests skip, parity runs on mini, the speed suite runs --quick.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_suite}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: could not install the wheels in .whl/"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" -c "import jaxllm, torch_ref, benchmarks.speed" \
  || { echo "error: jaxllm does not import here (missing pydantic? run benchmarks/gpu_wheels.sh and carry .whl)"; exit 1; }

start=$SECONDS
CUDA_TESTS=("$PY" -m pytest -m gpu tests/test_parity_torch.py tests/test_generate_cache.py -q -p no:cacheprovider)
status=0
stage() {  # stage NAME LIMIT_S COMMAND...: run with a time limit, log under $OUT, remember failures
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
}

if "$PY" -c "import jax, torch, sys; sys.exit(not (torch.cuda.is_available() and jax.default_backend() == 'gpu'))"; then
  "$PY" -c "import jax, torch; print('GPU:', torch.cuda.get_device_name(0), '| jax', jax.__version__, jax.devices()[0].device_kind, '| torch', torch.__version__)"
  stage cuda_tests 150 "${CUDA_TESTS[@]}"
  stage parity 120 "$PY" -m benchmarks.parity --devices cuda --steps 3 --out "$OUT"
  stage real_model 90 "$PY" -m benchmarks.real_model --random --device cuda --dtype bfloat16 --reps 3 --out "$OUT"
  # The speed suite gets what is left of 450 s (at least 120): every figure is saved as it is measured.
  left=$((450 - (SECONDS - start))); [ "$left" -ge 120 ] || left=120
  stage speed "$left" "$PY" -m benchmarks.speed --device cuda --presets gpt2-124m advanced mini --reps 5 --out "$OUT" \
    --profile "$OUT/profile"
  SPEED_MD="$OUT/speed_cuda.md" TRACED=gpt2-124m
else
  echo "no GPU seen by both torch and JAX: the CPU run of the same stages (small)"
  stage cuda_tests 150 "${CUDA_TESTS[@]}" -rs
  stage parity 120 "$PY" -m benchmarks.parity --devices cpu --presets mini --steps 3 --out "$OUT"
  stage real_model 120 "$PY" -m benchmarks.real_model --random --layers 2 --quick --batches 1
  stage speed 300 "$PY" -m benchmarks.speed --quick --presets mini --decode-batches 1 --name speed --out "$OUT" \
    --profile "$OUT/profile"
  SPEED_MD="$OUT/speed.md" TRACED=mini
fi
# The trace as one file (xprof opens the folder it unpacks to: tar -xzf FILE -C DIR; xprof --logdir DIR).
TRACE_TAR="$OUT/trace_$TRACED.tar.gz"
if compgen -G "$OUT/profile/plugins/profile/*/*.xplane.pb" >/dev/null; then
  tar -czf "$TRACE_TAR" -C "$OUT/profile" plugins && rm -rf "$OUT/profile"
  if [ "$(stat -c %s "$TRACE_TAR")" -gt $((16 << 20)) ]; then
    echo "trace: $TRACE_TAR is over 16 MiB, removed (it would not come back)"; rm -f "$TRACE_TAR"; status=1
  fi
fi

echo
echo "== summary ($((SECONDS - start))s in all; files in $OUT)"
grep -h -E "passed|failed|skipped|error" "$OUT/cuda_tests.log" | tail -1
[ -f "$OUT/parity.md" ] && grep "^|" "$OUT/parity.md" | cut -d'|' -f2-4,8-10
grep -h -E "^logits vs|^batch" "$OUT/real_model.log"
if [ -f "$TRACE_TAR" ]; then echo "trace: $TRACE_TAR ($(stat -c %s "$TRACE_TAR") bytes)"; else echo "trace: none"; status=1; fi
if [ -f "$SPEED_MD" ]; then
  sed -n '/^## Training step/,/^## Forward/p' "$SPEED_MD" | grep "^|" | cut -d'|' -f2,4-8
  sed -n '/^## Goals/,$p' "$SPEED_MD" | grep "^-"
else
  echo "speed: no results (see $OUT/speed.log)"
  status=1
fi
exit $status
