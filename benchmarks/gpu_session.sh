#!/usr/bin/env bash
# One short GPU session, everything the speed issue still needs from a GPU, results under ${OUT:-gpu-results}:
# the Triton kernels checked on the real GPU (tests/test_kernels.py -k gpu), then ours vs ours + Triton kernels vs
# timm eager and compiled, bf16 AMP at batch 256, inference, latency and training.
#     bash benchmarks/gpu_session.sh            (from the repository root, with the project installed)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k gpu 2>&1 | tee "$out/kernel-tests.txt"
for model in coat_lite_tiny coat_tiny; do
    "$PY" -m coatvit benchmark --model "$model" --device cuda --amp bfloat16 --batch-size 256 \
        --vs ours-triton timm timm-compile --repeats 5 --csv "$out/speed.csv" 2>&1 | tee -a "$out/benchmark.txt"
done
