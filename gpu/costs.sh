#!/usr/bin/env bash
# Issue 5 costs on the GPU: the AttentionPredictor per step (CNN, one pipeline layer vs Quest, the page-mass
# side output in the dense decode) and Ltri's span scoring vs Quest's page scoring. Results in $OUT.
set -u
OUT=${OUT:-$PWD/costs-out}
mkdir -p "$OUT"
timeout 80 python benchmarks/attention_predictor_cost.py --device cuda --quick --out "$OUT" \
  2>&1 | tee "$OUT/attention_predictor_cost.log"
timeout 50 python gpu/ltri.py "$OUT" 2>&1 | tee "$OUT/ltri_timing.log"
