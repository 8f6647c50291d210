#!/usr/bin/env bash
# One short GPU session, everything the speed issue needs from a GPU, results under ${OUT:-gpu-results}:
#   1. the Triton kernels checked on the real GPU against the default path (tests/test_kernels.py -k gpu);
#   2. the CPE kernel against the eager ops per CPE shape of CoaT (benchmarks/cpe_kernel.py;
#      with MLP=1 also the fused residual MLP kernel per MLP shape, benchmarks/fused_mlp.py);
#   3. ours (default: Triton kernels for CUDA batches of 128+) vs kernels off vs timm eager, bf16 AMP at batch
#      256: inference, training, batch-1 latency, peak memory, for coat_lite_tiny and coat_tiny;
#   4. where coat_lite_tiny's inference spends its GPU time now (benchmarks/profile_gpu.py);
#   5. with WIDTHS=1 only: whole models with the 40- and 64-channel heads (padded width 64) on the kernels against
#      the eager ops, the default (benchmarks/kernel_widths.py);
#   6. with SWEEPS=1 only: launch settings of the LayerNorm kernel (benchmarks/layer_norm_sweep.py) and of the
#      attention kernels at padded width 64 (benchmarks/triton_sweep.py);
#   7. with COMPILE=1 only: ours eager vs ours compiled vs timm compiled, inference and training.
# Each step has its own time limit, so one slow step cannot starve the rest; the most important come first.
# Steps 1-4 end within 10 minutes (the GPU tests, which autotune and compile, take up to three); `steps.txt` records
# when each began.
#     bash benchmarks/gpu_session.sh            (repository root; the project installed, or PYTHONPATH=src)
# On a machine with torch and triton but no network and no timm 1.0.31: carry its wheel and install it first,
#     pip install --no-deps --target /tmp/site timm-1.0.31-py3-none-any.whl
#     PYTHONPATH=/tmp/site:$PWD/src PYTHON=python3 bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
"$PY" -c "import sys, torch, triton, timm; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

step() { echo "$(date +%T) $*" >> "$out/steps.txt"; }
step kernel tests
timeout 170 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k gpu 2>&1 | tee "$out/kernel-tests.txt"
step cpe_kernel.py
timeout 80 "$PY" benchmarks/cpe_kernel.py 2>&1 | tee "$out/cpe.txt"
if [ "${MLP:-0}" = 1 ]; then
    step fused_mlp.py
    timeout 80 "$PY" benchmarks/fused_mlp.py 2>&1 | tee "$out/fused-mlp.txt"
fi

bench() {  # time limit (s), then benchmark arguments
    local limit=$1
    shift
    step coatvit benchmark "$@"
    echo "== coatvit benchmark $* --device cuda --amp bfloat16 --batch-size 256 --repeats 5 --steps 3 --warmup 2" \
        | tee -a "$out/benchmark.txt"
    timeout "$limit" "$PY" -m coatvit benchmark "$@" --device cuda --amp bfloat16 --batch-size 256 --repeats 5 \
        --steps 3 --warmup 2 --csv "$out/speed.csv" 2>&1 | tee -a "$out/benchmark.txt"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$out/benchmark.txt"
}
bench 130 --model coat_lite_tiny --vs ours-no-triton timm --modes infer train latency
bench 165 --model coat_tiny --vs ours-no-triton timm --modes infer train latency
step profile_gpu.py
timeout 40 "$PY" benchmarks/profile_gpu.py --model coat_lite_tiny --mode infer --vs ours --rows 20 2>&1 \
    | tee "$out/profile.txt"
if [ "${WIDTHS:-0}" = 1 ]; then
    step kernel_widths.py
    timeout 80 "$PY" benchmarks/kernel_widths.py --models coat_lite_small coat_small --eager 64 2>&1 \
        | tee "$out/kernel-widths.txt"
fi
if [ "${SWEEPS:-0}" = 1 ]; then
    step sweeps
    timeout 50 "$PY" benchmarks/layer_norm_sweep.py 2>&1 | tee "$out/norm-sweep.txt"
    timeout 80 "$PY" benchmarks/triton_sweep.py --shapes lite-s3 lite-s4 2>&1 | tee "$out/sweep.txt"
fi
if [ "${COMPILE:-0}" = 1 ]; then
    bench 200 --model coat_lite_tiny --vs ours-compile timm-compile --modes infer train --no-memory
fi
step done
