#!/usr/bin/env bash
# Kernel tuning sweep (benchmarks/kernel_sweep.py): dense decode configs vs FlashInfer (eager and CUDA graph),
# pipeline host cost, Quest score+select configs, Quest decode with and without ART's stop. Random K/V.
set -u
OUT=${OUT:-$PWD/probe-out}
mkdir -p "$OUT"
python benchmarks/kernel_sweep.py --parts "${PROBE_PARTS:-dense,pipeline,select,quest_decode}" \
  --out "$OUT/probe.csv"
