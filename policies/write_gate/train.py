"""`ckv train-gate`: distil the Write-Gated KV gate from dense attention, on CPU, in minutes.

The paper trains the gate end to end through the model. Our proxy target, per (layer, KV head) and
token j: the largest attention probability that any query of the KV head's group gives j once j has
left the local window, i.e. over queries i >= j + window:

    m_j = max_{h in group, i >= j + W} softmax(q_i^h . k / sqrt(d))_j,    label y_j = [m_j > tau_mass]

A token the model never attends to strongly after the window would not change any output much if it
were dropped; the gate learns to predict y_j from concat(pre-RoPE k_j, post-RoPE k_j) alone, with a
binary cross-entropy. Tokens with fewer than `min_future` queries after the window are not labelled.

Plain essays rarely hold a fact that is asked for much later, so a gate trained on them alone drops a
needle once it leaves the window. `--needle-seqs` adds retrieval-style windows: essay text with one
inserted fact (a random key and number, in templates unlike the evaluation's NIAH needle) and, at the
end, the question about it with its answer. The target is the same (attention after the window: the
question and the answer attend to the fact; without the answer the number's later digits are never
attended to), and the fact's tokens weigh `--needle-weight` times more in the loss.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

import torch

from composable_kv.policies.write_gate.admission import model_rope, model_tag, unrope
from composable_kv.assets import MODEL_HELP

CAPTURE_IMPL = "ckv_gate_capture"


@dataclass
class GateData:
    x: torch.Tensor  # [L, H, N, 2D] features: concat(pre-RoPE k, post-RoPE k)
    y: torch.Tensor  # [L, H, N] bool labels
    m: torch.Tensor  # [L, H, N] fp32 max post-window attention
    w: torch.Tensor | None = None  # [N] loss weight per token (None = uniform)


class _Capture:
    def __init__(self, window: int, min_future: int, chunk: int = 256):
        self.window, self.min_future, self.chunk = window, min_future, chunk
        self.cos = self.sin = None
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q, k = query[0].float(), key[0].float()  # [Hq, T, D], [H, T, D]
        Hq, T, D = q.shape
        H = k.shape[0]
        G = Hq // H
        scale = scaling if scaling is not None else D ** -0.5
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                               enable_gqa=Hq != H)
        kk = k.repeat_interleave(G, dim=0)  # [Hq, T, D]
        best = torch.zeros(Hq, T)
        cols = torch.arange(T)
        for s in range(0, T, self.chunk):
            rows = torch.arange(s, min(T, s + self.chunk))
            logits = torch.einsum("hid,hjd->hij", q[:, rows], kk) * scale  # [Hq, c, T]
            logits.masked_fill_(cols[None, None] > rows[None, :, None], float("-inf"))
            p = logits.softmax(-1).masked_fill_(rows[None, :, None] - cols[None, None] < self.window, 0.0)
            best = torch.maximum(best, p.amax(1))
        n = max(0, T - self.window - self.min_future)
        m = best.view(H, G, T).amax(1)[:, :n]  # [H, n]
        k_post = k.transpose(0, 1)[:n]  # [n, H, D]
        k_pre = unrope(k_post, self.cos[:n], self.sin[:n])
        x = torch.cat([k_pre, k_post], -1).transpose(0, 1)  # [H, n, 2D]
        self.layers[module.layer_idx] = (x, m)
        return out.transpose(1, 2), None


@torch.no_grad()
def capture(model, token_lists, *, window: int = 256, min_future: int = 256, tau_mass: float = 0.01) -> GateData:
    """Run `model` over each token list (one at a time) and collect gate features and labels."""
    from transformers import AttentionInterface

    cap = _Capture(window, min_future)
    AttentionInterface.register(CAPTURE_IMPL, cap)
    rope = model_rope(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_IMPL)
    xs, ms = [], []
    try:
        for ids in token_lists:
            if len(ids) <= window + min_future:
                raise ValueError(f"train-gate: sequences need more than window + min_future = "
                                 f"{window + min_future} tokens, got {len(ids)}")
            cap.cos, cap.sin = (t.cpu() for t in rope(torch.arange(len(ids))))
            cap.layers.clear()
            device = next(model.parameters()).device
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False, logits_to_keep=1)
            L = len(cap.layers)
            xs.append(torch.stack([cap.layers[i][0] for i in range(L)]))
            ms.append(torch.stack([cap.layers[i][1] for i in range(L)]))
    finally:
        model.set_attn_implementation(previous)
    x, m = torch.cat(xs, 2), torch.cat(ms, 2)
    return GateData(x, m > tau_mass, m)


def train(gate, data: GateData, *, steps: int = 300, lr: float = 3e-3, weight_decay: float = 1e-4,
          log=None) -> list[float]:
    """Fit every (layer, KV head) gate at once, full batch, BCE. Sets the input standardisation."""
    x, y = data.x, data.y.float()
    w = None if data.w is None else (data.w / data.w.mean()).expand_as(y)
    with torch.no_grad():
        gate.mu.copy_(x.mean(2))
        gate.sigma.copy_(x.std(2).clamp_min(1e-4))
        prior = y.mean(2).clamp(1e-3, 1 - 1e-3)
        gate.b2.copy_(torch.log(prior / (1 - prior)))
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(gate.logits_all(x), y, weight=w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"  step {step:4d}  bce {losses[-1]:.4f}")
    return losses


@torch.no_grad()
def evaluate_gate(gate, data: GateData, threshold: float = 0.1) -> dict:
    """On held-out data: the share of tokens admitted, and how much of the labelled / attended set they keep."""
    g = torch.sigmoid(gate.logits_all(data.x))  # [L, H, N]
    admit = g > threshold
    pos = data.y
    return {"admitted": float(admit.float().mean()), "positive": float(pos.float().mean()),
            "recall": float((admit & pos).sum() / pos.sum().clamp_min(1)),
            "max_mass_dropped": float(data.m.masked_fill(admit, 0).amax()),
            "admitted_per_layer": admit.float().mean((1, 2)).tolist()}


@torch.no_grad()
def needle_admitted(gate, data: GateData, span: torch.Tensor, threshold: float = 0.1) -> float:
    """Share of the (layer, KV head, needle token) triples whose gate admits them; span [N] bool."""
    return float((torch.sigmoid(gate.logits_all(data.x[:, :, span])) > threshold).float().mean())


def essay_windows(tokenizer, text: str, n: int, length: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        raise ValueError(f"train-gate: the essays hold {len(ids)} tokens, fewer than {n} x {length}")
    stride = len(ids) // n
    return [ids[i * stride:i * stride + length] for i in range(n)]


# Facts and questions for the retrieval-style windows; deliberately unlike tasks.py's NIAH needle.
_TRAIN_FACTS = (
    (" The secret code for the {key} is {value}. ", "\n\nWhat is the secret code for the {key}? "
                                                     "The secret code for the {key} is {value}."),
    (" Remember that the {key} account number is {value}. ", "\n\nWhat is the {key} account number? "
                                                               "The {key} account number is {value}."),
    (" Note: the {key} passphrase is {value}. ", "\n\nQuestion: what is the {key} passphrase? "
                                                  "Answer: the {key} passphrase is {value}."),
)
_TRAIN_KEYS = ("red", "blue", "green", "tall", "small", "old", "new", "dark", "bright", "wooden")
_TRAIN_NOUNS = ("box", "door", "boat", "lamp", "chair", "bridge", "tower", "horse", "clock", "river")


def retrieval_windows(tokenizer, text: str, n: int, length: int, labelled: int, *, seed: int = 0,
                      offset: float = 0.5) -> list[tuple[list[int], list[int]]]:
    """n windows of `length` tokens: essay text, one fact inserted within the first `labelled` tokens
    (so it gets a label), the question about it and its answer at the end (the answer's queries are
    what attend to the fact's later digits). Returns (ids, fact token positions)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(f"train-gate-{seed}")
    stride = len(ids) // n
    out = []
    for i in range(n):
        fact, question = rng.choice(_TRAIN_FACTS)
        key = f"{rng.choice(_TRAIN_KEYS)} {rng.choice(_TRAIN_NOUNS)}"
        value = str(rng.randint(10 ** (rng.randint(4, 8)), 10 ** 9 - 1))
        f_ids = tokenizer(fact.format(key=key, value=value), add_special_tokens=False)["input_ids"]
        q_ids = tokenizer(question.format(key=key, value=value), add_special_tokens=False)["input_ids"]
        budget = length - len(f_ids) - len(q_ids)
        hi = min(labelled - len(f_ids), budget)
        if hi < 8:
            raise ValueError(f"train-gate: a {length}-token retrieval window leaves {labelled} labelled tokens, "
                             f"too few for a {len(f_ids)}-token fact; raise --seq-len")
        start = int((i + offset) * stride) % max(1, len(ids) - budget)
        filler = ids[start:start + budget]
        at = rng.randint(min(labelled // 8, hi), hi)
        out.append((filler[:at] + f_ids + filler[at:] + q_ids, list(range(at, at + len(f_ids)))))
    return out


def _labelled_mask(seqs, spans, labelled_len) -> torch.Tensor:
    """[N] bool over the concatenated labelled tokens of `seqs`: True on the given positions."""
    masks = []
    for ids, span in zip(seqs, spans):
        mask = torch.zeros(labelled_len(len(ids)), dtype=torch.bool)
        mask[[p for p in span if p < len(mask)]] = True
        masks.append(mask)
    return torch.cat(masks)


def run_train_gate(args) -> int:
    from composable_kv import assets
    from composable_kv.policies.write_gate import GateMLP

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    model, tok = assets.load_model_and_tokenizer(args.model, dtype=torch.float32, device="cpu")
    seqs = essay_windows(tok, assets.load_essays(args.essays), args.seqs + 1, args.seq_len)
    log(f"train-gate: capturing dense attention over {args.seqs}+1 essay windows of {args.seq_len} tokens")
    kw = dict(window=args.window, min_future=args.min_future, tau_mass=args.tau_mass)
    data = capture(model, seqs[:-1], **kw)
    held = capture(model, seqs[-1:], **kw)
    labelled_len = lambda n: max(0, n - args.window - args.min_future)  # noqa: E731
    needle_held = None
    if args.needle_seqs:
        text = assets.load_essays(args.essays)
        windows = retrieval_windows(tok, text, args.needle_seqs + 1, args.seq_len, labelled_len(args.seq_len),
                                    seed=args.seed)
        log(f"train-gate: + {args.needle_seqs}+1 retrieval windows (a fact early, its question and answer at the end), "
            f"fact tokens weigh {args.needle_weight}x")
        r_ids, r_spans = [w[0] for w in windows], [w[1] for w in windows]
        r_data = capture(model, r_ids[:-1], **kw)
        r_held = capture(model, r_ids[-1:], **kw)
        w = torch.cat([torch.ones(data.x.shape[2]),
                       1 + (args.needle_weight - 1) * _labelled_mask(r_ids[:-1], r_spans[:-1], labelled_len).float()])
        data = GateData(torch.cat([data.x, r_data.x], 2), torch.cat([data.y, r_data.y], 2),
                        torch.cat([data.m, r_data.m], 2), w)
        needle_held = (r_held, _labelled_mask(r_ids[-1:], r_spans[-1:], labelled_len))
    L, H, N, F = data.x.shape
    log(f"train-gate: {N} labelled tokens per (layer, KV head), {100 * float(data.y.float().mean()):.1f}% "
        f"positive (max post-window attention > {args.tau_mass}); training {L}x{H} gates")
    torch.manual_seed(args.seed)
    gate = GateMLP(L, H, F // 2, hidden=args.hidden)
    train(gate, data, steps=args.steps, lr=args.lr, log=log)
    ev = evaluate_gate(gate, held, args.threshold)
    out = args.out or str(assets.cache_dir() / "write_gate" / f"{model_tag(model)}.pt")
    gate.save(out, {"model": model_tag(model), "window": args.window, "tau_mass": args.tau_mass,
                    "min_future": args.min_future, "seqs": args.seqs, "seq_len": args.seq_len,
                    "steps": args.steps, "needle_seqs": args.needle_seqs, "needle_weight": args.needle_weight,
                    "heldout": ev})
    print(f"held-out window ({args.seq_len} tokens), gate > {args.threshold}: admitted "
          f"{100 * ev['admitted']:.1f}% of the tokens leaving the window; they hold {100 * ev['recall']:.1f}% of "
          f"the labelled ones ({100 * ev['positive']:.1f}% labelled); the largest post-window attention a dropped "
          f"token gets is {ev['max_mass_dropped']:.3f}")
    print("admitted per layer: " + " ".join(f"{a:.2f}" for a in ev["admitted_per_layer"]))
    if needle_held is not None:
        r_held, span = needle_held
        print(f"held-out retrieval window: the gate admits {100 * needle_admitted(gate, r_held, span, args.threshold):.1f}% "
              f"of the fact's (layer, KV head, token) entries; "
              f"{100 * float(r_held.y[:, :, span].float().mean()):.1f}% are labelled needed")
    print(f"wrote {out} ({time.time() - t0:.0f} s)")
    return 0


def add_train_gate_parser(subparsers):
    p = subparsers.add_parser(
        "train-gate", help="train the write_gate admission gate by distilling dense attention (CPU, minutes)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="NAME|PATH", default=None, help=MODEL_HELP)
    p.add_argument("--essays", default=None, help="folder of .txt essays (default: Paul Graham essays)")
    p.add_argument("--seqs", type=int, default=2, help="training windows (one more is held out)")
    p.add_argument("--seq-len", type=int, default=1536, help="tokens per window")
    p.add_argument("--window", type=int, default=256, help="the stage's window_tokens")
    p.add_argument("--min-future", type=int, default=256, help="queries after the window a labelled token needs")
    p.add_argument("--tau-mass", type=float, default=0.01, help="label: max post-window attention > tau_mass")
    p.add_argument("--needle-seqs", type=int, default=6,
                   help="retrieval-style training windows (a fact, its question at the end); one more is held out")
    p.add_argument("--needle-weight", type=float, default=50.0, help="loss weight of the fact's tokens")
    p.add_argument("--threshold", type=float, default=0.1, help="the stage's threshold (held-out report)")
    p.add_argument("--hidden", type=int, default=32, help="gate MLP width")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="weights path (default: <cache>/write_gate/<model tag>.pt)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_train_gate)
    return p
