"""Ltri's selection in one Triton launch (same contract as reference.span_select): one program per
(request, KV head) votes, keys its pages, keeps the budget and writes the read order; no full sort.

Both searches narrow a window, then rank what is left in it with one small tl.sort (README.md):
- Ballots: a head's ballots are a prefix of its ranking: span i is voted iff the free pages of the spans ranked
  before it are below the free budget. With G(t) the free pages of the finite spans whose ordered score key
  exceeds t, bisection keeps G(lo) >= avail > G(hi) until at most WINDOW spans lie in (lo, hi]: the spans above hi
  are voted, those in the window sorted (key desc, id asc) and voted while G(hi) + the sizes before them fit. A
  window of equal keys wider than WINDOW (gap 1) is ranked by id with a cumsum.
- Budget: pages get distinct int64 keys, class << 52 | ordered best << 20 | (2^20 - 1 - page); bisection finds lo
  with at least `free` and at most SORT_BLOCK - budget candidates at keys >= lo; the forced pages and those sort
  in one block, and the first `free` candidates of it are kept.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2
from ..page_select.triton import _ord32, sort_block_for, sort_row
from .reference import OUTSIDE

NEG_INF = tl.constexpr(float("-inf"))
INT64_MIN = tl.constexpr(-9223372036854775808)
ID_MASK = tl.constexpr(2147483647)  # window entries: (key << 32) | (span id ^ ID_MASK)
OUTSIDE_CLASS = tl.constexpr(OUTSIDE)
POS_BITS = 20  # pages per request < 2^20
POS_MASK = tl.constexpr((1 << POS_BITS) - 1)
WINDOW = 128  # spans a head's ballot window ranks by a sort; the budget's slack is sort_block_for(budget + WINDOW)
VALUE_ROUNDS = tl.constexpr(12)


@triton.jit
def _float_of(k):
    """The inverse of _ord32 (NaN for keys that are no float's)."""
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _free_per_span(sop, free, size_row, i):
    """[NSP] free pages of each span: one relaxed atomic add a free page into its span's slot of a zeroed row
    (size_row keeps the counts for the ballots' window)."""
    tl.store(size_row + i, tl.zeros_like(i))
    tl.debug_barrier()
    tl.atomic_add(size_row + sop, 1, mask=free, sem="relaxed")
    tl.debug_barrier()
    return tl.load(size_row + i, cache_modifier=".cg")


@triton.jit
def _forced_of(forced_ptr, stride_fb, stride_fh, b, hh, p, sink_pages, cov, valid):
    """KV head hh's forced pages [PP]: the state's, the sink and the open span, on valid pages."""
    f = tl.load(forced_ptr + b.to(tl.int64) * stride_fb + hh * stride_fh + p, mask=valid, other=0) != 0
    return (f | (p < sink_pages) | (p >= cov)) & valid


@triton.jit
def _head_ballots(s, size, avail, live, s_rows, stride_sh, win_row, wv_row, size_row, GP: tl.constexpr,
                  NSP: tl.constexpr, W: tl.constexpr, PACK: tl.constexpr):
    """[GP, NSP] ballots of G heads: a head votes for the spans its ranking fits into avail free pages. The spans of
    a sorted window are not in it: their ballots are atomic adds to wv_row. size: [1, NSP] int32, also at size_row;
    s_rows: the heads' score rows; win_row: [GP, W] int32 scratch. A sum of sizes and a count of spans share one
    int32 (the count from bit PACK on) or, where they would not fit, one int64."""
    key = _ord32(s)  # [GP, NSP] int32; a finite key is > INT32_MIN
    if PACK < 32:
        one = tl.full([], 1, tl.int32) << PACK
    else:
        one = tl.full([], 1, tl.int64) << PACK
    low = one - 1
    val = tl.where(live, size.to(one.dtype) + one, 0)  # size | 1 << PACK
    tot = tl.sum(val, axis=1)  # [GP]
    everyone = (tot & low) < avail  # every live span fits
    n_lo = tot >> PACK  # live keys > lo
    lo = tl.min(tl.where(live, key, 2147483647), axis=1) - 1  # G(lo): every live size
    hi = tl.max(tl.where(live, key, -2147483648), axis=1)  # G(hi) = 0
    n_hi = tl.zeros_like(n_lo)
    g_hi = tl.zeros_like(n_lo)
    wide = ~everyone & (n_lo > W) & (hi.to(tl.int64) - lo.to(tl.int64) > 1)
    it = tl.zeros([], tl.int32)
    # G(lo) >= avail > G(hi) where not everyone. The first VALUE_ROUNDS probes halve the score interval (scores
    # crowd on a few exponents, where halving their order bits narrows slowly); then the bits are halved, so at
    # most 33 more rounds reach a gap of 1
    while (it < VALUE_ROUNDS + 33) & (tl.max(wide.to(tl.int32), axis=0) > 0):
        gap = hi.to(tl.int64) - lo.to(tl.int64)
        mid = (lo.to(tl.int64) + gap // 2).to(tl.int32)
        by_value = _ord32(_float_of(lo) * 0.5 + _float_of(hi) * 0.5)
        mid = tl.where((it < VALUE_ROUNDS) & (by_value > lo) & (by_value < hi), by_value, mid)
        c = tl.sum(tl.where(key > mid[:, None], val, 0), axis=1)
        fits = (c & low) < avail
        down = wide & fits
        up = wide & ~fits
        hi = tl.where(down, mid, hi)
        g_hi = tl.where(down, c & low, g_hi)
        n_hi = tl.where(down, c >> PACK, n_hi)
        lo = tl.where(up, mid, lo)
        n_lo = tl.where(up, c >> PACK, n_lo)
        wide = wide & (n_lo - n_hi > W) & (hi.to(tl.int64) - lo.to(tl.int64) > 1)
        it += 1
    n_win = tl.where(everyone, 0, n_lo - n_hi)  # [GP] live spans in (lo, hi]
    small = (n_win <= W)[:, None]
    win = live & (key > lo[:, None]) & (key <= hi[:, None]) & ~everyone[:, None]
    cs = tl.cumsum(tl.where(win, val, 0), axis=1)  # window sizes | window slots + 1, in id order
    # a wide window (gap 1: all its keys equal hi) ranks by id
    tie = win & ~small & (g_hi[:, None] + (cs & low) - tl.where(live, size, 0) < avail)
    # a small one is compacted and sorted by (key desc, id asc)
    g = tl.arange(0, GP)[:, None]
    tl.store(win_row + g * W + (cs >> PACK) - 1, tl.arange(0, NSP)[None, :], mask=win & small)
    tl.debug_barrier()
    j = tl.arange(0, W)[None, :]
    ent = small & (j < n_win[:, None])
    sid = tl.load(win_row + g * W + j, mask=ent, other=0)
    wkey = _ord32(tl.load(s_rows + g * stride_sh + sid, mask=ent, other=0.0)).to(tl.int64)
    srt = tl.sort(tl.where(ent, (wkey << 32) | (sid ^ ID_MASK), INT64_MIN), dim=1, descending=True)
    sid = ((srt & ID_MASK) ^ ID_MASK).to(tl.int32)
    ssz = tl.load(size_row + sid, mask=ent, other=0)
    before = g_hi[:, None] + tl.cumsum(ssz, axis=1) - ssz
    tl.atomic_add(wv_row + sid, 1.0, mask=ent & (before < avail))
    return live & (everyone[:, None] | (key > hi[:, None]) | tie)


@triton.jit
def _budget_floor(key, rest, free, SLACK):
    """lo with every one of the `free` best keys of rest at keys >= lo, and at most free + SLACK of rest there
    (keys distinct, within +-2^62)."""
    lo = tl.min(tl.where(rest, key, 4611686018427387904), axis=0)
    hi = tl.max(tl.where(rest, key, -4611686018427387904), axis=0) + 1
    c_lo = tl.sum(rest.to(tl.int32), axis=0)  # invariant: count(key >= lo) = c_lo >= free > count(key >= hi)
    it = tl.zeros([], tl.int32)
    while (it < 64) & (hi - lo > 1) & (c_lo > free + SLACK):
        mid = lo + (hi - lo) // 2
        c = tl.sum((rest & (key >= mid)).to(tl.int32), axis=0)
        big = c >= free
        lo = tl.where(big, mid, lo)
        c_lo = tl.where(big, c, c_lo)
        hi = tl.where(big, hi, mid)
        it += 1
    return lo


@triton.jit
def _span_select_kernel(score_ptr, stride_sb, stride_sh, row_ptr, sop_ptr, stride_sop, cov_ptr,
                        forced_ptr, stride_fb, stride_fh, cand_ptr, stride_cb, stride_ch, npages_ptr,
                        size_ptr, votes_ptr, wv_ptr, best_ptr, win_ptr, sortk_ptr,
                        order_ptr, count_ptr, kept_ptr, forced_out_ptr, key_ptr, ns_ptr, rec_spans_ptr,
                        rec_pages_ptr, NS, P, budget, sink_pages,
                        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NSP: tl.constexpr,
                        PP: tl.constexpr, SORT_BLOCK: tl.constexpr, W: tl.constexpr, PACK: tl.constexpr,
                        LAYER: tl.constexpr, RECORD: tl.constexpr):
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
    if RECORD:  # the request's span and page counts as scored (the stage's byte accounting)
        tl.store(rec_spans_ptr + b, tl.load(ns_ptr + row), mask=h == 0)
        tl.store(rec_pages_ptr + b, n_pages, mask=h == 0)
    i = tl.arange(0, NSP)
    iv = i < NS
    p = tl.arange(0, PP)
    valid = (p < n_pages) & (p < P)
    sop_row = sop_ptr + row * stride_sop
    sop = tl.load(sop_row + p, mask=p < P, other=-1).to(tl.int32)  # [PP]
    in_span = valid & (sop >= 0)
    g = tl.arange(0, GP)[:, None]
    votes = tl.zeros([NSP], tl.float32)
    best = tl.full([NSP], NEG_INF, tl.float32)
    tl.store(wv_ptr + base + i, tl.zeros([NSP], tl.float32))
    for hh in range(h_lo, h_lo + n_h):
        forced = _forced_of(forced_ptr, stride_fb, stride_fh, b, hh, p, sink_pages, cov, valid)
        tl.debug_barrier()  # the last head's window is ranked
        size = _free_per_span(sop, in_span & ~forced, size_ptr + base, i)[None, :]  # [1, NSP] int32, 0 past NS
        avail = tl.maximum(budget - tl.sum(forced.to(tl.int32), axis=0), 0)
        s_rows = score_ptr + b.to(tl.int64) * stride_sb + hh * G * stride_sh
        s = tl.load(s_rows + g * stride_sh + i[None, :], mask=(g < G) & iv[None, :], other=NEG_INF)  # [GP, NSP]
        best = tl.maximum(best, tl.max(s, axis=0))
        live = (s > NEG_INF) & (s < float("inf")) & (g < G) & iv[None, :]  # finite scores vote
        ballots = _head_ballots(s, size, avail, live, s_rows, stride_sh, win_ptr + pid.to(tl.int64) * GP * W,
                                wv_ptr + base, size_ptr + base, GP, NSP, W, PACK)
        votes += tl.sum(ballots.to(tl.float32), axis=0)
    tl.store(votes_ptr + base + i, votes)
    tl.store(best_ptr + base + i, best)
    tl.debug_barrier()
    # this head's pages: keys from their span's (votes, best), the budget, the read order
    sv = tl.load(votes_ptr + base + sop, mask=in_span, other=0.0, cache_modifier=".cg") + \
        tl.load(wv_ptr + base + sop, mask=in_span, other=0.0, cache_modifier=".cg")
    sb = tl.load(best_ptr + base + sop, mask=in_span, other=NEG_INF, cache_modifier=".cg")
    finite = (sb > NEG_INF) & (sb < float("inf"))
    cls = tl.where(sop < 0, OUTSIDE_CLASS, tl.where(finite, sv.to(tl.int64) + 1, 0)).to(tl.int64)
    bits = tl.where(finite & (sop >= 0), _ord32(sb).to(tl.int64) + 2147483648, 0)
    key = (cls << 52) | (bits << 20) | (p.to(tl.int64) ^ POS_MASK)  # [PP], distinct
    forced = _forced_of(forced_ptr, stride_fb, stride_fh, b, h, p, sink_pages, cov, valid)
    cand = (tl.load(cand_ptr + b.to(tl.int64) * stride_cb + h * stride_ch + p, mask=valid, other=0) != 0) & valid
    free = tl.maximum(budget - tl.sum(forced.to(tl.int32), axis=0), 0)
    rest = cand & ~forced & (free > 0)
    block = (forced | (rest & (key >= _budget_floor(key, rest, free, SORT_BLOCK - budget)))) != 0
    n_block = tl.sum(block.to(tl.int32), axis=0)
    out = pid.to(tl.int64) * P
    tl.store(forced_out_ptr + out + p, forced.to(tl.int8), mask=p < P)
    if n_block <= SORT_BLOCK:  # the block sorts; its forced pages and first `free` candidates are kept
        _keep_sorted(order_ptr + out, count_ptr + pid, kept_ptr + out, forced_out_ptr + out, key_ptr + out,
                     sortk_ptr + pid.to(tl.int64) * SORT_BLOCK, key, block, forced, n_block, free, p, P, SORT_BLOCK)
    else:  # free = 0 (n_block <= budget + slack otherwise): the forced pages alone, the whole row sorted
        count = tl.sum(forced.to(tl.int32), axis=0)
        tl.store(count_ptr + pid, count)
        tl.store(kept_ptr + out + p, forced.to(tl.int8), mask=p < P)
        tl.store(key_ptr + out + p, NEG_INF, mask=(p < P) & ~forced)
        sort_row(order_ptr + out, key_ptr + out, key, forced, count, p, P, -1, POS_MASK, True)


@triton.jit
def _keep_sorted(order_row, count_ptr, kept_row, forced_row, rank_row, sortk_row, key, block, forced, n_block, free,
                 p, P, SORT_BLOCK: tl.constexpr):
    """Sort the block's keys (desc) and keep its forced pages and its first `free` others: the read order (-1 past
    the count), the count, kept (int8) and rank_row (-(list index) on kept pages, -inf elsewhere)."""
    tl.store(order_row + p, -1, mask=p < P)
    tl.store(kept_row + p, forced.to(tl.int8), mask=p < P)
    tl.store(rank_row + p, NEG_INF, mask=p < P)
    tl.store(sortk_row + tl.cumsum(block.to(tl.int32), axis=0) - 1, key, mask=block)
    tl.debug_barrier()
    j = tl.arange(0, SORT_BLOCK)
    ent = j < n_block
    srt = tl.sort(tl.load(sortk_row + j, mask=ent, other=INT64_MIN), descending=True)
    page = ((srt & POS_MASK) ^ POS_MASK).to(tl.int32)
    is_forced = tl.load(forced_row + page, mask=ent, other=0) != 0
    other = ent & ~is_forced
    take = ent & (is_forced | (tl.cumsum(other.to(tl.int32), axis=0) <= free))
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(count_ptr, tl.sum(take.to(tl.int32), axis=0))
    tl.store(order_row + slot, page, mask=take)
    tl.store(rank_row + page, -slot.to(tl.float32), mask=take)
    tl.store(kept_row + page, 1, mask=take & other)


def span_select(scores, rows, span_of_page, covered, forced, candidates, num_pages, budget_pages: int,
                sink_pages: int, vote: str = "group", record=None, *, num_warps: int | None = None,
                window: int = WINDOW, wide_counts: bool = False):
    """Same contract as reference.span_select, one launch (one program per (request, KV head)). forced and
    candidates may be broadcast over the KV heads (stride 0). record: None, or (num_spans [R] of the table,
    spans_out [B], pages_out [B]): the kernel also writes num_spans[rows] and num_pages there. num_warps, window
    (a power of two): tuning; wide_counts: pack the ballots' sums into int64 even where int32 holds them (tests
    the path of huge rows)."""
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
    if window < 1 or window & (window - 1):
        raise ValueError(f"span_select: window must be a power of two, got {window}")
    dev = scores.device
    scores = scores.float().contiguous()
    PP = _pow2(P, 16)
    forced_in = (forced if forced.stride(-1) == 1 else forced.contiguous()).view(torch.uint8)
    cand = (candidates if candidates.stride(-1) == 1 else candidates.contiguous()).view(torch.uint8)
    order = torch.empty(B, Hkv, P, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    kept = torch.empty(B, Hkv, P, dtype=torch.bool, device=dev)
    forced_out = torch.empty_like(kept)
    order_key = torch.empty(B, Hkv, P, dtype=torch.float32, device=dev)
    NSP = _pow2(NS, 16)
    GP = _pow2(Hq // Hkv)
    window = min(window, NSP)  # a row never needs a wider one
    SORT_BLOCK = sort_block_for(budget_pages + window, P)
    size = torch.empty(B * Hkv, NSP, dtype=torch.int32, device=dev)
    votes = torch.empty(B * Hkv, NSP, dtype=torch.float32, device=dev)
    window_votes = torch.empty_like(votes)
    best = torch.empty_like(votes)
    win = torch.empty(B * Hkv, GP, window, dtype=torch.int32, device=dev)
    fits32 = P.bit_length() + NS.bit_length() <= 31 and not wide_counts
    pack = P.bit_length() if fits32 else 32  # size sums < 2^pack
    sortk = torch.empty(B * Hkv, SORT_BLOCK, dtype=torch.int64, device=dev)
    sop = span_of_page if span_of_page.stride(-1) == 1 else span_of_page.contiguous()
    _span_select_kernel[(B * Hkv,)](
        scores, scores.stride(0), scores.stride(1), rows.contiguous(), sop, sop.stride(0), covered.contiguous(),
        forced_in, forced_in.stride(0), forced_in.stride(1), cand, cand.stride(0), cand.stride(1),
        num_pages.contiguous(), size, votes, window_votes, best, win, sortk,
        order, count, kept.view(torch.int8), forced_out.view(torch.int8), order_key, *(record or (count,) * 3),
        NS, P, int(budget_pages), int(sink_pages),
        HKV=Hkv, G=Hq // Hkv, GP=GP, NSP=NSP, PP=PP, SORT_BLOCK=SORT_BLOCK, W=window, PACK=pack, LAYER=vote == "layer",
        RECORD=record is not None,
        num_warps=num_warps or _warps(max(NSP, PP)))
    return order, count, kept, forced_out, order_key


def _warps(width: int) -> int:
    """Warps for a row of `width` (pow2) pages or span slots: at most 16 elements of a [4, width] tile a thread up to
    2,048, 16 warps past it. Chosen in the stage's layer, where the kernel starts with its code evicted from the L2 by
    the scoring and decode before it, so less code a thread pays (H200, B=16, Llama-8B heads, layer us at 4 / 8 / 16
    warps; benchmarks/seed_methods/span_select_experiments-2026-11-30.md, section 6): 1,024 wide 103.5 / 82.5 / 85.0;
    2,048: 8 warps 123.1, 16 114.2; 4,096: 16 warps 152.6, 32 165.4."""
    return 4 if width <= 512 else 8 if width <= 1024 else 16
