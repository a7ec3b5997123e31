"""Where ltri's layer time goes, in the layer itself (issue 17's cost shape: seed_methods_cost's B=16, Llama-8B heads,
budget 1,024 tokens): CUDA-graph replays of Quest's layer, ltri's layer, ltri's layer with span_select's outputs
precomputed (the layer without the selection kernel), and span scoring, span_select and the two in a row on the
stage's own inputs.

    python gpu/ltri_layer.py OUT_DIR [--ctx 32768,32784]

Writes OUT_DIR/ltri_layer.md (GPU, commit, command in its head)."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402
import seed_methods_cost as smc  # noqa: E402
from composable_kv.kernels.span_score import triton as span_tk  # noqa: E402
from composable_kv.kernels.span_select import triton as select_tk  # noqa: E402


def stage_inputs(pipe, cache, q):
    """(span_scores args, kwargs), span_select args of the stage's last decode step (the kernels' own inputs)."""
    held, real_select, real_score = {}, select_tk.span_select, span_tk.span_scores

    def select(*a, **k):
        held["select"] = a
        return real_select(*a, **k)

    def score(*a, **k):
        held["score"] = (a, k)
        return real_score(*a, **k)

    select_tk.span_select, span_tk.span_scores = select, score
    try:
        for _ in range(3):
            pipe.run(q, cache, 0)
    finally:
        select_tk.span_select, span_tk.span_scores = real_select, real_score
    return held["score"], held["select"]


def quest_then_ltri(ctx: int, dev):
    """Quest's layer time (ms) at the cost shape, then ltri's layer built there: (t_quest, pipe, cache, q)."""
    quest, c, q = smc.build("quest", smc.policies(1024, "attend", None)["quest"], "llama-8b", 16, ctx, dev,
                            torch.bfloat16, "triton")
    t_quest = smc.time_layer(quest, c, q, dev, 20)
    del quest, c
    torch.cuda.empty_cache()
    pipe, cache, q = smc.build("ltri", smc.policies(1024, "attend", None)["ltri"], "llama-8b", 16, ctx, dev,
                               torch.bfloat16, "triton")
    return t_quest, pipe, cache, q


def write_table(out_dir: str, name: str, lines: list[str]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("\n".join(lines) + "\n")


def rows_at(ctx: int, dev) -> list[tuple[str, float]]:
    t_quest, pipe, cache, q = quest_then_ltri(ctx, dev)
    (sa, sk), a = stage_inputs(pipe, cache, q)
    real = select_tk.span_select
    t_ltri = smc.time_layer(pipe, cache, q, dev, 20)
    outputs = real(*a)
    select_tk.span_select = lambda *x, **k: outputs
    try:
        t_without = smc.time_layer(pipe, cache, q, dev, 20)
    finally:
        select_tk.span_select = real
    t_score = harness.graph_ms(lambda: span_tk.span_scores(*sa, **sk))
    t_select = harness.graph_ms(lambda: real(*a))
    t_pair = harness.graph_ms(lambda: real(span_tk.span_scores(*sa, **sk), *a[1:]))
    del pipe, cache
    torch.cuda.empty_cache()
    return [("Quest's layer", t_quest), ("ltri's layer", t_ltri),
            ("ltri's layer, span_select's outputs precomputed", t_without),
            ("span scoring alone (stage inputs)", t_score), ("span_select alone (stage inputs)", t_select),
            ("span scoring then span_select", t_pair)], t_quest


def checked_contexts(p: argparse.ArgumentParser, ctx: str) -> tuple[list[int], torch.device]:
    """--ctx as token counts and the CUDA device, or p.error (one line) before anything is built."""
    if not all(x.isdigit() and int(x) >= 16 for x in ctx.split(",")):
        p.error(f"--ctx: comma-separated token counts of at least one page (16), got {ctx!r}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (it times CUDA-graph replays)")
    return [int(x) for x in ctx.split(",")], torch.device("cuda")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python gpu/ltri_layer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--ctx", default="32768", help="comma-separated context lengths (tokens a request)")
    args = p.parse_args(argv)
    contexts, dev = checked_contexts(p, args.ctx)
    meta = harness.run_meta()
    lines = ["# ltri's layer, piece by piece", "", f"{meta['gpu']}, commit {meta['commit']}, torch {torch.__version__}; "
             f"command: `python gpu/ltri_layer.py OUT --ctx {args.ctx}`. B=16, Llama-8B heads, budget 1,024 tokens, "
             "attend; CUDA-graph replay (seed_methods_cost.time_layer for layers, harness.graph_ms for kernels).", "",
             "| ctx | pages | replayed | us | x Quest's layer |", "|---:|---:|---|---:|---:|"]
    for ctx in contexts:
        rows, t_quest = rows_at(ctx, dev)
        for name, t in rows:
            lines.append(f"| {ctx} | {-(-ctx // 16)} | {name} | {t * 1e3:.1f} | {t / t_quest:.3f} |")
            print(lines[-1], flush=True)
    write_table(args.out, "ltri_layer.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
