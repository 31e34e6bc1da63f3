#!/usr/bin/env bash
# The checks that need a CUDA device, as one script, run from the repository root
# on a GPU machine with torch, triton, pytest and hypothesis installed: the tests
# whose CUDA paths run only there (the Triton multiply, launch counts, CUDA
# graphs, every rule under CUDA's sync debug mode, folding into fused optimizers,
# norms against float64), then the CUDA bench and its accuracy table.
# Logs go to ${OUT:-gpu-check}/.
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"
timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
  tests/core/test_kernels.py tests/core/test_launches.py tests/core/test_cuda_sync.py \
  tests/test_fused.py tests/test_fused_scaler.py tests/core/test_row_norms.py \
  ${EXTRA_TESTS:-} 2>&1 | tail -n 60 | tee "$out/tests.txt"
timeout "${BENCH_TIMEOUT:-300}" python3 -m gradclip bench --device cuda ${BENCH_ARGS:-} 2>&1 \
  | tee "$out/bench.txt"
timeout "${ACCURACY_TIMEOUT:-120}" python3 -m gradclip bench --device cuda --accuracy 2>&1 \
  | tee "$out/accuracy.txt"
