"""Issue 14's second Pareto: mean task accuracy against end-to-end decode tokens/s, at one context.

    python benchmarks/art_speed_pareto.py --e2e benchmarks/e2e/qwen2.5-coder-0.5b-real-essays-32k-art.json \\
        --ctx 32768 --out benchmarks/art/pareto/speed-32768

Speed: an `e2e.py` JSON (one batch size, one context); its `ckv <policy>` providers are named as the policy
compiles (`ckv dense` -> dense, `ckv <config>.yaml` -> its `name`), its other providers (FlashInfer-TC,
transformers) decode dense attention and take dense's accuracy. Accuracy: the evaluation at scale's rows at
`--ctx` (benchmarks/eval_scale/ and benchmarks/art/pareto/ scale-*.json; the same prompts, n = 50 per task).
A provider with no accuracy row at that context is listed and left off the plot. Writes <out>.md and <out>.png.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from composable_kv import hf  # noqa: E402
from composable_kv.eval import scale  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import e2e  # noqa: E402  (benchmarks/e2e.py: its providers' policies)

DENSE_MATH = ("flashinfer-tc", "flashinfer", "transformers")  # providers that decode dense attention


def policy_name(provider: str) -> str | None:
    """The accuracy row's policy name: as e2e.py resolves the provider (`ckv quest` there is Quest 2048)."""
    if provider.startswith("ckv "):
        return hf.compile_policy(e2e.POLICIES.get(provider, provider[len("ckv "):])).name
    return "dense" if provider in DENSE_MATH else None


def rows_of(e2e_path: str, ctx: int, scale_files: list[str]):
    """-> ([(label, policy, tok/s, x dense, KV GB a step, mean accuracy or None)], e2e meta, B, context)."""
    doc = json.loads(Path(e2e_path).read_text())
    e2e = doc["rows"]
    sizes = {(r["batch"], r["context"]) for r in e2e}
    if len(sizes) != 1:
        sys.exit(f"--e2e: expected one batch size and context, found {sorted(sizes)}; split the file")
    results = scale.load_results(scale_files)
    if ctx not in results:
        sys.exit(f"--ctx {ctx}: no accuracy rows at that context in {len(scale_files)} scale files")
    summary = scale.policy_summary(results[ctx]["rows"], scale.SCALE_TASKS)
    dense = next((r["tokens_per_s"] for r in e2e if r["provider"] == "ckv dense"), None)
    out = []
    for r in e2e:
        name = policy_name(r["provider"])
        s = summary.get(name) if name else None
        acc = s["mean_acc"] if s and s["complete"] else None
        label = name if r["provider"].startswith("ckv ") else f"{r['provider']} (dense)"
        out.append((label, name, r["tokens_per_s"], r["tokens_per_s"] / dense if dense else None,
                    r["kv_gb_per_step"], acc))
    (B, context), = sizes
    return out, doc["meta"], B, context


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e2e", required=True, help="an e2e.py JSON (one batch size and context)")
    ap.add_argument("--ctx", type=int, required=True, help="the evaluation at scale's context for the accuracy")
    ap.add_argument("--scale", action="append", help="scale-*.json files (default: benchmarks/eval_scale/ and "
                                                      "benchmarks/art/pareto/)")
    ap.add_argument("--out", required=True, help="output stem: writes <out>.md and <out>.png")
    args = ap.parse_args(argv)
    files = args.scale or sorted(glob.glob(str(ROOT / "benchmarks/eval_scale/scale-*.json"))
                                 + glob.glob(str(ROOT / "benchmarks/art/pareto/scale-*.json")))
    rows, meta, B, context = rows_of(args.e2e, args.ctx, files)
    lines = [f"# Accuracy against end-to-end decode speed, {args.ctx} tokens", "",
             f"Speed: `{Path(args.e2e).name}` ({meta.get('gpu', '')}, commit {meta.get('commit')}, B = {B}, "
             f"{context} tokens of context). Accuracy: the evaluation at scale at {args.ctx} tokens (7 tasks, "
             "n = 50 each; benchmarks/art/PARETO.md). Command: `python benchmarks/art_speed_pareto.py "
             f"--e2e {args.e2e} --ctx {args.ctx} --out {args.out}`.", "",
             "| provider | tok/s | x ours dense | KV GB a step | mean accuracy |", "|---|---:|---:|---:|---:|"]
    for label, _, tps, x, gb, acc in sorted(rows, key=lambda r: -r[2]):
        lines.append(f"| {label} | {tps:,.0f} | {x:.2f} | {gb:.2f} | {'%.3f' % acc if acc is not None else 'no row'} |")
    placed = [r for r in rows if r[5] is not None]
    note = scale.frontier_plot([r[0] for r in placed], [r[2] for r in placed], [r[5] for r in placed],
                               Path(args.out + ".png"), xlabel="decode tokens/s, end to end (log scale)",
                               title=f"accuracy at {args.ctx} tokens against speed at B = {B}",
                               higher_x_better=True)
    lines += ["", f"![accuracy against tokens/s]({Path(args.out).name}.png)"] + ([f"", note] if note else [])
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
