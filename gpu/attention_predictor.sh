#!/usr/bin/env bash
# AttentionPredictor on the GPU (about 2 minutes): the decode kernels' page-mass side output vs the
# reference, the stage compiled on CUDA vs its reference path, then the cost benchmark (the CNN per
# layer and per step, one pipeline layer vs Quest at the same budget, the side output's cost in the
# dense decode kernel). Results: $OUT/attention_predictor_{tests.txt,cost.csv,cost.md}.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/attention_predictor_gpu.txt" 2>&1
timeout 300 python -m pytest -q -m gpu tests/test_attention_predictor_gpu.py 2>&1 | tail -30 \
  | tee "$OUT/attention_predictor_tests.txt"
timeout 240 python benchmarks/attention_predictor_cost.py --device cuda --out "$OUT" \
  2>&1 | tee "$OUT/attention_predictor_cost.log"
