#!/usr/bin/env bash
# Issue 14, end to end: does ART pay? One GPU call (at most 580 s: run it with timeout_s 600), after the model parts are on the
# machine (gpu/eval_scale.sh, step 1):
#   1. benchmarks/kernel_sweep.py --parts art_decode --tune: why the ART decode reads every page slower than dense
#      (Qwen2.5-0.5B shape, B=16, 32k: order list, physical pages, stop rules, chunk sizes, stages, block sizes),
#      and this GPU's fastest BLOCK_PAGES for dense and dense + ART, recorded for launch_decode;
#   2. benchmarks/e2e.py on the real 32k model and 16 x 32k essay tokens (then 64 x 32k, fewer providers): dense, dense + ART (calibrated 0.1-0.3
#      and calibrate: once 0.1-0.3, checked every 16 pages), Quest 1024, Quest 2048 with and without ART,
#      FlashInfer-TC, transformers' generate (SDPA).
#   carry [".devsite/flashinfer-py312.tgz", ".devsite/wheels", ".devsite/eval-scale-cache.tgz"]
#   command: CKV_COMMIT=<commit> OUT=$OUT bash gpu/art_e2e.sh
set -euo pipefail
. "$(dirname "$0")/parts.sh"
export CKV_CACHE_DIR=${CKV_CACHE_DIR:-/tmp/ckv-cache}
OUT=${OUT:-$PWD/art-e2e-out}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT/sweep" "$OUT/e2e"
real_model_ready
tar xzf .devsite/flashinfer-py312.tgz -C "$SITE"
export PYTHONPATH="$SITE:$PWD"
# --tune: the fastest BLOCK_PAGES of dense and of dense + ART on this GPU go to kernels/paged_decode/tuned.json,
# which every decode below (ours dense included) then uses; the table comes back in $OUT/sweep to be committed.
# SWEEP=0 skips it and uses the committed tuned.json.
if [ "${SWEEP:-1}" != 0 ]; then
  timeout 150 python benchmarks/kernel_sweep.py --parts art_decode --shape qwen-0.5b --batch 16 --ctx 32768 --tune \
    --out "$OUT/sweep/art_decode.csv" 2>&1 | tee "$OUT/sweep/art_decode.log"
fi
cp kernels/paged_decode/tuned.json "$OUT/sweep/"
C=benchmarks/art/configs
once="ckv $C/dense_art_calibrated_once_0.1_chunk16.yaml,ckv $C/dense_art_calibrated_once_0.2_chunk16.yaml"
once+=",ckv $C/dense_art_calibrated_once_0.3_chunk16.yaml"
# PROVIDERS / PROVIDERS64 replace the lists below (comma-separated e2e.py providers)
providers="ckv dense,$once,ckv $C/dense_art_calibrated_0.3_chunk16.yaml"
providers+=",ckv quest,ckv $C/quest2048.yaml,ckv $C/quest2048_art_calibrated_0.2.yaml,flashinfer-tc,transformers"
timeout ${E2E_TIMEOUT:-250} python benchmarks/e2e.py --out "$OUT/e2e" --models qwen2.5-0.5b-shape \
  --model-path qwen2.5-coder-0.5b --text essays --sizes 32768x16 --providers "${PROVIDERS:-$providers}" 2>&1 \
  | tee "$OUT/e2e/log.txt"
# B = 64: attention is ~80% of the step there, where a read of half the bytes can show
providers="ckv dense,$once,ckv quest,flashinfer-tc"
mkdir -p "$OUT/e2e64"
timeout ${E2E64_TIMEOUT:-180} python benchmarks/e2e.py --out "$OUT/e2e64" --models qwen2.5-0.5b-shape \
  --model-path qwen2.5-coder-0.5b --text essays --sizes 32768x64 --providers "${PROVIDERS64:-$providers}" 2>&1 \
  | tee "$OUT/e2e64/log.txt"
