#!/usr/bin/env bash
# Device check for a lent GPU (H100/H200) or TPU: one command, under 8 minutes, table + JSON line last.
#
#   bash benchmarks/device_check.sh
#
# 1. the kernel-vs-reference checks, natively (plain script; pytest runs the CPU-side tests too if
#    it is installed);
# 2. the engine end to end: decode tok/s at batch 1/32/128 on a Llama-3-8B-shaped random bf16 model
#    (benchmarks/bench_engine_device.py);
# 3. the decode attention benchmark: copy bandwidth, ours vs XLA reference vs jax's Pallas kernel at
#    Llama-3-8B shapes (batch 8/64/256 x context 512/2048/8192); its JSON line is the last line.
#
# Only jax, numpy and this repository are needed (no fastapi/pydantic). Exit status: non-zero when a
# kernel check fails or a step times out.
#
# Time budget (8 minutes in all): checks <= 100 s, pytest <= 40 s, engine <= 170 s, attention
# benchmark <= 170 s (it stops starting new shapes after --time-budget-s and says which it skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Let the benchmark allocate what it needs without XLA grabbing 75% of HBM up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

status=0
python -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

echo "== 1. kernel checks (native) =="
timeout 100 python benchmarks/bench_attention.py --checks-only | tail -n 25 || status=1

if python -c "import pytest" 2>/dev/null; then
  echo "== 1b. pytest: reference and dispatch tests on this backend =="
  timeout 40 python -m pytest -q -p no:cacheprovider tests/test_pallas_reference.py tests/test_pallas_dispatch.py \
    | tail -n 5 || status=1
else
  echo "== 1b. pytest not installed: skipped (the plain-script checks above cover the kernels) =="
fi

# ===== end-to-end engine decode throughput ==========================================================
# The engine on a Llama-3-8B-shaped random-weight bf16 model with the Pallas attention backend: decode
# tok/s at batch 1, 32 and 128 (prompt 128, 64 output tokens).
echo "== 2. engine end-to-end (Llama-3-8B shapes, random bf16 weights, pallas attention) =="
timeout 170 python benchmarks/bench_engine_device.py --batches 1 32 128 --attention-backend pallas || status=1
# =====================================================================================================

echo "== 3. decode attention benchmark =="
timeout 170 python benchmarks/bench_attention.py --skip-checks --time-budget-s 100 || status=1
exit $status
