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

from .. import hf
from . import tasks

__all__ = ["EvalRow", "ProgressBar", "answers_table", "fidelity_metrics", "markdown_table", "run_eval",
           "wilson_interval", "write_results"]


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
    outputs: list[dict] | None = None  # retrieval: per sample {depth, expected, output, score}


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


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for z = 1.96) of a proportion ``p`` observed over ``n`` samples."""
    if n <= 0 or math.isnan(p):
        return float("nan"), float("nan")
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


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


def _retrieval_row(model, tokenizer, pipeline, samples: list[tasks.Sample], batch_size: int,
                   bar: ProgressBar, prefill_cache: hf.PrefillCache) -> EvalRow:
    scores, read, dense, pages, by_depth, outputs = [], [], [], [], {}, []
    start = time.monotonic()
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        out = hf.generate(model, tokenizer, [s.prompt_ids for s in batch], policy=pipeline,
                          max_new_tokens=max(s.max_new_tokens for s in batch),
                          prefill_cache=prefill_cache)
        for s, text, kv, frac, pg in zip(batch, out.texts, out.kv_bytes_per_token, out.kv_read_fraction,
                                         out.pages_per_token):
            score = tasks.score_sample(s, text)
            scores.append(score)
            by_depth.setdefault(s.depth, []).append(score)
            outputs.append({"depth": s.depth, "expected": list(s.answers), "output": text, "score": score})
            read.append(kv)
            dense.append(frac)
            pages.append(pg)
        bar.advance(len(batch))
    return EvalRow(policy=pipeline.name, task=samples[0].task, ctx=_ctx_of(samples), samples=len(samples),
                   accuracy=_mean(scores), kv_bytes_per_token=_mean(read), kv_read_fraction=_mean(dense),
                   pages_per_token=_mean(pages), seconds=time.monotonic() - start,
                   per_depth={f"{d:g}": _mean(v) for d, v in sorted(by_depth.items())}, outputs=outputs)


def _ctx_of(samples) -> int:
    return samples[0].meta.get("ctx", 0)


def _fidelity_row(model, pipeline, windows, dense_cache: dict, ctx: int, bar: ProgressBar,
                  prefill_cache: hf.PrefillCache) -> EvalRow:
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
    return EvalRow(policy=pipeline.name, task="fidelity", ctx=ctx, samples=len(windows),
                   kl_vs_dense=totals["kl_sum"] / n, top1_agreement=totals["agree_sum"] / n,
                   ppl=math.exp(totals["nll_sum"] / n), ppl_dense=math.exp(totals["nll_dense_sum"] / n),
                   kv_bytes_per_token=_mean(read), kv_read_fraction=_mean(frac), pages_per_token=_mean(pages),
                   seconds=time.monotonic() - start)


def check_eval_args(*, samples_per_depth: int = 1, batch_size: int = 1, continuation: int = 1, windows: int = 1,
                    depths: Sequence[float] = (0.5,), ctxs: Sequence[int] = (1,)) -> None:
    """Refuse settings that cannot run, naming the flag (before any model is loaded)."""
    for flag, value in (("--samples-per-depth", samples_per_depth), ("--batch-size", batch_size),
                        ("--continuation", continuation), ("--windows", windows), *(("--ctx", c) for c in ctxs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}.")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths must be numbers in [0, 1], got {list(depths)}.")


def run_eval(model, tokenizer, policies: Sequence, task_names: Sequence[str], ctxs: Sequence[int], *,
             depths: Sequence[float] = (0.1, 0.5, 0.9), samples_per_depth: int = 1, batch_size: int = 4,
             continuation: int = 32, windows: int = 1, essays: str | None = None, seed: int = 0,
             prompt_format: str = "plain", progress: bool = True,
             on_row: Callable[[EvalRow], None] | None = None) -> list[EvalRow]:
    """Evaluate every policy on every task at every context length; one row per combination.

    Rows name each policy by its YAML ``name:``; every policy of a run replays the same dense prefills."""
    check_eval_args(samples_per_depth=samples_per_depth, batch_size=batch_size, continuation=continuation,
                    windows=windows, depths=depths, ctxs=ctxs)
    for t in task_names:
        if t not in tasks.TASKS:
            raise ValueError(f"Unknown task {t!r}; choose from {', '.join(tasks.TASKS)}.")
    max_pos = hf.ModelShape.of(model).max_positions
    for c in ctxs:
        if max_pos is not None and c > max_pos:
            raise hf.ContextTooLongError(f"--ctx {c} exceeds the model's maximum context of {max_pos} tokens.")
    pipelines = [hf.compile_policy(p) for p in policies]  # fail fast on a bad policy
    check_distinct_names(policies, pipelines)
    if essays is None and any(tasks.needs_essays(t) for t in task_names):
        from ..assets import load_essays
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
                                            essays=essays, seed=seed, prompt_format=prompt_format)
                for s in items:
                    s.meta["ctx"] = c
                total += len(items) * len(pipelines)
            work.append((t, c, items))

    bar = ProgressBar(total, enabled=progress)
    rows, dense_cache, prefill_cache = [], {}, hf.PrefillCache()  # prefills shared by the policies
    try:
        for t, c, items in work:
            for pipeline in pipelines:
                bar.set_label(f"{t} ctx={c} {pipeline.name}")
                if t == "fidelity":
                    row = _fidelity_row(model, pipeline, items, dense_cache, c, bar, prefill_cache)
                else:
                    row = _retrieval_row(model, tokenizer, pipeline, items, batch_size, bar, prefill_cache)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            dense_cache.clear()
            prefill_cache.clear()
    finally:
        bar.close()
    return rows


def check_distinct_names(policies: Sequence, pipelines: Sequence) -> None:
    """Rows and plots label policies by name: two policies of one run may not share one."""
    seen: dict[str, object] = {}
    for policy, pipe in zip(policies, pipelines):
        if pipe.name in seen:
            raise ValueError(f"policies {seen[pipe.name]} and {policy} share the name {pipe.name!r}; "
                             "give each a distinct `name:`.")
        seen[pipe.name] = policy


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


def answers_table(rows: Sequence[EvalRow]) -> str:
    """Per retrieval prompt: the expected answers next to each policy's generated text."""
    policies = list(dict.fromkeys(r.policy for r in rows if r.outputs))
    head = "| task | ctx | depth | expected | " + " | ".join(policies) + " |"
    lines = [head, "|---|---:|---:|---|" + "---|" * len(policies)]
    by_cell: dict[tuple[str, int], dict[str, EvalRow]] = {}
    for r in rows:
        if r.outputs:
            by_cell.setdefault((r.task, r.ctx), {})[r.policy] = r
    for (task, ctx), per_policy in by_cell.items():
        first = next(iter(per_policy.values()))
        for i, sample in enumerate(first.outputs):
            cells = []
            for p in policies:
                o = per_policy[p].outputs[i] if p in per_policy else None
                cells.append("-" if o is None else f"{_mark(o['score'])} {_one_line(o['output'])}")
            lines.append(f"| {task} | {ctx} | {sample['depth']:g} | {', '.join(sample['expected'])} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mark(score: float) -> str:
    return "✓" if score == 1 else "✗" if score == 0 else f"{score:.2f}"


def _one_line(text: str, limit: int = 60) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def place_labels(ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                 fontsize: int = 7) -> tuple[list, list[str]]:
    """Annotate each point with its label where the label's box overlaps no other label and no point.

    Tries offsets on growing rings around the point (a leader line past the first ring), in data order,
    keeping every label inside the axes and off the legend.
    Returns (the annotations, the labels that found no free place and were left out)."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    dots = [_box_around(to_px((x, y)), 4) for x, y in zip(xs, ys)]
    legend = ax.get_legend()
    if legend is not None:
        b = legend.get_window_extent(renderer)
        dots.append((b.x0, b.y0, b.x1, b.y1))
    placed, out, left_out = [], [], []
    angles = [math.radians(a) for a in range(0, 360, 15)]
    angles.sort(key=lambda a: (round(abs(math.sin(2 * a)), 3) < 0.99, a))  # diagonals first
    for x, y, label in zip(xs, ys, labels):
        for radius in (6, 12, 20, 30, 42, 56, 72, 90, 110, 135, 165, 200, 240, 290):
            for a in angles:
                dx, dy = round(math.cos(a), 3), round(math.sin(a), 3)
                ann = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx * radius, dy * radius),
                                  fontsize=fontsize, ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                  va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                                  arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if radius > 6 else None)
                ann.update_positions(renderer)
                box = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
                box = (box.x0 - 2, box.y0 - 1, box.x1 + 2, box.y1 + 1)  # a little air between labels
                if not any(_overlap(box, b) for b in placed + dots) and _inside(box, ax.bbox.extents):
                    placed.append(box)
                    out.append(ann)
                    break
                ann.remove()
            else:
                continue
            break
        else:
            left_out.append(label)
    return out, left_out


def _box_around(p, r):
    return (p[0] - r, p[1] - r, p[0] + r, p[1] + r)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(box, outer) -> bool:
    return box[0] >= outer[0] and box[1] >= outer[1] and box[2] <= outer[2] and box[3] <= outer[3]


_NO_MATPLOTLIB = ("matplotlib is not installed, so no plot was written (table and JSON were). "
                  "Install it with: pip install 'composable-kv[plot]'")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_rows(rows: Sequence[EvalRow], path: Path) -> tuple[bool, str | None]:
    """PNG of accuracy (fidelity: top-1 agreement) against KV MB read per token -> (written, note)."""
    plt = _pyplot()
    if plt is None:
        return False, _NO_MATPLOTLIB
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, int], list[EvalRow]] = {}
    for r in rows:
        series.setdefault((r.task, r.ctx), []).append(r)
    xs_all, ys_all, labels = [], [], []
    for (task, ctx), rs in series.items():
        ys = [r.accuracy if r.accuracy is not None else r.top1_agreement for r in rs]
        xs = [r.kv_bytes_per_token / 1e6 for r in rs]
        ax.plot(xs, ys, "o", label=f"{task} @ {ctx}")
        xs_all += xs
        ys_all += ys
        labels += [r.policy for r in rs]
    ax.set_xlabel("KV MB read per generated token (all layers)")
    ax.set_ylabel("accuracy (fidelity: top-1 agreement with dense)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _, left_out = place_labels(ax, xs_all, ys_all, labels)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True, (f"{len(left_out)} point labels found no free place in {path.name}: {', '.join(left_out)}"
                  if left_out else None)


def write_results(rows: Sequence[EvalRow], out_dir: str | Path, meta: dict, stem: str = "results",
                  sections: Sequence[str] = ()) -> dict:
    """Write <stem>.md (``sections``, then the per-task table), <stem>.json and <stem>.png into out_dir;
    return their paths and notes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    md = out / f"{stem}.md"
    body = "\n\n".join([*sections, table])
    md.write_text(f"Command: `{meta.get('command', '')}`  \nDevice: {meta.get('device')} "
                  f"({meta.get('device_name')}), commit {meta.get('commit')}, model {meta.get('model')}\n\n"
                  f"{body}\n")
    js = out / f"{stem}.json"
    js.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    png = out / f"{stem}.png"
    written, note = plot_rows(rows, png)
    return {"table": table, "markdown": md, "json": js, "png": png if written else None, "note": note}
