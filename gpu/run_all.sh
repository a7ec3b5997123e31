#!/usr/bin/env bash
# Run GPU parts in one device call: `bash gpu/run_all.sh core:120 key_shadow ...` (each part is gpu/<part>.sh,
# with an optional time limit in seconds after the colon, else PART_TIMEOUT_S, default 240 s).
# Each part gets its own $OUT/<part>/; a failing part
# does not stop the others. Needs .devsite/flashinfer-py312.tgz (../shared/tools/device-bundle.sh).
set -u
ROOT_OUT="${OUT:-/tmp/ckv-out}"
mkdir -p "$ROOT_OUT" /tmp/site
if [ -f .devsite/flashinfer-py312.tgz ] && [ ! -d /tmp/site/flashinfer ]; then
  tar xzf .devsite/flashinfer-py312.tgz -C /tmp/site
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$ROOT_OUT/gpu.txt"
git rev-parse --short HEAD > "$ROOT_OUT/commit.txt" 2>/dev/null || true  # the device copy's .git can be stale: pass CKV_COMMIT
for spec in "$@"; do
  part="${spec%%:*}"
  limit="${PART_TIMEOUT_S:-240}"
  [ "$spec" != "$part" ] && limit="${spec#*:}"
  export OUT="$ROOT_OUT/$part"
  mkdir -p "$OUT"
  start=$(date +%s)
  timeout "$limit" bash "gpu/$part.sh" > "$OUT/log.txt" 2>&1
  rc=$?
  echo "$part rc=$rc $(( $(date +%s) - start ))s" | tee -a "$ROOT_OUT/summary.txt"
  tail -n 5 "$OUT/log.txt"
done
# Few files come back from a device call: pack the parts into one archive.
(cd "$ROOT_OUT" && tar czf parts.tgz --exclude=parts.tgz */ && rm -rf -- */)
