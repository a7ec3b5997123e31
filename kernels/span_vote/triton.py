"""Ltri's span ballots in one Triton launch, without sorting (same contract as reference.span_votes).

A head's ballots are a prefix of its ranking: span i is voted iff the free pages of the spans ranked before
it, G(k_i) + (tied spans before it), are below the free budget, where G(t) sums the sizes of the finite
spans whose ordered score key exceeds t. Bisection finds t0 = min{t : G(t) < avail} (33 masked sums over
the spans, as page_select's _keep_top); spans above t0 are voted, spans at t0 by a cumsum over their ids.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2
from ..page_select.triton import _ord32

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _span_votes_kernel(score_ptr, stride_sb, stride_sh, sop_ptr, stride_pb, forced_ptr, stride_fb, stride_fh,
                       votes_ptr, best_ptr, size_ptr, NS, P, budget,
                       HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NSP: tl.constexpr,
                       PP: tl.constexpr, LAYER: tl.constexpr):
    pid = tl.program_id(0)
    if LAYER:  # one program per request: every query head votes, one row for all KV heads
        b = pid
        h_lo = 0
        n_h = HKV
    else:  # one program per (request, KV head)
        b = pid // HKV
        h_lo = pid % HKV
        n_h = 1
    base = pid.to(tl.int64) * NSP  # this program's scratch row
    i = tl.arange(0, NSP)
    iv = i < NS
    p = tl.arange(0, PP)
    pv = p < P
    sop = tl.load(sop_ptr + b.to(tl.int64) * stride_pb + p, mask=pv, other=-1).to(tl.int32)  # [PP]
    g = tl.arange(0, GP)[:, None]
    votes = tl.zeros([NSP], tl.float32)
    best = tl.full([NSP], NEG_INF, tl.float32)
    for hh in range(h_lo, h_lo + n_h):
        forced = tl.load(forced_ptr + b.to(tl.int64) * stride_fb + hh * stride_fh + p, mask=pv, other=0) != 0
        tl.store(size_ptr + base + i, tl.zeros([NSP], tl.int32))
        tl.debug_barrier()
        tl.atomic_add(size_ptr + base + sop, 1, mask=pv & (sop >= 0) & ~forced)  # free pages per span
        tl.debug_barrier()
        size = tl.load(size_ptr + base + i, mask=iv, other=0, cache_modifier=".cg")[None, :]  # int32
        avail = tl.maximum(budget - tl.sum((forced & pv).to(tl.int32), axis=0), 0)
        s = tl.load(score_ptr + b.to(tl.int64) * stride_sb + (hh * G + g) * stride_sh + i[None, :],
                    mask=(g < G) & iv[None, :], other=NEG_INF)  # [GP, NSP]
        best = tl.maximum(best, tl.max(s, axis=0))
        live = (s > NEG_INF) & (s < float("inf")) & (g < G) & iv[None, :]  # finite scores vote
        # int32 keys and sizes: a finite key is > INT32_MIN (NaN with the sign bit alone maps there), so
        # lo = min - 1 fits; only the midpoint's hi - lo needs 64 bits
        key = _ord32(s)
        sz = tl.where(live, size, 0)
        lo = (tl.min(tl.where(live, key, 2147483647), axis=1) - 1).to(tl.int32)  # [GP]: G(lo) = all live sizes
        hi = tl.max(tl.where(live, key, -2147483648), axis=1).to(tl.int32)  # G(hi) = 0
        for _ in tl.static_range(33):  # invariant: G(lo) >= avail > G(hi) (where some span does not fit)
            gap = hi.to(tl.int64) - lo.to(tl.int64)
            mid = (lo.to(tl.int64) + gap // 2).to(tl.int32)
            fits = tl.sum(tl.where(key > mid[:, None], sz, 0), axis=1) < avail
            hi = tl.where(fits & (gap > 1), mid, hi)
            lo = tl.where(~fits & (gap > 1), mid, lo)
        above = tl.sum(tl.where(key > hi[:, None], sz, 0), axis=1)  # G(t0), t0 = hi
        tie = live & (key == hi[:, None])
        before_tie = above[:, None] + tl.cumsum(tl.where(tie, sz, 0), axis=1) - tl.where(tie, sz, 0)
        everyone = tl.sum(sz, axis=1) < avail  # [GP]: every live span fits
        # avail = 0 votes for nothing: no G(t) < 0, so hi stays the top key and no tie fits
        fits = everyone[:, None].to(tl.int32) + (key > hi[:, None]).to(tl.int32) + \
            (tie & (before_tie < avail)).to(tl.int32)
        ballot = live & (fits > 0)
        votes += tl.sum(ballot.to(tl.float32), axis=0)
    for hh in range(h_lo, h_lo + n_h):
        row = (b.to(tl.int64) * HKV + hh) * NS
        tl.store(votes_ptr + row + i, votes, mask=iv)
        tl.store(best_ptr + row + i, best, mask=iv)


def span_votes(scores, span_of_page, forced, budget_pages: int, vote: str = "group"):
    """Same contract as reference.span_votes: one program per (request, KV head), or per request for
    vote 'layer'."""
    B, Hq, NS = scores.shape
    Hkv, P = forced.shape[1], forced.shape[2]
    if span_of_page.shape != (B, P) or Hq % Hkv or vote not in ("group", "layer"):
        raise ValueError(f"span_votes: scores {list(scores.shape)}, span_of_page {list(span_of_page.shape)}, "
                         f"forced {list(forced.shape)} ([B, Hq, NS], [B, P], [B, Hkv, P]), vote {vote!r}")
    scores = scores.float().contiguous()
    span_of_page = span_of_page.contiguous()
    forced = forced.contiguous()
    votes = torch.empty(B, Hkv, NS, dtype=torch.float32, device=scores.device)
    best = torch.empty_like(votes)
    programs = B if vote == "layer" else B * Hkv
    NSP = _pow2(NS, 16)
    size = torch.empty(programs, NSP, dtype=torch.int32, device=scores.device)
    _span_votes_kernel[(programs,)](
        scores, scores.stride(0), scores.stride(1), span_of_page, span_of_page.stride(0), forced,
        forced.stride(0), forced.stride(1), votes, best, size, NS, P, int(budget_pages),
        HKV=Hkv, G=Hq // Hkv, GP=_pow2(Hq // Hkv), NSP=NSP, PP=_pow2(P, 16), LAYER=vote == "layer",
        num_warps=4 if NSP <= 1024 else 8)
    return votes, best
