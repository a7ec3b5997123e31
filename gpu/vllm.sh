#!/usr/bin/env bash
# composable-kv served through vLLM 0.26.0 (issue 16): the CUSTOM backend on the GPU machine.
#
# Once, on the CPU machine, from the repo root (about 20 s; .devsite/ is git-ignored):
#   ../shared/tools/vllm-bundle.sh                        # -> .devsite/vllm-site.tgz.parts/p00, p01 (2 x <= 60 MiB)
#   sha256sum .devsite/vllm-site.tgz | cut -d' ' -f1 > .devsite/vllm-site.sha256
#
# Device calls, in a row (each within ~30 s of the last, else the machine starts bare and the parts are gone):
#   1. run carry [".devsite/vllm-site.tgz.parts/p00"]
#          command: mkdir -p /tmp/parts && cp .devsite/vllm-site.tgz.parts/p00/* /tmp/parts/
#   2. run carry [".devsite/vllm-site.tgz.parts/p01", ".devsite/vllm-site.sha256"]
#          command: mkdir -p /tmp/parts && cp .devsite/vllm-site.tgz.parts/p01/* /tmp/parts/ && gpu/vllm.sh unpack && gpu/vllm.sh smoke
#      (~4-5 min: 8 small engines. PASS = CUSTOM with the dense policy gives TRITON_ATTN's greedy tokens, eager and
#       with CUDA graphs; quest / quest_art captured == eager.)
#   3-7. run command: gpu/vllm.sh bench TRITON_ATTN                  (timeout_s 600; one backend per call)
#        run command: gpu/vllm.sh bench FLASH_ATTN
#        run command: gpu/vllm.sh bench CUSTOM dense
#        run command: gpu/vllm.sh bench CUSTOM quest
#        run command: gpu/vllm.sh bench CUSTOM quest_art
#      Each: decode tokens/s at contexts 16384, 32768 x batches 16, 64 (random model with Qwen2.5-Coder-0.5B's
#      shape, bf16, CUDA graphs, 128 new tokens), markdown rows on stdout, JSON in $OUT/vllm-bench-*.json.
#   Optional: gpu/vllm.sh test   (the CPU-side tests of the integration, with vllm importable, on CUDA).
# The vLLM site stays in /tmp/vsite while the machine is warm; a bare machine needs calls 1-2 again.
set -euo pipefail
cd "$(dirname "$0")/.."
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
export CKV_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
case "${1:-}" in
  unpack)
    n=$(ls /tmp/parts/vllm-site.tgz.part* | wc -l)
    [ "$n" -eq 2 ] || { echo "expected 2 parts in /tmp/parts, found $n: the machine was new, start at call 1" >&2; exit 1; }
    cat /tmp/parts/vllm-site.tgz.part* > /tmp/vllm-site.tgz
    echo "$(cat .devsite/vllm-site.sha256)  /tmp/vllm-site.tgz" | sha256sum -c
    mkdir -p /tmp/vsite && tar xzf /tmp/vllm-site.tgz -C /tmp/vsite
    python3 -c "import vllm, vllm.v1.attention.backends.triton_attn; print('vllm', vllm.__version__, 'imports OK')"
    ;;
  smoke)
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.csv"
    python3 benchmarks/vllm_serve.py smoke 2>&1 | tee "$OUT/vllm-smoke.log"
    ;;
  bench)
    backend=${2:?usage: gpu/vllm.sh bench BACKEND [POLICY]}
    python3 benchmarks/vllm_serve.py bench "$backend" --policy "${3:-dense}" 2>&1 | tee "$OUT/vllm-bench-$backend-${3:-}.log"
    ;;
  test)
    python3 -m pytest -q -rs tests/test_vllm_adapter.py tests/test_vllm_backend.py 2>&1 | tee "$OUT/vllm-tests.log"
    ;;
  *)
    echo "usage: gpu/vllm.sh {unpack|smoke|bench BACKEND [POLICY]|test}  (the device calls are in this file's header)" >&2
    exit 2
    ;;
esac
