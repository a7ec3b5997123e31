#!/usr/bin/env bash
# Issue 14, part 4: each selector X against X+ART under each stop, on the 32k model (Qwen2.5-Coder-0.5B-Instruct),
# with the tasks, n and prompts of the evaluation at scale (gpu/eval_scale.sh). X in {dense, streaming (sink +
# window), snapkv, quest 1024, quest 2048}; stops: certified, the paper's stability (fp32 / bf16 running output),
# calibrated (0.02 / 0.05 / 0.1 / 0.2; and with `calibrate: recent` at 0.005 / 0.01 / 0.02); plus a wide Quest (4096) whose calibrated stop adapts the pages per head.
#
# The rows of dense, dense-art, streaming, snapkv, snapkv-art, quest, quest-art and quest-art-calibrated come from
# the evaluation at scale (benchmarks/eval_scale/); this script runs only the 33 other policies
# (benchmarks/art/configs/), so the model must be on the GPU machine first (gpu/eval_scale.sh, steps 1-2).
#
#   GPU (one call per context; 8k ~4 min, 16k ~7 min, 32k ~14 min for all tasks):
#       carry [".devsite/eval-scale-cache.tgz", ".devsite/wheels"]
#       command: CKV_COMMIT=<commit> bash gpu/art_pareto.sh run 8192
#   Here: bash gpu/art_pareto.sh report <files_at>/scale-*.json   (no files: the rows already in benchmarks/)
#       copies the files to benchmarks/art/pareto/ and writes benchmarks/art/PARETO.md (tables, X vs X+ART lines,
#       one accuracy-bytes plot per context in benchmarks/art/pareto/).
# Environment: as gpu/eval_scale.sh (EVAL_SCALE_ARGS adds flags, e.g. "--task passkey --task niah_multikey");
# ART_POLICIES="quest2048 dense_art_calibrated_0.1 ..." runs only those of the configs below.
set -euo pipefail
NEW=(dense_art_natural_fp32 dense_art_natural_bf16 dense_art_calibrated_0.02 dense_art_calibrated_0.05
     streaming_art_natural_bf16 streaming_art_calibrated_0.02 snapkv_art_bf16 snapkv_art_calibrated_0.02
     quest_art_stability_bf16 quest_art_calibrated_0.05 quest2048 quest2048_art_certified
     quest2048_art_calibrated_0.02 quest2048_art_calibrated_0.05 quest2048_art_calibrated_0.1
     quest2048_art_calibrated_0.2 quest4096_art_calibrated_0.05 dense_art_calibrated_0.1 dense_art_calibrated_0.2
     dense_art_calibrated_recent_0.005 dense_art_calibrated_recent_0.01 dense_art_calibrated_recent_0.02
     quest2048_art_calibrated_recent_0.005 quest2048_art_calibrated_recent_0.01 quest2048_art_calibrated_recent_0.02
     dense_art_calibrated_0.1_chunk16 dense_art_calibrated_0.2_chunk16 dense_art_calibrated_0.2_chunk8
     dense_art_calibrated_0.3_chunk16 dense_art_calibrated_recent_0.01_chunk16 dense_art_calibrated_once_0.02_chunk16
     dense_art_calibrated_once_0.05_chunk16 dense_art_calibrated_once_0.1_chunk16
     dense_art_calibrated_once_0.2_chunk16 dense_art_calibrated_once_0.3_chunk16)
BASES=(dense dense-art streaming snapkv snapkv-art quest quest-art quest-art-calibrated)
PAIRS=(dense:dense-art dense:dense+art-natural-fp32 dense:dense+art-natural-bf16 dense:dense-art-cal-0.02
       dense:dense-art-cal-0.05 dense:dense-art-cal-0.1 dense:dense-art-cal-0.2 streaming:streaming+art-natural-bf16 streaming:streaming-art-cal-0.02
       snapkv:snapkv-art snapkv:snapkv+art-bf16 snapkv:snapkv-art-cal-0.02 quest:quest-art
       quest:quest-art-calibrated quest:quest-art-cal-0.05 quest:quest-art-stab-bf16
       quest-2048:quest-2048-art-cert quest-2048:quest-2048-art-cal-0.02 quest-2048:quest-2048-art-cal-0.05
       quest-2048:quest-2048-art-cal-0.1 quest-2048:quest-2048-art-cal-0.2 quest-2048:quest-4096-art-cal-0.05
       dense:dense-art-cal-recent-0.005 dense:dense-art-cal-recent-0.01 dense:dense-art-cal-recent-0.02
       quest-2048:quest-2048-art-cal-recent-0.005 quest-2048:quest-2048-art-cal-recent-0.01
       quest-2048:quest-2048-art-cal-recent-0.02 dense:dense-art-cal-0.1-c16 dense:dense-art-cal-0.2-c16
       dense:dense-art-cal-0.2-c8 dense:dense-art-cal-0.3-c16 dense:dense-art-cal-recent-0.01-c16
       dense:dense-art-cal-once-0.02-c16 dense:dense-art-cal-once-0.05-c16 dense:dense-art-cal-once-0.1-c16
       dense:dense-art-cal-once-0.2-c16 dense:dense-art-cal-once-0.3-c16)
RESULTS=${RESULTS:-benchmarks/art/pareto}
REPORT=${REPORT:-benchmarks/art/PARETO.md}

case "${1:-}" in
  run)
    shift
    flags=""
    read -r -a run_set <<< "${ART_POLICIES:-${NEW[*]}}"
    for c in "${run_set[@]}"; do flags+=" --policy benchmarks/art/configs/$c.yaml"; done
    OUT=${OUT:-$PWD/art-pareto-out} EVAL_SCALE_ARGS="$flags ${EVAL_SCALE_ARGS:-}" bash gpu/eval_scale.sh run "$@" ;;
  report)
    shift
    mkdir -p "$RESULTS"  # no files: a report of the evaluation at scale's rows alone
    for f in "$@"; do
      [ "$(realpath "$f")" = "$(realpath -m "$RESULTS/$(basename "$f")")" ] || cp "$f" "$RESULTS/"
    done
    names=$(python - "${NEW[@]}" <<'PY'
import sys
import composable_kv as ckv
print(" ".join(ckv.compile(f"benchmarks/art/configs/{c}.yaml").name for c in sys.argv[1:]))
PY
)
    only=()
    for n in $names "${BASES[@]}"; do only+=(--only "$n"); done
    pairs=()
    for p in "${PAIRS[@]}"; do pairs+=(--pair "$p"); done
    shopt -s nullglob
    python -m composable_kv.eval.scale report benchmarks/eval_scale/scale-*.json "$RESULTS"/scale-*.json \
      --evaluation "$REPORT" --plots "$RESULTS" "${only[@]}" "${pairs[@]}" ;;
  *) echo "usage: bash gpu/art_pareto.sh run CTX... | report FILES... (see the header)" >&2; exit 2 ;;
esac
