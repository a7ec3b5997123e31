"""Evaluation harness: tasks x policies x context lengths -> accuracy, fidelity and KV bytes read.

Each row records, per generated token, the KV bytes the policy read (K/V pages plus the page
summaries its selectors scored, summed over layers) and that as a fraction of a dense read of the
same pages. Retrieval rows carry accuracy (string-match recall, see ``tasks``); fidelity rows carry
KL(dense || policy) of the next-token distributions, top-1 agreement with dense and perplexity,
from a teacher-forced decode of a continuation of the essays. The dense reference for fidelity is
one forward pass with transformers' own ``sdpa`` attention.

Outputs: a markdown table, a JSON file (rows + how they were made) and a PNG of accuracy against
KV bytes read (needs matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import hf, tasks

__all__ = ["EvalRow", "ProgressBar", "fidelity_metrics", "markdown_table", "run_eval", "write_results"]


@dataclass
class EvalRow:
    policy: str
    task: str
    ctx: int
    samples: int
    accuracy: float | None = None  # retrieval: mean recall in [0, 1]
    kl_vs_dense: float | None = None  # fidelity: mean KL(dense || policy), nats per token
    top1_agreement: float | None = None  # fidelity: argmax agrees with dense
    ppl: float | None = None  # fidelity: perplexity of the true continuation under the policy
    ppl_dense: float | None = None
    kv_bytes_per_token: float = float("nan")  # all layers, K/V pages + summaries
    kv_read_fraction: float = float("nan")  # of a dense read of every page
    pages_per_token: float = float("nan")  # pages read per token, summed over layers and KV heads
    seconds: float = 0.0
    per_depth: dict | None = None  # retrieval: depth -> accuracy


class ProgressBar:
    """A minimal stderr progress bar (no dependency)."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, width: int = 28):
        self.total, self.label, self.enabled, self.width = max(total, 1), label, enabled, width
        self.done, self.start = 0, time.monotonic()
        self._draw()

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total
        filled = int(frac * self.width)
        elapsed = time.monotonic() - self.start
        eta = f" eta {elapsed / frac - elapsed:5.0f}s" if 0 < frac < 1 else ""
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s{eta} {self.label[:48]:<48}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def policy_label(policy) -> str:
    if isinstance(policy, (str, Path)):
        return Path(policy).stem
    if isinstance(policy, dict):
        return str(policy.get("name", "policy"))
    return str(getattr(policy, "name", "policy"))


def fidelity_metrics(policy_logits: torch.Tensor, dense_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """policy_logits, dense_logits: [N, V]; targets: [N] -> per-token sums of KL, agreement, NLL."""
    logp = F.log_softmax(policy_logits.float(), dim=-1)  # [N, V]
    logd = F.log_softmax(dense_logits.float(), dim=-1)  # [N, V]
    kl = (logd.exp() * (logd - logp)).sum(-1).clamp_min(0.0)  # [N]; >= 0 up to rounding
    return {
        "kl_sum": float(kl.sum()),
        "agree_sum": float((logp.argmax(-1) == logd.argmax(-1)).sum()),
        "nll_sum": float(-logp.gather(-1, targets[:, None]).sum()),
        "nll_dense_sum": float(-logd.gather(-1, targets[:, None]).sum()),
        "count": int(targets.numel()),
    }


def _retrieval_row(model, tokenizer, policy, samples: list[tasks.Sample], batch_size: int,
                   bar: ProgressBar, prefill_cache: hf.PrefillCache) -> EvalRow:
    pipeline = hf.compile_policy(policy)
    label = policy_label(policy)
    scores, read, dense, pages, by_depth = [], [], [], [], {}
    start = time.monotonic()
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        out = hf.generate(model, tokenizer, [s.prompt_ids for s in batch], policy=pipeline,
                          max_new_tokens=max(s.max_new_tokens for s in batch),
                          prefill_cache=prefill_cache)
        for s, text, kv, frac, pg in zip(batch, out.texts, out.kv_bytes_per_token, out.kv_read_fraction,
                                         out.pages_per_token):
            score = tasks.score_text(s.answers, text)
            scores.append(score)
            by_depth.setdefault(s.depth, []).append(score)
            read.append(kv)
            dense.append(frac)
            pages.append(pg)
        bar.advance(len(batch))
    return EvalRow(policy=label, task=samples[0].task, ctx=_ctx_of(samples), samples=len(samples),
                   accuracy=_mean(scores), kv_bytes_per_token=_mean(read), kv_read_fraction=_mean(dense),
                   pages_per_token=_mean(pages), seconds=time.monotonic() - start,
                   per_depth={f"{d:g}": _mean(v) for d, v in sorted(by_depth.items())})


def _ctx_of(samples) -> int:
    return samples[0].meta.get("ctx", 0)


def _fidelity_row(model, policy, windows, dense_cache: dict, ctx: int, bar: ProgressBar,
                  prefill_cache: hf.PrefillCache) -> EvalRow:
    pipeline = hf.compile_policy(policy)
    totals = {"kl_sum": 0.0, "agree_sum": 0.0, "nll_sum": 0.0, "nll_dense_sum": 0.0, "count": 0}
    read, frac, pages = [], [], []
    start = time.monotonic()
    for w, (context, continuation) in enumerate(windows):
        key = (ctx, w)
        if key not in dense_cache:
            dense_cache[key] = hf.dense_logits(model, context, continuation)
        logits, steps = hf.teacher_forced_logits(model, context, continuation, pipeline,
                                                 on_step=lambda _: bar.advance(), prefill_cache=prefill_cache)
        targets = torch.tensor(continuation[1:], dtype=torch.long)
        for k, v in fidelity_metrics(logits, dense_cache[key], targets).items():
            totals[k] += v
        read += [s.kv_bytes_read[0] for s in steps]
        frac += [s.kv_bytes_read[0] / s.dense_kv_bytes[0] for s in steps]
        pages += [s.pages_read[0] for s in steps]
    n = max(totals["count"], 1)
    return EvalRow(policy=policy_label(policy), task="fidelity", ctx=ctx, samples=len(windows),
                   kl_vs_dense=totals["kl_sum"] / n, top1_agreement=totals["agree_sum"] / n,
                   ppl=math.exp(totals["nll_sum"] / n), ppl_dense=math.exp(totals["nll_dense_sum"] / n),
                   kv_bytes_per_token=_mean(read), kv_read_fraction=_mean(frac), pages_per_token=_mean(pages),
                   seconds=time.monotonic() - start)


def run_eval(model, tokenizer, policies: Sequence, task_names: Sequence[str], ctxs: Sequence[int], *,
             depths: Sequence[float] = (0.1, 0.5, 0.9), samples_per_depth: int = 1, batch_size: int = 4,
             continuation: int = 32, windows: int = 1, essays: str | None = None, seed: int = 0,
             progress: bool = True, on_row: Callable[[EvalRow], None] | None = None) -> list[EvalRow]:
    """Evaluate every policy on every task at every context length; one row per combination."""
    for t in task_names:
        if t not in tasks.TASKS:
            raise ValueError(f"Unknown task {t!r}; choose from {', '.join(tasks.TASKS)}.")
    max_pos = hf.ModelShape.of(model).max_positions
    for c in ctxs:
        if max_pos is not None and c > max_pos:
            raise hf.ContextTooLongError(f"--ctx {c} exceeds the model's maximum context of {max_pos} tokens.")
    pipelines = [(p, hf.compile_policy(p)) for p in policies]  # fail fast on a bad policy
    if essays is None and any(t != "passkey" for t in task_names):
        from .assets import load_essays
        essays = load_essays()

    work = []  # (task, ctx, samples or windows)
    total = 0
    for t in task_names:
        for c in ctxs:
            if t == "fidelity":
                items = tasks.fidelity_windows(tokenizer, c, continuation=continuation, windows=windows,
                                               essays=essays, seed=seed)
                total += len(items) * continuation * len(pipelines)
            else:
                items = tasks.build_samples(t, tokenizer, c, depths=depths, samples_per_depth=samples_per_depth,
                                            essays=essays, seed=seed)
                for s in items:
                    s.meta["ctx"] = c
                total += len(items) * len(pipelines)
            work.append((t, c, items))

    bar = ProgressBar(total, enabled=progress)
    rows, dense_cache, prefill_cache = [], {}, hf.PrefillCache()  # prefills shared by the policies
    try:
        for t, c, items in work:
            for policy, pipeline in pipelines:
                bar.set_label(f"{t} ctx={c} {policy_label(policy)}")
                if t == "fidelity":
                    row = _fidelity_row(model, policy, items, dense_cache, c, bar, prefill_cache)
                else:
                    row = _retrieval_row(model, tokenizer, policy, items, batch_size, bar, prefill_cache)
                row.policy = policy_label(policy)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            dense_cache.clear()
            prefill_cache.clear()
    finally:
        bar.close()
    return rows


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------

def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(rows: Sequence[EvalRow]) -> str:
    head = ("| policy | task | ctx | n | accuracy | KL vs dense | top-1 agree | ppl (dense) "
            "| KV MB read/token | % KV read | s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ppl = "-" if r.ppl is None else f"{r.ppl:.2f} ({r.ppl_dense:.2f})"
        lines.append(
            f"| {r.policy} | {r.task} | {r.ctx} | {r.samples} | {_fmt(r.accuracy, '.2f')} "
            f"| {_fmt(r.kl_vs_dense, '.4f')} | {_fmt(r.top1_agreement, '.3f')} | {ppl} "
            f"| {_fmt(r.kv_bytes_per_token / 1e6, '.2f')} | {_fmt(100 * r.kv_read_fraction, '.1f')} "
            f"| {r.seconds:.0f} |")
    return "\n".join(lines)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(command: str, device: str, model_name: str) -> dict:
    import transformers

    dev = str(device)
    return {
        "command": command,
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "model": model_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def plot_rows(rows: Sequence[EvalRow], path: Path) -> str | None:
    """PNG of accuracy (fidelity: top-1 agreement) against KV MB read per token. None if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed, so no plot was written (table and JSON were). "
                "Install it with: pip install 'composable-kv[plot]'")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, int], list[EvalRow]] = {}
    for r in rows:
        series.setdefault((r.task, r.ctx), []).append(r)
    for (task, ctx), rs in series.items():
        ys = [r.accuracy if r.accuracy is not None else r.top1_agreement for r in rs]
        xs = [r.kv_bytes_per_token / 1e6 for r in rs]
        ax.plot(xs, ys, "o", label=f"{task} @ {ctx}")
        for x, y, r in zip(xs, ys, rs):
            ax.annotate(r.policy, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KV MB read per generated token (all layers)")
    ax.set_ylabel("accuracy (fidelity: top-1 agreement with dense)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_results(rows: Sequence[EvalRow], out_dir: str | Path, meta: dict, stem: str = "results") -> dict:
    """Write <stem>.md, <stem>.json and <stem>.png into out_dir; return their paths and notes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    md = out / f"{stem}.md"
    md.write_text(f"Command: `{meta.get('command', '')}`  \nDevice: {meta.get('device')} "
                  f"({meta.get('device_name')}), commit {meta.get('commit')}\n\n{table}\n")
    js = out / f"{stem}.json"
    js.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    png = out / f"{stem}.png"
    note = plot_rows(rows, png)
    return {"table": table, "markdown": md, "json": js, "png": None if note else png, "note": note}
