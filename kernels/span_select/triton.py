"""Ltri's selection in one Triton launch (same contract as reference.span_select): one program per
(request, KV head) votes, keys its pages, keeps the budget and writes the read order; no sort of the spans.

Ballots: a head's ballots are a prefix of its ranking: span i is voted iff the free pages of the spans ranked
before it, G(k_i) + (tied spans before it), are below the free budget, where G(t) sums the sizes of the
finite spans whose ordered score key exceeds t. Bisection finds t0 = min{t : G(t) < avail} (33 masked sums
over the spans, as page_select's _keep_top); spans above t0 are voted, spans at t0 by a cumsum over their ids.

Pages: key = class << 52 | ordered best << 20 | (2^20 - 1 - page), distinct per page, so the budget is an
exact bisection over int64 keys (page_select's _keep_top) and the kept pages sort (compacted, SORT_BLOCK of
them) in one tl.sort.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2
from ..page_select.triton import _keep_top, _ord32, sort_block_for, sort_compacted, sort_row
from .reference import OUTSIDE

NEG_INF = tl.constexpr(float("-inf"))
OUTSIDE_CLASS = tl.constexpr(OUTSIDE)
POS_BITS = 20  # pages per request < 2^20
POS_MASK = tl.constexpr((1 << POS_BITS) - 1)


@triton.jit
def _forced_of(forced_ptr, b, hh, p, sink_pages, cov, valid, P, HKV: tl.constexpr):
    """KV head hh's forced pages [PP]: the state's, the sink and the open span, on valid pages."""
    f = tl.load(forced_ptr + (b.to(tl.int64) * HKV + hh) * P + p, mask=valid, other=0) != 0
    return (f | (p < sink_pages) | (p >= cov)) & valid


@triton.jit
def _head_ballots(s, size, avail, live):
    """[GP, NSP] ballots of G heads: a head votes for the spans its ranking fits into avail free pages."""
    # int32 keys and sizes: a finite key is > INT32_MIN (NaN with the sign bit alone maps there), so lo = min - 1
    # fits; only the midpoint's hi - lo needs 64 bits
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
    return live & (fits > 0)


@triton.jit
def _span_select_kernel(score_ptr, stride_sb, stride_sh, row_ptr, sop_ptr, stride_sop, cov_ptr,
                        forced_ptr, cand_ptr, npages_ptr, size_ptr, votes_ptr, best_ptr, sortk_ptr,
                        order_ptr, count_ptr, kept_ptr, forced_out_ptr, key_ptr,
                        NS, P, budget, sink_pages,
                        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NSP: tl.constexpr,
                        PP: tl.constexpr, SORT_BLOCK: tl.constexpr, LAYER: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    if LAYER:  # every query head votes (each program counts the whole layer's ballots)
        h_lo = 0
        n_h = HKV
    else:
        h_lo = h
        n_h = 1
    base = pid.to(tl.int64) * NSP  # this program's scratch rows
    row = tl.load(row_ptr + b).to(tl.int64)
    cov = tl.load(cov_ptr + row)
    n_pages = tl.load(npages_ptr + b)
    i = tl.arange(0, NSP)
    iv = i < NS
    p = tl.arange(0, PP)
    valid = (p < n_pages) & (p < P)
    sop = tl.load(sop_ptr + row * stride_sop + p, mask=p < P, other=-1).to(tl.int32)  # [PP]
    in_span = valid & (sop >= 0)
    g = tl.arange(0, GP)[:, None]
    votes = tl.zeros([NSP], tl.float32)
    best = tl.full([NSP], NEG_INF, tl.float32)
    for hh in range(h_lo, h_lo + n_h):
        forced = _forced_of(forced_ptr, b, hh, p, sink_pages, cov, valid, P, HKV)
        tl.store(size_ptr + base + i, tl.zeros([NSP], tl.int32))
        tl.debug_barrier()
        tl.atomic_add(size_ptr + base + sop, 1, mask=in_span & ~forced)  # free pages per span
        tl.debug_barrier()
        size = tl.load(size_ptr + base + i, mask=iv, other=0, cache_modifier=".cg")[None, :]  # int32
        avail = tl.maximum(budget - tl.sum(forced.to(tl.int32), axis=0), 0)
        s = tl.load(score_ptr + b.to(tl.int64) * stride_sb + (hh * G + g) * stride_sh + i[None, :],
                    mask=(g < G) & iv[None, :], other=NEG_INF)  # [GP, NSP]
        best = tl.maximum(best, tl.max(s, axis=0))
        live = (s > NEG_INF) & (s < float("inf")) & (g < G) & iv[None, :]  # finite scores vote
        votes += tl.sum(_head_ballots(s, size, avail, live).to(tl.float32), axis=0)
    tl.store(votes_ptr + base + i, votes)
    tl.store(best_ptr + base + i, best)
    tl.debug_barrier()
    # this head's pages: keys from their span's (votes, best), the budget, the read order
    sv = tl.load(votes_ptr + base + sop, mask=in_span, other=0.0, cache_modifier=".cg")
    sb = tl.load(best_ptr + base + sop, mask=in_span, other=NEG_INF, cache_modifier=".cg")
    finite = (sb > NEG_INF) & (sb < float("inf"))
    cls = tl.where(sop < 0, OUTSIDE_CLASS, tl.where(finite, sv.to(tl.int64) + 1, 0)).to(tl.int64)
    bits = tl.where(finite & (sop >= 0), _ord32(sb).to(tl.int64) + 2147483648, 0)
    key = (cls << 52) | (bits << 20) | (p.to(tl.int64) ^ POS_MASK)  # [PP], distinct
    forced = _forced_of(forced_ptr, b, h, p, sink_pages, cov, valid, P, HKV)
    cand = (tl.load(cand_ptr + pid.to(tl.int64) * P + p, mask=valid, other=0) != 0) & valid
    free = tl.maximum(budget - tl.sum(forced.to(tl.int32), axis=0), 0)
    keep = forced | _keep_top(key, cand & ~forced, free, True)  # distinct keys: no tie
    count = tl.sum(keep.to(tl.int32), axis=0)
    out = pid.to(tl.int64) * P
    tl.store(count_ptr + pid, count)
    tl.store(kept_ptr + out + p, keep.to(tl.int8), mask=p < P)
    tl.store(forced_out_ptr + out + p, forced.to(tl.int8), mask=p < P)
    tl.store(key_ptr + out + p, NEG_INF, mask=(p < P) & ~keep)
    if count <= SORT_BLOCK:  # compact the kept keys, sort SORT_BLOCK of them
        sort_compacted(order_ptr + out, sortk_ptr + pid.to(tl.int64) * SORT_BLOCK, key_ptr + out, key, keep, count,
                       p, P, -1, SORT_BLOCK, POS_MASK, True)
    else:  # more forced pages than the block holds: sort the whole row
        sort_row(order_ptr + out, key_ptr + out, key, keep, count, p, P, -1, POS_MASK, True)


def span_select(scores, rows, span_of_page, covered, forced, candidates, num_pages, budget_pages: int,
                sink_pages: int, vote: str = "group", *, num_warps: int | None = None):
    """Same contract as reference.span_select, one launch (one program per (request, KV head)). num_warps: tuning
    (gpu/ltri.py sweeps it). The searches are bisections: a 4-ary search (three probes a round, half the rounds)
    won a synthetic sweep but took 114 us a layer in the stage against 64 (H200, f903498)."""
    B, Hq, NS = scores.shape
    Hkv, P = forced.shape[1], forced.shape[2]
    if (forced.shape != (B, Hkv, P) or candidates.shape != forced.shape or Hq % Hkv or rows.shape != (B,)
            or span_of_page.shape[1] < P or vote not in ("group", "layer")):
        raise ValueError(f"span_select: scores {list(scores.shape)}, rows {list(rows.shape)}, span_of_page "
                         f"{list(span_of_page.shape)}, forced {list(forced.shape)}, candidates "
                         f"{list(candidates.shape)} ([B, Hq, NS], [B], [R, >= P], [B, Hkv, P] twice), vote {vote!r}")
    if P >= 1 << POS_BITS or Hq >= OUTSIDE - 1:
        raise ValueError(f"span_select: at most {(1 << POS_BITS) - 1} pages and {OUTSIDE - 2} query heads a "
                         f"request, got {P} and {Hq}")
    dev = scores.device
    scores = scores.float().contiguous()
    PP = _pow2(P, 16)
    forced_in = forced.contiguous().view(torch.uint8)
    cand = candidates.contiguous().view(torch.uint8)
    order = torch.empty(B, Hkv, P, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    kept = torch.empty(B, Hkv, P, dtype=torch.bool, device=dev)
    forced_out = torch.empty_like(kept)
    order_key = torch.empty(B, Hkv, P, dtype=torch.float32, device=dev)
    NSP = _pow2(NS, 16)
    SORT_BLOCK = sort_block_for(budget_pages, P)
    size = torch.empty(B * Hkv, NSP, dtype=torch.int32, device=dev)
    votes = torch.empty(B * Hkv, NSP, dtype=torch.float32, device=dev)
    best = torch.empty_like(votes)
    sortk = torch.empty(B * Hkv, SORT_BLOCK, dtype=torch.int64, device=dev)
    sop = span_of_page if span_of_page.stride(-1) == 1 else span_of_page.contiguous()
    _span_select_kernel[(B * Hkv,)](
        scores, scores.stride(0), scores.stride(1), rows.contiguous(), sop, sop.stride(0), covered.contiguous(),
        forced_in, cand, num_pages.contiguous(), size, votes, best, sortk,
        order, count, kept.view(torch.int8), forced_out.view(torch.int8), order_key,
        NS, P, int(budget_pages), int(sink_pages),
        HKV=Hkv, G=Hq // Hkv, GP=_pow2(Hq // Hkv), NSP=NSP, PP=PP, SORT_BLOCK=SORT_BLOCK, LAYER=vote == "layer",
        num_warps=num_warps or (4 if max(NSP, PP) <= 1024 else 8))
    return order, count, kept, forced_out, order_key
