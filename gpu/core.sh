#!/usr/bin/env bash
# The core kernels' GPU tests (large grids, bf16, CUDA graph replay, launch count).
set -eu
python -m pytest -v --tb=short -m gpu tests/test_kernels_gpu.py -p no:cacheprovider --durations=15 --junitxml="$OUT/core-junit.xml"
