"""Compile the fused predictor CNN kernel for a GPU target without a GPU, and print its resources.

    python benchmarks/predictor_cnn_compile.py [--block 64] [--warps 4] [--precision tf32] [--arch 90]

Triton's bundled ptxas builds the cubin; cuobjdump reads registers, stack (spills) and shared memory.
A check that the kernel compiles (mma instructions, no local memory), not a timing.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import triton  # noqa: E402

import harness  # noqa: E402  (benchmarks/harness.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from composable_kv.kernels.predictor_cnn import triton as tk  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--precision", default="tf32", choices=["tf32", "ieee"])
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    k = tk._predictor_cnn_kernel
    const = {"HH": 8, "C1P": 16, "C2P": 32, "BLOCK": args.block, "HAS_DUE": True, "PREC": args.precision}
    ptrs = {"rows_ptr": "*i64", "ptr_ptr": "*i64", "npages_ptr": "*i32", "due_ptr": "*i1"}
    sig = {n: "constexpr" if n in const else ptrs.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in k.arg_names}
    print(f"triton {triton.__version__}, sm_{args.arch}, BLOCK {args.block}, {args.warps} warps, {args.precision}")
    print(harness.compile_report(k, sig, const, arch=args.arch, num_warps=args.warps, name="predictor_cnn"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
