#!/usr/bin/env bash
# Issue 7 (key_shadow) on one GPU; run from the repo root. Results go to $OUT. About 3 minutes (4.5 at most:
# the tests are cut at 110 s, the benchmark at 160 s).
#  1. GPU tests: the shadow kernels vs their references (compiled, fp32 and bf16, GQA 1-8, d 64/128, int8/int4),
#     shadow_select vs reference selection, fused == generic for shadow stacks, and the configs loops of
#     tests/test_kernels_gpu.py restricted to the shadow config (fused == generic, CUDA graph, <= 4 launches).
#  2. Benchmark (benchmarks/layer_bench.py): Llama-3-8B shapes (32 q / 8 KV heads, d128), bf16, page 16, batch 64, 32k
#     context, real K/V from .devsite/traces/smollm2-135m-essays-8k.pt; FlashInfer dense, our quest, quest+art
#     (budgets 512/1024/2048) and quest -> key shadow -> art (int8 with 4x Quest candidates: ckv_swqsa;
#     int4 with 2x: ckv_swqsa4) in the same run. Target 5 in the .md compares each shadow row with the
#     fastest quest+art row of no better accuracy.
set -uo pipefail
OUT=${OUT:-$PWD/key-shadow-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.csv" 2>&1 || true
rc=0
timeout 110 python -m pytest -q -m gpu -x tests/test_key_shadow_gpu.py \
  "tests/test_kernels_gpu.py::test_pipeline_configs_gpu" "tests/test_kernels_gpu.py::test_cuda_graph_replay_equals_eager" \
  "tests/test_kernels_gpu.py::test_at_most_three_launches" -k "shadow" 2>&1 | tee "$OUT/key_shadow_tests.log" || rc=1
TRACE=.devsite/traces/smollm2-135m-essays-8k.pt
if [ ! -f "$TRACE" ]; then
  echo "missing $TRACE (make it with: ckv trace); benchmark skipped" | tee "$OUT/key_shadow_bench.log"
  exit 1
fi
timeout 160 python -m composable_kv.cli bench --trace "$TRACE" --shapes llama3-8b --batches 64 --contexts 32k \
  --budgets 512,1024,2048 --providers fi_dense,ckv_quest,ckv_quest_art,ckv_swqsa,ckv_swqsa4 \
  --warmup-ms 10 --rep-ms 50 --time-limit-s 120 \
  --out-csv "$OUT/key_shadow_bench.csv" --out-md "$OUT/key_shadow_bench.md" --notes /dev/null \
  2>&1 | tee "$OUT/key_shadow_bench.log" || rc=1
exit $rc
