"""Pareto plot of the key-shadow evaluation (EVALUATION.md): KL to dense and needle accuracy against the
KV bytes read per token, from the eval.json files `ckv eval` wrote.

    python benchmarks/key_shadow/pareto.py OUT.png RUN1.json [RUN2.json ...]
"""
import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out, *runs):
    rows = [r for path in runs for r in json.load(open(path))["rows"]]
    ctxs = sorted({r["ctx"] for r in rows})
    fig, axes = plt.subplots(2, len(ctxs), figsize=(6 * len(ctxs), 7.5), squeeze=False)
    for j, ctx in enumerate(ctxs):
        for i, (task, key, label) in enumerate((("fidelity", "kl_vs_dense", "KL(dense || policy), nats/token"),
                                                ("niah_single", "accuracy", "needle accuracy"))):
            ax = axes[i][j]
            pts = defaultdict(list)
            for r in rows:
                if r["ctx"] == ctx and r["task"] == task and r[key] is not None:
                    pts[r["policy"]] = (r["kv_bytes_per_token"] / 1e6, r[key])
            for n, (name, (x, y)) in enumerate(sorted(pts.items(), key=lambda t: t[1])):
                shadow = "shadow" in name or name.startswith("swqs")
                ax.plot([x], [y], "o" if shadow else "s", color="tab:red" if shadow else "tab:blue")
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3 - 9 * (n % 3)), fontsize=7)
            ax.set_title(f"{task} @ {ctx} tokens (red: key shadow, blue: Quest only)", fontsize=9)
            ax.set_xlabel("KV MB read per generated token (all layers, summaries and shadow included)", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            if key == "accuracy":
                ax.set_ylim(-0.05, 1.05)
            else:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
