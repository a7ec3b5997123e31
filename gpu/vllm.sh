#!/usr/bin/env bash
# composable-kv served through vLLM 0.26.0 (issue 16): the CUSTOM backend on the GPU machine.
#
# A device call carries at most 64 MiB, the working tree included, so the vLLM bundle travels in parts sized
# from the tracked tree (39 MiB at 24.9 MB; gpu/parts.sh; ../shared/tools/vllm-bundle.sh splits in 60 MiB: too big).
# Once, on the CPU machine, from the repo root (.devsite/ is git-ignored):
#   ../shared/tools/vllm-bundle.sh        # -> .devsite/vllm-site.tgz (about 30 s; 114.2 MiB on 2026-11-30)
#   bash gpu/vllm.sh split                # -> .devsite/vllm-site.tgz.parts/p00.. (3 for 114.2 MiB)
#                                         #    and .devsite/vllm-site.sha256; prints the calls
#
# Device calls, in a row (each within ~30 s of the last, else the machine starts bare and the parts are gone):
#   1..N. one per part:    carry [".devsite/vllm-site.tgz.parts/pNN"]      command: bash gpu/vllm.sh part pNN
#   N+1.  carry [".devsite/vllm-site.sha256"]  command: bash gpu/vllm.sh unpack
#         (joins the parts and checks the sha256, unpacks to /tmp/vsite, imports vllm)
#   N+2.  bash gpu/vllm.sh smoke   (~6-7 min: 11 small engines. PASS = CUSTOM with the dense policy gives
#         TRITON_ATTN's greedy tokens, eager and with CUDA graphs, on vLLM's V2 and V1 model runners, with
#         chunked prefill mixing decodes and prefills; quest / quest_art captured == eager.)
#         bash gpu/vllm.sh smoke --quick   (~1 min: CUSTOM(dense) against TRITON_ATTN with graphs only)
#   then  bash gpu/vllm.sh bench SPEC...   SPEC: FLASH_ATTN, TRITON_ATTN or CUSTOM:<policy>, one engine each,
#         e.g. bench FLASH_ATTN CUSTOM:dense CUSTOM:quest_art. Decode tokens/s at contexts 16384, 32768 x batches
#         16, 64 (BENCH_ARGS: "--contexts 32768", "--weights real" = the real 32k model over the essays, which
#         needs the model's parts and carry [".devsite/eval-scale-cache.tgz", ".devsite/wheels"] as needle does).
#         $OUT/vllm-bench-<weights>-<contexts>.json/.md, rewritten after each spec; each row x the first spec.
#   Accuracy (issue 16): after the 32k model's parts (`bash gpu/eval_scale.sh part pNN`, one call a part) on the same machine,
#         run carry [".devsite/eval-scale-cache.tgz", ".devsite/wheels"]
#             command: bash gpu/vllm.sh needle SPEC...   (e.g. needle FLASH_ATTN CUSTOM:quest_art; NEEDLE_ARGS: --ctx ...)
#      Each spec: the evaluation at scale's prompts (4 needle tasks x 50, chat template) through vLLM on the real
#      model, greedy; accuracy with Wilson intervals in $OUT/vllm-needle-<ctx>.json/.md (a row per spec).
#   Prefill: CUSTOM runs it in vLLM's FlashAttention 3 where vLLM has it (CKV_VLLM_PREFILL=auto; triton forces
#   vLLM's Triton unified_attention, which made a CUSTOM bench at 32k over 150 s at 8335024).
#   Times seen (H200, 8335024): unpack 33 s; bench FLASH_ATTN at 32k only 139 s; needle FLASH_ATTN 196 s,
#   needle CUSTOM quest_art 307 s with the Triton prefill (model conversion and engine start included).
#   A machine goes back 30 s after a call: send the next call at once, or the parts are gone.
#   Two GPUs (kind nvidia-h200-x2, the same part calls): TP=2 bash gpu/vllm.sh bench FLASH_ATTN CUSTOM:quest_art
#         (tensor_parallel_size=2; the file names end in -tp2).
#   Optional: bash gpu/vllm.sh test   (tests/test_vllm_*.py with vllm importable, on the GPU machine).
# The vLLM site stays in /tmp/vsite while the machine is warm; a bare machine needs the part calls again.
set -euo pipefail
cd "$(dirname "$0")/.."
. gpu/parts.sh  # parts_split / parts_take / parts_join, PARTS (default /tmp/parts)
NAME=vllm-site.tgz
case "${1:-}" in
  split)  # CPU machine: re-split the bundle in parts that fit one call with the working tree
    [ -f ".devsite/$NAME" ] || { echo "no .devsite/$NAME: run ../shared/tools/vllm-bundle.sh first" >&2; exit 1; }
    sha256sum ".devsite/$NAME" | cut -d' ' -f1 > .devsite/vllm-site.sha256
    echo "$NAME: sha256 $(cat .devsite/vllm-site.sha256), parts that fit one call beside the tree:"
    parts_split ".devsite/$NAME"
    echo "device calls: for each pNN: carry [\".devsite/$NAME.parts/pNN\"] command: bash gpu/vllm.sh part pNN"
    echo "  then: carry [\".devsite/vllm-site.sha256\"] command: bash gpu/vllm.sh unpack"
    exit 0
    ;;
  part)  # device: keep one uploaded part
    parts_take "$NAME" "${2:?usage: gpu/vllm.sh part pNN}"
    exit 0
    ;;
esac
OUT=${OUT:-$PWD/vllm-out}
mkdir -p "$OUT"
EP=/tmp/ckv-entry-points
# vLLM finds general plugins through installed distributions' entry points. The tree is not pip-installed
# there, so a two-file dist-info declares pyproject's vllm.general_plugins entry point on PYTHONPATH.
mkdir -p "$EP/composable_kv-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: composable-kv\nVersion: 0.1.0\n' > "$EP/composable_kv-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\ncomposable_kv = composable_kv.integrations.vllm:register\n' \
  > "$EP/composable_kv-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH=/tmp/vsite:$EP:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0
export CKV_COMMIT=${CKV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # the device copy's .git can be stale: pass it
case "${1:-}" in
  unpack)
    [ -f .devsite/vllm-site.sha256 ] || { echo "no .devsite/vllm-site.sha256: carry it with this call" >&2; exit 1; }
    parts_join "$NAME" "$(cat .devsite/vllm-site.sha256)" "/tmp/$NAME"
    rm -rf /tmp/vsite && mkdir -p /tmp/vsite && tar xzf "/tmp/$NAME" -C /tmp/vsite && rm -f "/tmp/$NAME"
    python3 -c "import vllm, vllm.v1.attention.backends.triton_attn; print('vllm', vllm.__version__, 'imports OK')"
    # the entry point as vLLM loads it (every process): CUSTOM must then resolve to our backend
    env -u CKV_POLICY python3 -c "from vllm.plugins import load_general_plugins; load_general_plugins()
from vllm.v1.attention.backends.registry import AttentionBackendEnum as E; print('CUSTOM ->', E.CUSTOM.get_path())"
    ;;
  smoke)
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.csv"
    python3 benchmarks/vllm_serve.py smoke ${2:-} 2>&1 | tee "$OUT/vllm-smoke.log"
    ;;
  bench)
    shift
    [ $# -ge 1 ] || { echo "usage: gpu/vllm.sh bench SPEC... (FLASH_ATTN, CUSTOM:quest_art, ...)" >&2; exit 2; }
    case " ${BENCH_ARGS:-} " in *" --weights real "*) real_model_ready ;; esac
    python3 benchmarks/vllm_serve.py bench "$@" --tp "${TP:-1}" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/vllm-bench.log"
    ;;
  needle)  # after the 32k model's parts (gpu/eval_scale.sh part pNN, same machine);
           # carry [".devsite/eval-scale-cache.tgz", ".devsite/wheels"] (essays, tokenizer, the gguf wheel)
    shift
    [ $# -ge 1 ] || { echo "usage: gpu/vllm.sh needle SPEC... (FLASH_ATTN, CUSTOM:quest_art, ...)" >&2; exit 2; }
    real_model_ready
    python3 benchmarks/vllm_serve.py needle "$@" ${NEEDLE_ARGS:-} 2>&1 | tee -a "$OUT/vllm-needle.log"
    ;;
  test)
    python3 -m pytest -q -rs tests/test_vllm_adapter.py tests/test_vllm_backend.py 2>&1 | tee "$OUT/vllm-tests.log"
    ;;
  *)
    echo "usage: gpu/vllm.sh {split|part pNN|unpack|smoke [--quick]|bench SPEC...|needle SPEC...|test}  (the calls are in this file's header)" >&2
    exit 2
    ;;
esac
