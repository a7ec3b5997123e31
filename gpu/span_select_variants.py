"""ltri's layer with each of several span_select implementations swapped in (an A/B of kernel variants in one run):
the layer next to Quest's, and the kernel alone on the stage's inputs, warm and after a 256 MB read.

    python gpu/span_select_variants.py OUT_DIR --ctx 16384,32768 --variants MODULE[,MODULE...]

MODULE: a module under composable_kv.kernels.span_select with a span_select of the same contract ("triton" is the
shipped kernel). Writes OUT_DIR/span_select_variants.md."""
import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import seed_methods_cost as smc  # noqa: E402
from ltri_layer import checked_contexts, quest_then_ltri, stage_inputs, write_table  # noqa: E402
from composable_kv.kernels.span_select import triton as select_tk  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python gpu/span_select_variants.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--ctx", default="32768")
    p.add_argument("--variants", default="triton")
    args = p.parse_args(argv)
    contexts, dev = checked_contexts(p, args.ctx)
    mods = {v: importlib.import_module(f"composable_kv.kernels.span_select.{v}") for v in args.variants.split(",")}
    meta = harness.run_meta()
    lines = ["# span_select variants in ltri's layer", "", f"{meta['gpu']}, commit {meta['commit']}; command: "
             f"`python gpu/span_select_variants.py OUT --ctx {args.ctx} --variants {args.variants}`. B=16, "
             "Llama-8B heads, budget 1,024 tokens, attend, CUDA-graph replay.", "",
             "| ctx | variant | ltri's layer us | x Quest | alone us | alone after 256 MB read us |",
             "|---:|---|---:|---:|---:|---:|"]
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    for ctx in contexts:
        t_quest, pipe, cache, q = quest_then_ltri(ctx, dev)
        _, a = stage_inputs(pipe, cache, q)
        real = select_tk.span_select
        want = real(*a)
        for name, mod in mods.items():
            got = mod.span_select(*a)
            same = all(torch.equal(x, y) for x, y in zip(want, got))
            t_layer = float("nan")  # a variant whose outputs differ (a cut-down one, for attribution) runs alone only
            select_tk.span_select = mod.span_select if same else real
            try:
                t_layer = smc.time_layer(pipe, cache, q, dev, 20) if same else t_layer
            finally:
                select_tk.span_select = real
            t_alone = harness.graph_ms(lambda: mod.span_select(*a))
            t_cold = harness.graph_ms(lambda: (flush.sum(dtype=torch.int32), mod.span_select(*a)))
            t_read = harness.graph_ms(lambda: flush.sum(dtype=torch.int32))
            lines.append(f"| {ctx} | {name}{'' if same else ' (OUTPUTS DIFFER)'} | {t_layer * 1e3:.1f} | "
                         f"{t_layer / t_quest:.3f} | {t_alone * 1e3:.1f} | {(t_cold - t_read) * 1e3:.1f} |")
            print(lines[-1], flush=True)
        del pipe, cache
        torch.cuda.empty_cache()
    write_table(args.out, "span_select_variants.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
