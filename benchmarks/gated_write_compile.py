"""Compile write_gate's decode write kernel (kernels/gated_write) for a GPU target without a GPU; print its resources.

    python benchmarks/gated_write_compile.py [--gate mlp|given|all] [--dtype bf16|fp16|fp32] [--arch 90]

Triton's bundled ptxas builds the cubin; cuobjdump reads registers, stack (spills) and shared memory.
A check that the kernel compiles for the GPU (what the interpreter does not check: types across the
runtime `if`s, register use of one warp), not a timing. Llama-8B shapes: Hkv 8, head_dim 128, pages of 16,
window 256, gate hidden 32.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import triton  # noqa: E402

import harness  # noqa: E402  (benchmarks/harness.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from composable_kv.kernels.gated_write import triton as tk  # noqa: E402

INT64 = {"pos_ptr", "rows_ptr", "kept_ptr", "ng_ptr", "rslot_ptr", "touched_ptr"}
INT32 = {"tab_ptr", "slotpos_ptr"}
CACHE = {"k_ptr", "v_ptr", "kg_ptr", "kc_ptr", "vc_ptr", "kmin_ptr", "kmax_ptr"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gate", default="mlp", choices=["mlp", "given", "all"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16)
    args = p.parse_args(argv)
    k = tk._gated_write_kernel
    D = args.head_dim
    const = {"H": 8, "D": D, "DP": tk._pow2(D), "S": args.page, "SB": min(args.page, 16), "HID": 32, "HIDP": 32,
             "WBLOCK": 256, "GATE": {"all": tk.GATE_ALL, "given": tk.GATE_GIVEN, "mlp": tk.GATE_MLP}[args.gate],
             "HAS_MINMAX": True, "HAS_VNORM": True, "WRITE_G": False}

    def kind(n):
        if n in const:
            return "constexpr"
        if n in INT64:
            return "*i64"
        if n in INT32:
            return "*i32"
        if n == "radmit_ptr":
            return "*i1"
        if n in CACHE:
            return f"*{args.dtype}"
        if n.endswith("_ptr"):
            return "*fp32"
        return "fp32" if n == "threshold" else "i32"
    sig = {n: kind(n) for n in k.arg_names}
    print(f"triton {triton.__version__}, sm_{args.arch}, gate {args.gate}, {args.dtype}, head_dim {D}, "
          f"page {args.page}, 1 warp")
    print(harness.compile_report(k, sig, const, arch=args.arch, num_warps=1, name="gated_write"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
