#!/usr/bin/env bash
# `benchmarks/layer_bench.py` on the real-K/V trace (.devsite/traces/smollm2-135m-essays-8k.pt, made by `ckv trace`):
# the default grid, or the arguments in $BENCH_ARGS. CSV, BENCHMARKS.md and the log go to $OUT.
set -u
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
python benchmarks/layer_bench.py --trace .devsite/traces/smollm2-135m-essays-8k.pt \
  --out-csv "$OUT/results.csv" --out-md "$OUT/BENCHMARKS.md" ${BENCH_ARGS:---time-limit-s 400}
