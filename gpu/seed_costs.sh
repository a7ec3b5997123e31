#!/usr/bin/env bash
# Issue 17's cost targets on the GPU (H200, one run): attention_predictor and ltri per layer against Quest
# (one replayed CUDA-graph layer, B=16, 32k, Llama-8B shapes), then write_gate's end-to-end tokens/s against
# our dense decode (Llama-3-8B shape, B=16, 32k, fused decode layers), then ltri end to end at that shape next to dense,
# Quest, FlashInfer and the floor (its real prefill: it observes it). Results in $OUT/seed (with
# seed_methods_profile.md: each method's kernels, launches and time a layer), $OUT/write_gate and $OUT/e2e.
set -u
OUT=${OUT:-$PWD/seed-costs-out}
mkdir -p "$OUT/seed" "$OUT/write_gate" "$OUT/e2e"
timeout 150 python benchmarks/seed_methods_cost.py --device cuda --batch 16 --ctx 32768 --out "$OUT/seed" --profile \
  2>&1 | tee "$OUT/seed/log.txt"
timeout "${WRITE_GATE_TIMEOUT_S:-200}" python benchmarks/write_gate_cost.py --e2e --model llama3-8b-shape --batch 16 \
  --context 32768 --admit 0.1,0.25 --budget 1024 --steps 32 --layers "${WRITE_GATE_LAYERS:-fused}" \
  --out "$OUT/write_gate" 2>&1 | tee "$OUT/write_gate/log.txt"
timeout "${E2E_TIMEOUT_S:-300}" python benchmarks/e2e.py --out "$OUT/e2e" --models llama3-8b-shape --sizes 32768x16 \
  --providers "ckv dense,ckv configs/quest.yaml,ckv configs/ltri.yaml,flashinfer,flashinfer-tc" --steps 32 \
  2>&1 | tee "$OUT/e2e/log.txt"
