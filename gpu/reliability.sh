#!/usr/bin/env bash
# Reliability on the GPU (issue 6), about 4 minutes on one H100. Run from the repo root; results in $OUT.
#  1. tests/test_contracts_gpu.py: value checks are off on CUDA by default (pipeline.run stays CUDA-graph
#     capturable) and refuse NaN/Inf with validate=True (~15 s).
#  2. composable_kv.longrun: 10,000 decode steps of a batch of 64 (requests finish and new ones arrive,
#     prompts 512-8192 tokens, 16-512 new tokens each), 4 layers of the default model's shape (9 query / 3 KV
#     heads of 64, bf16; layers 0-1 dense), through quest_art and sink_window_quest_art, one CUDA graph per
#     policy replayed every step; memory drift, non-finite outputs, spot checks vs the reference path every
#     500 steps. Each policy stops at 90 s and says so (steps < 10000 in the table) if the host is slow.
#     Writes $OUT/longrun.json, $OUT/longrun.md, $OUT/longrun.log.
set -euo pipefail
OUT=${OUT:-$PWD/reliability-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
python -m pytest -q -p no:cacheprovider tests/test_contracts_gpu.py 2>&1 | tee "$OUT/contracts_gpu.log" || true
python -m composable_kv.longrun --steps 10000 --batch 64 --time-budget-s 200 --out "$OUT" 2>&1 | tee "$OUT/longrun.log"
