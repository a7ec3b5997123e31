#!/usr/bin/env bash
# Kernel tuning sweep (kernels/bench_triton.py): dense decode configs vs FlashInfer (eager and CUDA graph),
# pipeline host cost, Quest score+select configs, Quest decode with and without ART's stop. Random K/V.
set -u
OUT=${OUT:-$PWD/probe-out}
mkdir -p "$OUT"
python -m composable_kv.kernels.bench_triton --parts "${PROBE_PARTS:-dense,pipeline,select,quest_decode}" \
  --out "$OUT/probe.csv"
