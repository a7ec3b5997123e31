"""Compile the fused predictor CNN kernel for a GPU target without a GPU, and print its resources.

    python benchmarks/predictor_cnn_compile.py [--block 64] [--warps 4] [--precision tf32] [--arch 90]

Triton's bundled ptxas builds the cubin; cuobjdump reads registers, stack (spills) and shared memory.
A check that the kernel compiles (mma instructions, no local memory), not a timing.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

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
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(c),): v for c, v in const.items()})
    cc = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": args.warps})
    ptx = cc.asm["ptx"]
    cubin = Path(tempfile.mkdtemp()) / "predictor_cnn.cubin"
    cubin.write_bytes(cc.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    print(f"triton {triton.__version__}, sm_{args.arch}, BLOCK {args.block}, {args.warps} warps, {args.precision}")
    print("mma:", sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx))) or "none")
    print("local memory ops in PTX:", ptx.count("ld.local") + ptx.count("st.local"), "; dynamic shared bytes:",
          cc.metadata.shared)
    print(usage.strip().splitlines()[-1].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
