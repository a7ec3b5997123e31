#!/usr/bin/env bash
# Every GPU test file (marker gpu) in one pytest run, spread over 8 workers (pytest-xdist from
# .devsite/wheels when present: Triton compiles dominate and use the CPU cores). Log and junit in $OUT.
set -u
OUT=${OUT:-$PWD/gpu-tests-out}
mkdir -p "$OUT"
if ls .devsite/wheels/pytest_xdist-*.whl >/dev/null 2>&1; then
  pip install --no-index --no-deps --target /tmp/site .devsite/wheels/*.whl >/dev/null 2>&1
fi
N=${GPU_TEST_WORKERS:-8}
XDIST=""
python -c "import xdist" 2>/dev/null && XDIST="-n $N"
OMP_NUM_THREADS=2 python -m pytest -m "gpu and not timing" $XDIST -v -rfE --tb=short -p no:cacheprovider --durations=15 \
  --timeout=150 --junitxml="$OUT/gpu-junit.xml" tests/ ${GPU_TEST_ARGS:-}
rc=$?
# the cost tests time kernels: alone on the GPU, after the others
python -m pytest -m "gpu and timing" -v -rfE --tb=short -p no:cacheprovider --timeout=300 \
  --junitxml="$OUT/gpu-timing-junit.xml" tests/ ${GPU_TEST_ARGS:-} || rc=$?
exit $rc
