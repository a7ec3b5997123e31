#!/usr/bin/env bash
# End-to-end decode benchmark (benchmarks/e2e.py) on the GPU machine: FlashInfer from the bundle, results to $OUT.
#   E2E_ARGS="--sizes 32768x16" bash gpu/e2e.sh
set -u
OUT=${OUT:-$PWD/e2e-out}
mkdir -p "$OUT" /tmp/site
[ -f .devsite/flashinfer-py312.tgz ] && tar xzf .devsite/flashinfer-py312.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD
python benchmarks/e2e.py --out "$OUT" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log"
