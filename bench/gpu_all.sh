#!/usr/bin/env bash
# What the GPU issue measures, for a lent GPU machine (one command there runs at most 10 minutes):
#   tests  the CUDA tests (tests/test_gpu.py, the Triton kernels compiled)
#   bench  bench/gpu.py, then the transformers baseline on the same card (compare only within one call)
#   all    both, the bench only if the tests pass
# Logs and glassbox_gpu.json go to $OUT (default /tmp).
#
#     bash bench/gpu_all.sh all [path/to/hf_gpu_baseline.py]   (default ../shared/bench/hf_gpu_baseline.py)
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp}
what=${1:-all}
baseline=${2:-../shared/bench/hf_gpu_baseline.py}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$what" != bench ]; then
    python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py tests/test_sampling_triton.py > "$OUT/tests.txt" 2>&1
    status=$?
    tail -5 "$OUT/tests.txt"
    [ $status -eq 0 ] || { echo "CUDA tests failed (exit $status): no bench"; exit $status; }
fi
if [ "$what" != tests ]; then
    PYTHONPATH=. python3 bench/gpu.py > "$OUT/bench.txt" 2>&1
    echo "bench/gpu.py exit $?"
    sed -n '/^NVIDIA\|^| shape/,$p' "$OUT/bench.txt" | grep -v '^ *"' | tail -20
    python3 "$baseline" > "$OUT/baseline.txt" 2>&1
    echo "baseline exit $?"
    tail -12 "$OUT/baseline.txt"
fi
