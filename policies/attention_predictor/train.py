"""`ckv train-predictor`: capture attention traces of the default model on the essays, train the
AttentionPredictor CNN on CPU, and report its recall against Quest's on a held-out trace.

Data. `traces.capture` (the same hook as `ckv trace`) prefills `tokens` essay tokens and keeps the
post-RoPE q of the last `steps` positions and every key, per layer. Each position is one decode step:
its softmax over the keys before it, summed per page of 16 tokens, is one history row. Training
uses the first half of the essays (file-name order); the held-out trace uses the second half.

Training. A sample is (the H rows before step t, row t). The history is made to look like what the
stage sees at decode time: rows off the calibration phase keep only the pages a budgeted read would
have read (the forced sink/recent pages plus the best others by true mass), renormalised, and a
random number of the oldest rows is zero (a young sequence). Windows of `crop_pages` pages keep it
cheap; the CNN is convolutional along pages. Loss: cross-entropy between the softmax of the scores
and row t's mass over the pages that are not forced.

Recall (held out, closed loop). The predictor runs step by step on its own selections: every
`calibrate_every`-th step is dense, the others read forced + top pages by the CNN, and the history
gets the renormalised mass of what was read, as in the stage. At the same budget, Quest keeps the
forced pages plus the top pages by its box bound (max over the group). Reported: mass recall (the
dense attention mass inside the kept pages) and page recall (overlap with the top-mass pages), on
non-calibration steps, mean over layers, KV heads and steps.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from composable_kv.assets import MODEL_HELP
from composable_kv.policies.attention_predictor.predictor import PredictorCNN, default_weights_path, features, save_weights
from composable_kv.ints import cdiv

PAGE = 16


def page_masses(q, k, sm_scale: float, first_pos: int, page: int = PAGE) -> torch.Tensor:
    """q [NQ, Hq, D] at positions first_pos.., k [Hkv, T, D] -> per-KV-head page mass [NQ, Hkv, P] fp32
    (mean over the group of each query head's softmax mass; zero past a step's pages)."""
    NQ, Hq, D = q.shape
    Hkv, T, _ = k.shape
    G = Hq // Hkv
    P = cdiv(T, page)
    out = torch.zeros(NQ, Hkv, P)
    kf = k.float()
    for i0 in range(0, NQ, 64):
        qi = q[i0:i0 + 64].float().view(-1, Hkv, G, D)  # [n, Hkv, G, D]
        logits = torch.einsum("nhgd,htd->nhgt", qi, kf) * sm_scale
        pos = first_pos + i0 + torch.arange(qi.shape[0])
        logits = logits.masked_fill(torch.arange(T)[None, None, None] > pos[:, None, None, None], float("-inf"))
        w = logits.softmax(-1).mean(2)  # [n, Hkv, T]
        w = torch.nn.functional.pad(w, (0, P * page - T))
        out[i0:i0 + qi.shape[0]] = w.view(w.shape[0], Hkv, P, page).sum(-1)
    return out


def quest_page_bound(q, k, sm_scale: float, first_pos: int, page: int = PAGE) -> torch.Tensor:
    """Quest's box bound at each step, max over the group: [NQ, Hkv, P] (-inf past a step's pages).
    The page holding the step's own position takes min/max over the keys written so far."""
    NQ, Hq, D = q.shape
    Hkv, T, _ = k.shape
    G = Hq // Hkv
    P = cdiv(T, page)
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, P * page - T)).view(Hkv, P, page, D)
    kmin, kmax = kp.amin(2), kp.amax(2)  # [Hkv, P, D] (full pages; the partial one fixed below)
    out = torch.full((NQ, Hkv, P), float("-inf"))
    for i in range(NQ):
        pos = first_pos + i
        n = pos // page + 1
        lo, hi = kmin[:, :n].clone(), kmax[:, :n].clone()
        part = k[:, (n - 1) * page:pos + 1].float()
        lo[:, -1], hi[:, -1] = part.amin(1), part.amax(1)
        qi = q[i].float().view(Hkv, G, 1, D)
        s = torch.maximum(qi * lo[:, None], qi * hi[:, None]).sum(-1) * sm_scale  # [Hkv, G, n]
        out[i, :, :n] = s.amax(1)
    return out


def forced_mask(n_pages: int, P: int, sink_pages: int, recent_pages: int) -> torch.Tensor:
    pos = torch.arange(P)
    return (pos < min(sink_pages, n_pages)) | ((pos >= n_pages - recent_pages) & (pos < n_pages))


def keep_top(score, n_pages: int, forced, budget_pages: int) -> torch.Tensor:
    """score [..., P] -> bool mask: forced pages + the best others up to budget_pages (among n_pages)."""
    P = score.shape[-1]
    valid = torch.arange(P) < n_pages
    s = score.masked_fill(~valid | forced, float("-inf"))
    free = max(budget_pages - int(forced.sum()), 0)
    keep = forced.expand_as(s).clone()
    if free:
        idx = s.topk(min(free, n_pages), dim=-1).indices
        top = torch.zeros_like(keep).scatter_(-1, idx, True) & torch.isfinite(s)
        keep |= top
    return keep & valid


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def capture_masses(*, tokens: int, steps: int, layers, essays: Path | None, model=None, quiet=False):
    """{'mass': [NL, NQ, Hkv, P], 'quest': [NL, NQ, Hkv, P], 'first_pos': int} from one capture."""
    from composable_kv import traces
    with tempfile.TemporaryDirectory() as d:
        path = traces.capture(Path(d) / "t.pt", tokens=tokens, layers=layers, num_queries=steps,
                              model=model, essays=essays, quiet=quiet)
        tr = traces.load_trace(path)
    sm = float(tr.meta["sm_scale"])
    first = tokens - steps
    mass = torch.stack([page_masses(tr.q[i], tr.k[i], sm, first) for i in range(tr.num_layers)])
    quest = torch.stack([quest_page_bound(tr.q[i], tr.k[i], sm, first) for i in range(tr.num_layers)])
    return {"mass": mass, "quest": quest, "first_pos": first, "layers": list(tr.meta["layers"])}


def essay_halves(essays: str | None) -> tuple[Path, Path]:
    """Two temporary folders of symlinks: the first and the second half of the essays by file name."""
    from composable_kv import assets
    folder = assets.essays_dir(essays)
    files = sorted(folder.glob("*.txt"))
    half = len(files) // 2
    out = []
    for part in (files[:half], files[half:]):
        d = Path(tempfile.mkdtemp(prefix="ckv-essays-"))
        for f in part:
            (d / f.name).symlink_to(f.resolve())
        out.append(d)
    return out[0], out[1]


def make_samples(mass, first_pos: int, *, history: int, crop_pages: int, budget_pages: int,
                 calibrate_every: int, sink_pages: int, recent_pages: int, num_samples: int, seed: int = 0):
    """(x [N, H, crop], target [N, crop], loss mask [N, crop]) from masses [NL, NQ, Hkv, P]."""
    g = torch.Generator().manual_seed(seed)
    NL, NQ, Hkv, P = mass.shape
    xs, ys, ms = [], [], []
    for _ in range(num_samples):
        li = int(torch.randint(NL, (1,), generator=g))
        h = int(torch.randint(Hkv, (1,), generator=g))
        t = int(torch.randint(1, NQ, (1,), generator=g))
        n = (first_pos + t) // PAGE + 1  # pages at step t
        rows = torch.zeros(history, P)
        lo = max(0, t - history)
        rows[history - (t - lo):] = mass[li, lo:t, h]
        phase = int(torch.randint(calibrate_every, (1,), generator=g))
        sparse = (torch.arange(t - history, t) - phase) % calibrate_every != 0  # [H] rows off calibration
        # (the budgeted read of row r uses step t's page count: at most a few pages more than r's)
        keep = keep_top(rows, n, forced_mask(n, P, sink_pages, recent_pages), budget_pages)
        kept = rows * keep
        kept = kept / kept.sum(-1, keepdim=True).clamp(min=1e-30)
        rows = torch.where(sparse[:, None], kept, rows)
        young = int(torch.randint(history, (1,), generator=g)) if torch.rand(1, generator=g) < 0.3 else 0
        rows[:young] = 0
        c = min(crop_pages, n)
        start = int(torch.randint(max(n - c, 0) + 1, (1,), generator=g))
        x = features(rows[None, :, start:start + c], torch.tensor([n]))[0]
        y = mass[li, t, h, start:start + c]
        lm = ~forced_mask(n, P, sink_pages, recent_pages)[start:start + c]
        pad = crop_pages - c
        xs.append(torch.nn.functional.pad(x, (0, pad)))
        ys.append(torch.nn.functional.pad(y, (0, pad)))
        ms.append(torch.nn.functional.pad(lm, (0, pad), value=False))
    return torch.stack(xs), torch.stack(ys), torch.stack(ms)


def train(x, y, m, *, epochs: int = 3, lr: float = 3e-3, batch: int = 64, seed: int = 0, quiet=False,
          c1: int = 16, c2: int = 32) -> PredictorCNN:
    torch.manual_seed(seed)
    model = PredictorCNN(c1, c2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    N = x.shape[0]
    for ep in range(epochs):
        perm = torch.randperm(N)
        total = 0.0
        for i in range(0, N, batch):
            idx = perm[i:i + batch]
            s = model(x[idx]).masked_fill(~m[idx], float("-inf"))
            t = y[idx] * m[idx]
            t = t / t.sum(-1, keepdim=True).clamp(min=1e-30)
            logp = s.log_softmax(-1).masked_fill(~m[idx], 0.0)
            loss = -(t * logp).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if not quiet:
            print(f"epoch {ep + 1}/{epochs}: loss {total / N:.4f}", file=sys.stderr)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Held-out recall (closed loop)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def recall_table(model, data, *, budgets, history: int, calibrate_every: int, sink_pages: int,
                 recent_pages: int, run_every: int = 1, history_budget: int | None = None):
    """Rows {budget_tokens, method, mass_recall, page_recall} on non-calibration steps.

    One closed loop: the predictor's history holds what a read of `history_budget` tokens (default:
    the first budget) would have returned; each step's scores are then judged at every budget."""
    mass, quest, first = data["mass"], data["quest"], data["first_pos"]
    NL, NQ, Hkv, P = mass.shape
    hb = (history_budget or budgets[0]) // PAGE
    acc = {(b, k): [0.0, 0.0, 0] for b in budgets for k in ("predictor", "quest", "oracle")}
    hist = torch.zeros(NL * Hkv, history, P)
    last = None
    for t in range(NQ):
        n = (first + t) // PAGE + 1
        forced = forced_mask(n, P, sink_pages, recent_pages)
        true = mass[:, t].reshape(NL * Hkv, P)
        if t % calibrate_every == 0:
            read = true
            last = None
        else:
            if last is None or t % run_every == 0:
                last = model(features(hist[..., :n], torch.full((NL * Hkv,), n)))
            score = torch.nn.functional.pad(last, (0, P - last.shape[-1]), value=float("-inf"))
            scores = {"predictor": score, "quest": quest[:, t].reshape(NL * Hkv, P), "oracle": true}
            for budget in budgets:
                bp = budget // PAGE
                oracle = keep_top(true, n, forced, bp)
                for name, sc in scores.items():
                    keep = keep_top(sc, n, forced, bp)
                    a = acc[(budget, name)]
                    a[0] += float((true * keep).sum(-1).mean())
                    a[1] += float(((keep & oracle).sum(-1).float() / oracle.sum(-1).clamp(min=1)).mean())
                    a[2] += 1
            read = true * keep_top(score, n, forced, hb)
            read = read / read.sum(-1, keepdim=True).clamp(min=1e-30)
        hist = torch.cat([hist[:, 1:], read[:, None]], dim=1)
    return [{"budget_tokens": b, "method": k, "mass_recall": mr / max(c, 1), "page_recall": pr / max(c, 1),
             "steps": c} for (b, k), (mr, pr, c) in acc.items()]


def markdown(rows, meta) -> str:
    lines = [f"held-out: {meta}", "",
             "| budget (tokens) | method | mass recall | page recall (vs top-mass pages) |",
             "|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['budget_tokens']} | {r['method']} | {r['mass_recall']:.3f} | {r['page_recall']:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_train_predictor_parser(subparsers):
    p = subparsers.add_parser("train-predictor", help="train the attention_predictor CNN on the default model's "
                                                      "attention over the essays (CPU, minutes)")
    p.add_argument("--out", default=None, help=f"weights file (default: {default_weights_path()})")
    p.add_argument("--tokens", type=int, default=2048, help="prefill length of each capture (default %(default)s)")
    p.add_argument("--steps", type=int, default=384, help="decode steps per capture: the last N positions")
    p.add_argument("--layers", default="2,5,8,11,14,17,20,23,26,29", help="layers captured (comma separated)")
    p.add_argument("--history", type=int, default=64, help="H, history steps (default %(default)s)")
    p.add_argument("--samples", type=int, default=6000, help="training samples (default %(default)s)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--crop-pages", type=int, default=48, help="page window per training sample")
    p.add_argument("--budget-tokens", type=int, default=512, help="budget simulated in the training history")
    p.add_argument("--eval-budgets", default="256,512,1024", help="held-out recall budgets (tokens)")
    p.add_argument("--calibrate-every", type=int, default=5)
    p.add_argument("--sink-tokens", type=int, default=64)
    p.add_argument("--recent-tokens", type=int, default=64)
    p.add_argument("--model", metavar="NAME|PATH", default=None, help=MODEL_HELP)
    p.add_argument("--essays", default=None, help="folder of .txt essays (default: the cached essays)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report", default=None, help="also write the recall table (markdown) here")
    p.add_argument("--data", default=None, help="captured masses (.pt): reused if present, else captured and "
                                                "saved there (default: next to the weights)")
    p.add_argument("--recall-only", action="store_true", help="skip training: report the recall of --out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train_predictor)
    return p


def _cmd_train_predictor(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
        budgets = [int(x) for x in args.eval_budgets.split(",") if x.strip()]
    except ValueError:
        print("error: --layers and --eval-budgets take comma-separated ints", file=sys.stderr)
        return 2
    if args.steps < 2 or args.steps > args.tokens:
        print(f"error: --steps must be in [2, --tokens={args.tokens}], got {args.steps}", file=sys.stderr)
        return 2
    t0 = time.time()
    out = Path(args.out) if args.out else default_weights_path()
    data_path = Path(args.data) if args.data else out.parent / (
        f"masses-{args.tokens}-{args.steps}-{'_'.join(map(str, layers))}.pt")
    if data_path.is_file():
        tr, te = torch.load(data_path, weights_only=True)
    else:
        train_dir, test_dir = essay_halves(args.essays)
        kw = dict(tokens=args.tokens, steps=args.steps, layers=layers, model=args.model)
        tr = capture_masses(essays=train_dir, **kw)
        te = capture_masses(essays=test_dir, **kw)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((tr, te), data_path)
    t1 = time.time()
    sp, rp = cdiv(args.sink_tokens, PAGE), cdiv(args.recent_tokens, PAGE)
    if args.recall_only:
        from composable_kv.policies.attention_predictor.predictor import load_weights
        model = load_weights(out)
    else:
        x, y, m = make_samples(tr["mass"], tr["first_pos"], history=args.history, crop_pages=args.crop_pages,
                               budget_pages=args.budget_tokens // PAGE, calibrate_every=args.calibrate_every,
                               sink_pages=sp, recent_pages=rp, num_samples=args.samples, seed=args.seed)
        model = train(x, y, m, epochs=args.epochs, seed=args.seed)
        meta = {"tokens": args.tokens, "steps": args.steps, "layers": layers, "history": args.history,
                "samples": args.samples, "epochs": args.epochs,
                "train_text": "essays, first half by file name", "held_out_text": "essays, second half"}
        save_weights(model, out, meta)
    t2 = time.time()
    n_params = sum(p.numel() for p in model.parameters())
    rows = recall_table(model, te, budgets=budgets, history=args.history, calibrate_every=args.calibrate_every,
                        sink_pages=sp, recent_pages=rp, history_budget=args.budget_tokens)
    t3 = time.time()
    table = markdown(rows, f"{args.tokens} tokens, last {args.steps} positions as decode steps, layers {layers}, "
                           f"calibrate_every {args.calibrate_every}, sink/recent {args.sink_tokens}/"
                           f"{args.recent_tokens} tokens, history reads at {args.budget_tokens} tokens; "
                           f"non-calibration steps")
    print(table)
    print(f"weights: {out} ({n_params} parameters); capture {t1 - t0:.0f} s, train {t2 - t1:.0f} s, "
          f"held-out recall {t3 - t2:.0f} s", file=sys.stderr)
    if args.report:
        Path(args.report).write_text(table + "\n")
    return 0
