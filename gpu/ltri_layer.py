"""Where ltri's layer time goes, in the layer itself (issue 17's cost shape: seed_methods_cost's B=16, Llama-8B heads,
budget 1,024 tokens): CUDA-graph replays of Quest's layer, ltri's layer, ltri's layer with span_score_select's outputs
precomputed (the layer without scoring and selection), and, on the stage's own inputs, span_score_select (one launch)
against span scoring, span_select and the two in a row (two launches).

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
    """(args, kwargs) of the stage's last span_score_select call (the fused kernel's own inputs)."""
    held, real = {}, select_tk.span_score_select

    def fused(*a, **k):
        held["fused"] = (a, k)
        return real(*a, **k)

    select_tk.span_score_select = fused
    try:
        for _ in range(3):
            pipe.run(q, cache, 0)
    finally:
        select_tk.span_score_select = real
    return held["fused"]


def rows_at(ctx: int, dev) -> list[tuple[str, float]]:
    quest, c, q = smc.build("quest", smc.policies(1024, "attend", None)["quest"], "llama-8b", 16, ctx, dev,
                            torch.bfloat16, "triton")
    t_quest = smc.time_layer(quest, c, q, dev, 20)
    del quest, c
    torch.cuda.empty_cache()
    pipe, cache, q = smc.build("ltri", smc.policies(1024, "attend", None)["ltri"], "llama-8b", 16, ctx, dev,
                               torch.bfloat16, "triton")
    a, k = stage_inputs(pipe, cache, q)
    real = select_tk.span_score_select
    t_ltri = smc.time_layer(pipe, cache, q, dev, 20)
    outputs = real(*a, **k)
    select_tk.span_score_select = lambda *x, **kw: outputs
    try:
        t_without = smc.time_layer(pipe, cache, q, dev, 20)
    finally:
        select_tk.span_score_select = real
    (q_, reps, num_spans, sm_scale, rows), rest, record = a[:5], a[5:12], a[12]
    score = lambda: span_tk.span_scores(q_, reps, num_spans, sm_scale, rows=rows)  # noqa: E731
    scores = score()
    select = lambda: select_tk.span_select(scores, rows, *rest, "group", record)  # noqa: E731
    fused_ms = harness.graph_ms(lambda: real(*a, **k))
    t_score, t_select = harness.graph_ms(score), harness.graph_ms(select)
    t_pair = harness.graph_ms(lambda: select_tk.span_select(score(), rows, *rest, "group", record))
    del pipe, cache
    torch.cuda.empty_cache()
    return [("Quest's layer", t_quest), ("ltri's layer", t_ltri),
            ("ltri's layer, span_score_select's outputs precomputed", t_without),
            ("span_score_select alone (stage inputs)", fused_ms),
            ("span scoring alone", t_score), ("span_select alone", t_select),
            ("span scoring then span_select (two launches)", t_pair)], t_quest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python gpu/ltri_layer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--ctx", default="32768", help="comma-separated context lengths (tokens a request)")
    args = p.parse_args(argv)
    if not all(x.isdigit() and int(x) >= 16 for x in args.ctx.split(",")):
        p.error(f"--ctx: comma-separated token counts of at least one page (16), got {args.ctx!r}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (it times CUDA-graph replays)")
    dev = torch.device("cuda")
    meta = harness.run_meta()
    lines = ["# ltri's layer, piece by piece", "", f"{meta['gpu']}, commit {meta['commit']}, torch {torch.__version__}; "
             f"command: `python gpu/ltri_layer.py OUT --ctx {args.ctx}`. B=16, Llama-8B heads, budget 1,024 tokens, "
             "attend; CUDA-graph replay (seed_methods_cost.time_layer for layers, harness.graph_ms for kernels).", "",
             "| ctx | pages | replayed | us | x Quest's layer |", "|---:|---:|---|---:|---:|"]
    for ctx in map(int, args.ctx.split(",")):
        rows, t_quest = rows_at(ctx, dev)
        for name, t in rows:
            lines.append(f"| {ctx} | {-(-ctx // 16)} | {name} | {t * 1e3:.1f} | {t / t_quest:.3f} |")
            print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ltri_layer.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
