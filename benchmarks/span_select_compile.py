"""Compile ltri's selection kernel (kernels/span_select) for a GPU target without a GPU, and print its code size and
resources per row width and warps.

    python benchmarks/span_select_compile.py [--widths 1024,2048,4096] [--warps 8,16] [--group 4] [--arch 90]

In the stage's layer the kernel starts with its code evicted from the L2 by the reads before it, and that costs more
than its arithmetic (benchmarks/seed_methods/span_select_experiments-2026-11-30.md, section 6): the SASS instruction
count is the figure to bring down. Triton's bundled ptxas builds the cubin; cuobjdump reads the rest. Not a timing.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import triton  # noqa: E402

import harness  # noqa: E402  (benchmarks/harness.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from composable_kv.kernels.page_select.triton import sort_block_for  # noqa: E402
from composable_kv.kernels.span_select import triton as tk  # noqa: E402

POINTERS = {"score_ptr": "*fp32", "votes_ptr": "*fp32", "wv_ptr": "*fp32", "best_ptr": "*fp32", "key_ptr": "*fp32",
            "sortk_ptr": "*i64", "row_ptr": "*i64", "sop_ptr": "*i64", "cov_ptr": "*i64", "forced_ptr": "*u8",
            "cand_ptr": "*u8", "kept_ptr": "*i8", "forced_out_ptr": "*i8"}


def report(width: int, warps: int, group: int, arch: int, budget: int = 64, window: int = tk.WINDOW) -> str:
    """The compile report of span_select at `width` pages and span slots (a power of two), the group vote."""
    k = tk._span_select_kernel
    const = {"HKV": 8, "G": group, "GP": tk._pow2(group), "NSP": width, "PP": width,
             "SORT_BLOCK": sort_block_for(budget + window, width), "W": min(window, width),
             "PACK": width.bit_length(), "LAYER": False, "RECORD": True}
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "*i32" if n.endswith("_ptr") else "i32")
           for n in k.arg_names}
    return harness.compile_report(k, sig, const, arch=arch, num_warps=warps, name=f"span_select_{width}_{warps}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="1024,2048,4096", help="comma-separated row widths (powers of two >= 16)")
    p.add_argument("--warps", default="8,16", help="comma-separated warp counts")
    p.add_argument("--group", type=int, default=4, help="query heads a KV head (Llama-8B: 4)")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
        warps = [int(w) for w in args.warps.split(",")]
    except ValueError:
        p.error(f"--widths and --warps take comma-separated integers, got {args.widths!r} and {args.warps!r}")
    if any(w < 16 or w & (w - 1) for w in widths) or any(w < 1 or w & (w - 1) for w in warps):
        p.error(f"--widths: powers of two >= 16, --warps: powers of two, got {args.widths!r} and {args.warps!r}")
    print(f"triton {triton.__version__}, sm_{args.arch}, group vote, G={args.group}, 8 KV heads, budget 64 pages")
    for width in widths:
        for w in warps:
            print(f"\n## {width} wide, {w} warps\n{report(width, w, args.group, args.arch)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
