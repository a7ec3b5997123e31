#!/usr/bin/env bash
# Write-Gated KV admission on the GPU (issue 5, part 3). Run from the repo root; results go to $OUT. ~1-2 minutes.
#  1. GPU tests: the gated cache's prefill/steps on CUDA and its fused Triton read path == the reference path
#     (tests/test_admission_gpu.py), plus the config-driven kernel checks for configs/write_gate_quest_art.yaml.
#  2. Timing, one attention layer: batch 64, 8k context, Llama-8B shapes (32/8 heads x 128, bf16), random K/V and
#     random gates admitting 25% / 50% of the tokens that leave the 256-token window: fused decode of dense,
#     quest1024+art, write_gate+attend and write_gate+quest1024+art (CUDA events, median of 30), host plan time,
#     pages held and read. Writes write_gate_bench.{md,csv,json}.
set -euo pipefail
OUT=${OUT:-$PWD/write-gate-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.csv" || true
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
python -m pytest -q -m gpu tests/test_admission_gpu.py "tests/test_kernels_gpu.py" -k "admission or write_gate" \
  2>&1 | tee "$OUT/tests.log"
python benchmarks/write_gate_cost.py --batch 64 --context 8192 --admit 0.25,0.5 --iters 30 --out "$OUT" \
  2>&1 | tee "$OUT/bench.log"
