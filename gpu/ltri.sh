#!/usr/bin/env bash
# Ltri-LLM span retrieval on the GPU (issue 5, part 2). Run from the repo root; results go to $OUT.
#  1. GPU tests: span-score kernel vs reference (G 1..8, D 64/128, R 1..8, ragged span counts, fp32/bf16,
#     extreme logits) and the ltri stage on CUDA (Triton scorer) against the CPU reference path.
#  2. Timing (bf16, 32 q / 8 KV heads, D 128): span scoring (Triton and the torch reference) against Quest's
#     box-bound page scoring over the same context; GB/s of the bytes each reads. Under a minute.
set -euo pipefail
OUT=${OUT:-$PWD/ltri-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.csv" || true
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
python -m pytest -q -m gpu tests/test_ltri_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/ltri_gpu_tests.log"
python gpu/ltri.py "$OUT" 2>&1 | tee "$OUT/ltri_timing.log"
