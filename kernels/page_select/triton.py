"""Page selection per (request, KV head) in Triton, and the fused score + select kernel.

Public functions match `reference.py`: select_pages, narrow_pages, page_token_counts,
strided_tail_lse. `score_select` is the fused kernel the Triton pipeline launches once per layer:
it scores every page (box bound or exact page max), keeps forced pages plus the best others under
the budget (threshold by bisection on order-preserving int keys, ties to the lower position with a
cumsum), compacts the kept pages, sorts them with tl.sort on a (key, -position) int64 composite and,
for the certified stop, writes the strided tail LSE of the bounds. One program per (request, KV head).
"""
import math

import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)

from ..page_score.triton import _box_block, _exact_block, _load_q_group, _pow2, dot_f32

NEG_INF = tl.constexpr(float("-inf"))
POS32 = tl.constexpr(4294967295)  # _write_order's keys: the position's complement in the low 32 bits


@triton.jit
def _ord32(x):
    """fp32 -> int32 with the same order (-0.0 folded onto +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _lse_combine(a, b):
    m = tl.maximum(a, b)
    ms = tl.where((m == NEG_INF) | (m == float("inf")), 0.0, m)  # +inf (no bound) stays +inf, not NaN
    return tl.where(m == NEG_INF, NEG_INF, ms + tl.log(tl.exp(a - ms) + tl.exp(b - ms)))


@triton.jit
def _keep_top(ordk, rest, free):
    """The `free` entries of `rest` with the largest ordk (int32; ties: lower index first): bool mask."""
    n_rest = tl.sum(rest.to(tl.int32), axis=0)
    key = ordk.to(tl.int64)
    lo = tl.min(tl.where(rest, key, 2147483647), axis=0)
    hi = tl.max(tl.where(rest, key, -2147483648), axis=0) + 1
    # invariant: count(key >= lo) >= free > count(key >= hi). Stop early once count(key >= mid) == free:
    # then exactly the keys >= lo are kept (no tie to break), typically after ~13 of the 32 halvings of an
    # int32 range.
    it = tl.zeros([], tl.int32)
    exact = lo > hi  # False, as a scalar tensor (a loop-carried value)
    while (it < 32) & (hi - lo > 1) & ~exact:
        mid = lo + (hi - lo) // 2
        c = tl.sum((rest & (key >= mid)).to(tl.int32), axis=0)
        big = c >= free
        lo = tl.where(big, mid, lo)
        hi = tl.where(big, hi, mid)
        exact = c == free
        it += 1
    gt = rest & (key > lo)
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq = rest & (key == lo)
    sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= free - n_gt))
    sel = tl.where(free >= n_rest, rest, sel)
    return (sel & (free > 0)) != 0  # triton >= 3.9 types a where() over bools as int32


@triton.jit
def _write_order(order_row, keys_row, key, keep, count, offs, P,
                 BP: tl.constexpr, SORT_BLOCK: tl.constexpr, OVERFLOW: tl.constexpr = False):
    """Write the kept positions sorted by (key desc, position asc), then -1 up to P. With SORT_BLOCK < BP the
    kept pages are compacted and SORT_BLOCK of them sorted: count <= SORT_BLOCK, or with OVERFLOW a row that
    keeps more sorts all BP positions."""
    comp = (_ord32(key).to(tl.int64) << 32) | (offs.to(tl.int64) ^ POS32)
    sentinel = tl.full([], -2147483648, tl.int32).to(tl.int64) << 32
    if SORT_BLOCK == BP:
        sort_row(order_row, order_row, comp, keep, count, offs, P, sentinel, POS32, False)
    elif OVERFLOW:
        if count > SORT_BLOCK:
            sort_row(order_row, order_row, comp, keep, count, offs, P, sentinel, POS32, False)
        else:
            sort_compacted(order_row, keys_row, order_row, comp, keep, count, offs, P, sentinel, SORT_BLOCK, POS32,
                           False)
    else:
        sort_compacted(order_row, keys_row, order_row, comp, keep, count, offs, P, sentinel, SORT_BLOCK, POS32, False)


@triton.jit
def sort_row(order_row, rank_row, comp, keep, count, offs, P, sentinel, POS: tl.constexpr, RANK: tl.constexpr):
    """Sort the kept int64 keys comp [BP] (descending; the low bits are position ^ POS) and write the positions
    to order_row (-1 past count); RANK: also rank_row[position] = -(list index)."""
    srt = tl.sort(tl.where(keep, comp, sentinel), descending=True)
    pos = ((srt & POS) ^ POS).to(tl.int32)
    tl.store(order_row + offs, tl.where(offs < count, pos, -1), mask=offs < P)
    if RANK:
        tl.store(rank_row + pos, -offs.to(tl.float32), mask=offs < count)


@triton.jit
def sort_compacted(order_row, keys_row, rank_row, comp, keep, count, offs, P, sentinel, SORT_BLOCK: tl.constexpr,
                   POS: tl.constexpr, RANK: tl.constexpr):
    """sort_row for count <= SORT_BLOCK: the kept keys compacted into keys_row [SORT_BLOCK], one small sort."""
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(keys_row + slot, comp, mask=keep & (slot < SORT_BLOCK))
    tl.debug_barrier()
    i = tl.arange(0, SORT_BLOCK)
    c = tl.load(keys_row + i, mask=i < count, other=sentinel)
    srt = tl.sort(c, descending=True)
    pos = ((srt & POS) ^ POS).to(tl.int32)
    tl.store(order_row + i, tl.where(i < count, pos, -1), mask=i < P)
    tl.store(order_row + offs, -1, mask=(offs >= SORT_BLOCK) & (offs < P))
    if RANK:
        tl.store(rank_row + pos, -i.to(tl.float32), mask=i < count)


@triton.jit
def _page_terms(order_row, bound_row, idx, live, seq_len, n_pages, PAGE: tl.constexpr):
    """U_b + log n_b of the pages at list indices idx (bound_row by page position); -inf where not live."""
    pos = tl.load(order_row + idx, mask=live, other=0)
    bnd = tl.load(bound_row + pos, mask=live, other=NEG_INF)
    ntok = tl.where(pos == n_pages - 1, seq_len - (n_pages - 1) * PAGE, PAGE)
    return tl.where(live & (ntok > 0), bnd + tl.log(tl.maximum(ntok, 1).to(tl.float32)), NEG_INF)


@triton.jit
def _tail_lse(order_row, bound_row, tail_row, count, seq_len, n_pages, num_splits, P,
              PAGE: tl.constexpr, KP: tl.constexpr, SP: tl.constexpr):
    """tail[i] = LSE_{j >= i, j = i mod S, j < count} (U_j + log n_j), for i < P (-inf past count)."""
    k = tl.arange(0, KP)[:, None]
    r = tl.arange(0, SP)[None, :]
    idx = k * num_splits + r  # [KP, SP]: column r is split r's positions
    live = (r < num_splits) & (idx < count)
    term = _page_terms(order_row, bound_row, idx, live, seq_len, n_pages, PAGE)
    tail = tl.associative_scan(term, 0, _lse_combine, reverse=True)
    tl.store(tail_row + idx, tail, mask=live)


@triton.jit
def _program_row(pid, seq_ptr, pt_ptr, stride_ptb, P, HKV: tl.constexpr, PAGE: tl.constexpr):
    """A (request, KV head) program's request b, head h, row offset into [B * Hkv, P] buffers, sequence
    length, page count and page-table row."""
    b = pid // HKV
    seq_len = tl.load(seq_ptr + b)
    return (b, pid % HKV, pid.to(tl.int64) * P, seq_len, (seq_len + PAGE - 1) // PAGE,
            pt_ptr + b.to(tl.int64) * stride_ptb)


@triton.jit
def _score_select_kernel(
        q_ptr, stride_qb, stride_qh,
        a_ptr, b_ptr, stride_ap, stride_ah, stride_at,  # key_min/key_max [pages, Hkv, D] or k cache twice
        pt_ptr, stride_ptb, seq_ptr, forced_ptr, stride_fb,
        scores_ptr, keys_ptr, order_ptr, count_ptr, tail_ptr, terms_ptr, arrivals_ptr,
        P, sm_scale, budget, num_splits,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        PAGE: tl.constexpr, SCORE: tl.constexpr, SELECT: tl.constexpr, FORCED_ONLY: tl.constexpr,
        CERTIFIED: tl.constexpr, TERMS: tl.constexpr, LAST_FIRST: tl.constexpr, BLOCK_S: tl.constexpr,
        BP: tl.constexpr, SORT_BLOCK: tl.constexpr,
        KP: tl.constexpr, SP: tl.constexpr, DOT_F32: tl.constexpr, NUM_STAGES: tl.constexpr,
        SCORE_SPLITS: tl.constexpr):
    # SCORE: 0 none (natural order), 1 box bound, 2 exact page max.
    # SCORE_SPLITS > 1: program (pid, s) scores the s-th slice of the pages; the slice that arrives last
    # (a per-row counter in arrivals_ptr, reset by that program) selects for the whole row.
    pid = tl.program_id(0)
    b, h, row, seq_len, n_pages, pt_row = _program_row(pid, seq_ptr, pt_ptr, stride_ptb, P, HKV, PAGE)
    if SCORE != 0:
        q = _load_q_group(q_ptr, stride_qb, stride_qh, b, h, G, GP, D, DP)
        qpos = tl.maximum(q, 0.0)
        qneg = tl.minimum(q, 0.0)
        if SCORE_SPLITS > 1:
            span = tl.cdiv(tl.cdiv(n_pages, SCORE_SPLITS), BLOCK_S) * BLOCK_S
            p_lo = tl.program_id(1) * span
            p_hi = tl.minimum(p_lo + span, n_pages)
        else:
            p_lo = 0
            p_hi = n_pages
        for p0 in tl.range(p_lo, p_hi, BLOCK_S, num_stages=NUM_STAGES):
            p = p0 + tl.arange(0, BLOCK_S)
            pm = p < p_hi
            phys = tl.load(pt_row + p, mask=pm, other=0)
            if SCORE == 1:
                s = _box_block(qpos, qneg, a_ptr, b_ptr, stride_ap, stride_ah, phys, h, pm,
                               G, GP, D, DP, DOT_F32)
            else:
                s = _exact_block(q, a_ptr, stride_ap, stride_ah, stride_at, phys, p, h, pm, seq_len,
                                 G, GP, D, DP, PAGE, BLOCK_S, DOT_F32)
            tl.store(scores_ptr + row + p, s * sm_scale, mask=pm)
        tl.debug_barrier()
    if SCORE_SPLITS > 1:
        # acq_rel at GPU scope after the CTA barrier: every slice's scores are visible to the last arrival
        arrived = tl.atomic_add(arrivals_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SCORE_SPLITS - 1:
            tl.store(arrivals_ptr + pid, 0)
            tl.debug_barrier()
            _select_row(pid, b, row, seq_len, n_pages, scores_ptr, keys_ptr, order_ptr, count_ptr, tail_ptr,
                        terms_ptr, forced_ptr, stride_fb, P, budget, num_splits, PAGE, SCORE, SELECT, FORCED_ONLY,
                        CERTIFIED, TERMS, LAST_FIRST, BP, SORT_BLOCK, KP, SP)
    else:
        _select_row(pid, b, row, seq_len, n_pages, scores_ptr, keys_ptr, order_ptr, count_ptr, tail_ptr,
                    terms_ptr, forced_ptr, stride_fb, P, budget, num_splits, PAGE, SCORE, SELECT, FORCED_ONLY,
                    CERTIFIED, TERMS, LAST_FIRST, BP, SORT_BLOCK, KP, SP)


@triton.jit
def _score_order_splits_kernel(
        q_ptr, stride_qb, stride_qh, a_ptr, b_ptr, stride_ap, stride_ah, stride_at,
        pt_ptr, stride_ptb, seq_ptr, scores_ptr, order_ptr, phys_ptr, count_ptr, tail_ptr, terms_ptr,
        P, sm_scale, num_splits,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        PAGE: tl.constexpr, SCORE: tl.constexpr, CERTIFIED: tl.constexpr, TERMS: tl.constexpr, PHYS: tl.constexpr,
        LAST_FIRST: tl.constexpr, BLOCK_S: tl.constexpr, KP: tl.constexpr, DOT_F32: tl.constexpr):
    """Every page kept, split-local order (reference.order_within_splits): program (row, s) scores the pages
    p = s + k*S of its split, sorts them and writes list positions s + k*S, with their tail LSE and terms."""
    order_split(tl.program_id(0), tl.program_id(1), q_ptr, stride_qb, stride_qh, a_ptr, b_ptr, stride_ap,
                stride_ah, stride_at, pt_ptr, stride_ptb, seq_ptr, scores_ptr, order_ptr, phys_ptr, count_ptr,
                tail_ptr, terms_ptr, P, sm_scale, num_splits, HKV, G, GP, D, DP, PAGE, SCORE, CERTIFIED, TERMS,
                PHYS, LAST_FIRST, BLOCK_S, KP, DOT_F32)


@triton.jit
def order_split(pid, s, q_ptr, stride_qb, stride_qh, a_ptr, b_ptr, stride_ap, stride_ah, stride_at,
                pt_ptr, stride_ptb, seq_ptr, scores_ptr, order_ptr, phys_ptr, count_ptr, tail_ptr, terms_ptr,
                P, sm_scale, num_splits,
                HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                PAGE: tl.constexpr, SCORE: tl.constexpr, CERTIFIED: tl.constexpr, TERMS: tl.constexpr,
                PHYS: tl.constexpr, LAST_FIRST: tl.constexpr, BLOCK_S: tl.constexpr, KP: tl.constexpr,
                DOT_F32: tl.constexpr):
    """_score_order_splits_kernel's work for row pid, split s; also run at the head of the ART decode
    (paged_decode's `order_from`: one launch). It writes and reads back only split s's slots of scores."""
    b, h, row, seq_len, n_pages, pt_row = _program_row(pid, seq_ptr, pt_ptr, stride_ptb, P, HKV, PAGE)
    n_mine = (tl.maximum(n_pages - s, 0) + num_splits - 1) // num_splits
    q = _load_q_group(q_ptr, stride_qb, stride_qh, b, h, G, GP, D, DP)
    qpos = tl.maximum(q, 0.0)
    qneg = tl.minimum(q, 0.0)
    for k0 in range(0, n_mine, BLOCK_S):
        kb = k0 + tl.arange(0, BLOCK_S)
        pm = kb < n_mine
        p = s + kb * num_splits
        phys = tl.load(pt_row + p, mask=pm, other=0)
        if SCORE == 1:
            sc = _box_block(qpos, qneg, a_ptr, b_ptr, stride_ap, stride_ah, phys, h, pm, G, GP, D, DP, DOT_F32)
        else:
            sc = _exact_block(q, a_ptr, stride_ap, stride_ah, stride_at, phys, p, h, pm, seq_len,
                              G, GP, D, DP, PAGE, BLOCK_S, DOT_F32)
        tl.store(scores_ptr + row + p, sc * sm_scale, mask=pm)
    tl.debug_barrier()
    k = tl.arange(0, KP)
    live = k < n_mine  # [KP]: split slots k; after the sort, slot k < n_mine holds a page
    p = s + k * num_splits
    key = tl.load(scores_ptr + row + p, mask=live, other=NEG_INF)
    if LAST_FIRST:
        key = tl.where(p == n_pages - 1, float("inf"), key)
    comp = (_ord32(key).to(tl.int64) << 32) | (4294967295 - k.to(tl.int64))
    sentinel = tl.full([], -2147483648, tl.int32).to(tl.int64) << 32
    srt = tl.sort(tl.where(live, comp, sentinel), descending=True)
    pos = s + (4294967295 - (srt & 4294967295)).to(tl.int32) * num_splits  # the k-th best page of split s
    tl.store(order_ptr + row + p, tl.where(live, pos, -1), mask=p < P)
    if PHYS:
        tl.store(phys_ptr + row + p, tl.load(pt_row + pos, mask=live, other=-1), mask=p < P)
    if s == 0:
        tl.store(count_ptr + pid, n_pages)
    if CERTIFIED:
        bnd = tl.load(scores_ptr + row + pos, mask=live, other=NEG_INF)
        ntok = tl.where(pos == n_pages - 1, seq_len - (n_pages - 1) * PAGE, PAGE)
        term = tl.where(live & (ntok > 0), bnd + tl.log(tl.maximum(ntok, 1).to(tl.float32)), NEG_INF)
        tl.store(tail_ptr + row + p, tl.associative_scan(term, 0, _lse_combine, reverse=True), mask=p < P)
        if TERMS:
            tl.store(terms_ptr + row + p, term, mask=p < P)


@triton.jit
def _select_row(pid, b, row, seq_len, n_pages, scores_ptr, keys_ptr, order_ptr, count_ptr, tail_ptr,
                terms_ptr, forced_ptr, stride_fb, P, budget, num_splits,
                PAGE: tl.constexpr, SCORE: tl.constexpr, SELECT: tl.constexpr, FORCED_ONLY: tl.constexpr,
                CERTIFIED: tl.constexpr, TERMS: tl.constexpr, LAST_FIRST: tl.constexpr, BP: tl.constexpr,
                SORT_BLOCK: tl.constexpr, KP: tl.constexpr,
                SP: tl.constexpr):
    """Keep, order and write one (request, KV head) row from its scores (see score_select)."""
    offs = tl.arange(0, BP)
    valid = offs < n_pages
    forced = tl.load(forced_ptr + b.to(tl.int64) * stride_fb + offs, mask=valid, other=0) != 0
    forced = forced & valid
    if SELECT:
        key = tl.load(scores_ptr + row + offs, mask=valid, other=NEG_INF, cache_modifier=".cg")
        n_forced = tl.sum(forced.to(tl.int32), axis=0)
        free = tl.maximum(budget - n_forced, 0)
        keep = forced | _keep_top(_ord32(key), valid & ~forced, free)
    elif FORCED_ONLY:
        keep = forced
    else:
        keep = valid
    count = tl.sum(keep.to(tl.int32), axis=0)
    tl.store(count_ptr + pid, count)
    if SCORE == 0:  # natural order: compaction only
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(order_ptr + row + slot, offs, mask=keep)
        tl.store(order_ptr + row + offs, -1, mask=(offs >= count) & (offs < P))
    else:
        if not SELECT:
            key = tl.load(scores_ptr + row + offs, mask=valid, other=NEG_INF, cache_modifier=".cg")
        if LAST_FIRST:  # the request's last page heads the order (it is always kept)
            key = tl.where(offs == n_pages - 1, float("inf"), key)
        _write_order(order_ptr + row, keys_ptr + pid.to(tl.int64) * SORT_BLOCK, key, keep, count, offs, P,
                     BP, SORT_BLOCK)
        if CERTIFIED:
            tl.store(tail_ptr + row + offs, NEG_INF, mask=(offs >= count) & (offs < P))
            tl.debug_barrier()
            _tail_lse(order_ptr + row, scores_ptr + row, tail_ptr + row, count, seq_len, n_pages,
                      num_splits, P, PAGE, KP, SP)
            if TERMS:  # the calibrated stop: each listed page's U + log n, in list order
                tl.store(terms_ptr + row + offs, _page_terms(order_ptr + row, scores_ptr + row, offs,
                                                              offs < count, seq_len, n_pages, PAGE), mask=offs < P)


@triton.jit
def _select_kernel(key_ptr, forced_ptr, stride_fb, stride_fh, cand_ptr, stride_cb, stride_ch, npages_ptr, kept_ptr,
                   keys_ptr, order_ptr, count_ptr, H, P, budget, budget_ptr,
                   HAS_BUDGET: tl.constexpr, ROW_BUDGET: tl.constexpr, VALID: tl.constexpr, KEPT: tl.constexpr,
                   BP: tl.constexpr, SORT_BLOCK: tl.constexpr):
    """select_pages (narrow_pages: VALID, pages past the request's count out of play, and KEPT, the kept mask
    written): one program per (request, KV head); rows keeping more than SORT_BLOCK sort all BP. forced and
    candidates are read through their strides (0 where broadcast over the heads)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    if ROW_BUDGET:  # one budget per (request, KV head)
        budget = tl.load(budget_ptr + pid)
    row = pid.to(tl.int64) * P
    offs = tl.arange(0, BP)
    inP = offs < P
    if VALID:
        inP = inP & (offs < tl.load(npages_ptr + b))
    key = tl.load(key_ptr + row + offs, mask=inP, other=NEG_INF)
    forced = (tl.load(forced_ptr + b.to(tl.int64) * stride_fb + h * stride_fh + offs, mask=inP, other=0) != 0) & inP
    cand = (tl.load(cand_ptr + b.to(tl.int64) * stride_cb + h * stride_ch + offs, mask=inP, other=0) != 0) & inP
    if HAS_BUDGET:
        free = tl.maximum(budget - tl.sum(forced.to(tl.int32), axis=0), 0)
        keep = forced | _keep_top(_ord32(key), cand & ~forced, free)
    else:
        keep = forced | cand
    count = tl.sum(keep.to(tl.int32), axis=0)
    tl.store(count_ptr + pid, count)
    if KEPT:
        tl.store(kept_ptr + row + offs, keep.to(tl.int8), mask=offs < P)
    _write_order(order_ptr + row, keys_ptr + pid.to(tl.int64) * SORT_BLOCK, key, keep, count, offs, P,
                 BP, SORT_BLOCK, True)


@triton.jit
def _tail_kernel(bound_ptr, tok_ptr, count_ptr, tail_ptr, N, num_splits, ROWS: tl.constexpr, SP: tl.constexpr):
    """One (request, KV head): the list's rows of num_splits slots (row k: slots k*S .. k*S + S-1), the live rows
    (slots < count) scanned from the last in chunks of ROWS, each chunk's reverse LSE scan joined to the chunks
    after it; the rows past them get -inf without a scan."""
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * N
    count = tl.minimum(tl.load(count_ptr + pid), N)
    kk = tl.arange(0, ROWS)[:, None]
    r = tl.arange(0, SP)[None, :]
    live_rows = (count + num_splits - 1) // num_splits
    chunks = (live_rows + ROWS - 1) // ROWS
    after = tl.full([SP], NEG_INF, tl.float32)  # per column: the LSE of the chunks after this one
    for c in range(0, chunks):
        idx = ((chunks - 1 - c) * ROWS + kk) * num_splits + r
        live = (r < num_splits) & (idx < count)
        bnd = tl.load(bound_ptr + row + idx, mask=live, other=NEG_INF).to(tl.float32)
        ntok = tl.load(tok_ptr + row + idx, mask=live, other=0)
        term = tl.where(live & (ntok > 0), bnd + tl.log(tl.maximum(ntok, 1).to(tl.float32)), NEG_INF)
        tail = _lse_combine(tl.associative_scan(term, 0, _lse_combine, reverse=True), after[None, :])
        tl.store(tail_ptr + row + idx, tail, mask=(r < num_splits) & (idx < N))
        after = tl.max(tl.where(kk == 0, tail, NEG_INF), axis=0)
    for k0 in range(chunks * ROWS, (N + num_splits - 1) // num_splits, ROWS):  # no live slot: empty tails
        idx = (k0 + kk) * num_splits + r
        tl.store(tail_ptr + row + idx, tl.full([ROWS, SP], NEG_INF, tl.float32), mask=(r < num_splits) & (idx < N))


def sort_block_for(max_kept: int, P: int) -> int:
    """Compaction buffer size: the kept pages (<= max_kept) sorted in one tl.sort."""
    bp = _pow2(P, 16)
    return min(bp, _pow2(max_kept, 16))


def select_pages(order_key, forced, candidates, budget_pages: int | None):
    """Same contract as reference.select_pages: (order [B, Hkv, P] int32 (-1 pad), count [B, Hkv] int32)."""
    return _select(order_key, forced, candidates, budget_pages, None)[:2]


def narrow_pages(order_key, forced, candidates, num_pages, budget_pages: int):
    """Same contract as reference.narrow_pages, one launch: (order, count, kept [B, Hkv, P] bool)."""
    return _select(order_key, forced, candidates, budget_pages, num_pages)


def _select(order_key, forced, candidates, budget_pages, num_pages):
    B, H, P = order_key.shape
    key = order_key.float().contiguous()
    forced, cand = (_rows_of(m.expand(B, H, P)) for m in (forced, candidates))
    order = torch.empty(B, H, P, dtype=torch.int32, device=key.device)
    count = torch.empty(B, H, dtype=torch.int32, device=key.device)
    kept = torch.empty(B, H, P, dtype=torch.bool, device=key.device) if num_pages is not None else None
    BP = _pow2(P, 16)
    row_budget = isinstance(budget_pages, torch.Tensor)  # broadcastable to [B, H, 1], as in the reference
    # a row keeps its budget unless it forces more: sort a block of the budget's size, the whole row past it
    SB = BP if budget_pages is None or row_budget else sort_block_for(int(budget_pages), P)
    keys = torch.empty(B * H if SB < BP else 1, SB, dtype=torch.int64, device=key.device)
    budgets = budget_pages.expand(B, H, 1).reshape(B * H).to(torch.int32).contiguous() if row_budget else count
    _select_kernel[(B * H,)](key, forced, forced.stride(0), forced.stride(1), cand, cand.stride(0), cand.stride(1),
                             count if num_pages is None else num_pages.to(torch.int32).contiguous(),
                             count if kept is None else kept.view(torch.int8), keys, order, count, H, P,
                             0 if budget_pages is None or row_budget else int(budget_pages), budgets,
                             HAS_BUDGET=budget_pages is not None, ROW_BUDGET=row_budget, VALID=num_pages is not None,
                             KEPT=kept is not None, BP=BP, SORT_BLOCK=SB, num_warps=4 if BP <= 1024 else 8)
    return order, count, kept


def _rows_of(mask):
    """A [B, H, P] mask as bytes the kernel reads through its strides (no copy when the pages are contiguous)."""
    return (mask if mask.stride(-1) == 1 else mask.contiguous()).view(torch.uint8)


@triton.jit
def _token_counts_kernel(order_ptr, lens_ptr, out_ptr, H, N, PAGE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seq_len = tl.load(lens_ptr + pid // H).to(tl.int32)
    last = (seq_len + PAGE - 1) // PAGE - 1
    pos = tl.load(order_ptr + pid.to(tl.int64) * N + i, mask=i < N, other=-1)
    n = tl.where(pos == last, seq_len - last * PAGE, PAGE)
    tl.store(out_ptr + pid.to(tl.int64) * N + i, tl.where(pos >= 0, n, 0), mask=i < N)


def page_token_counts(order, page_table_lens, page_size: int):
    """Same values as reference.page_token_counts, as int32 (what strided_tail_lse reads), in one launch."""
    B, H, N = order.shape
    out = torch.empty(B, H, N, dtype=torch.int32, device=order.device)
    if out.numel():
        block = min(_pow2(N, 16), 1024)
        _token_counts_kernel[(B * H, triton.cdiv(N, block))](order.contiguous(), page_table_lens.contiguous(), out,
                                                              H, N, PAGE=page_size, BLOCK=block)
    return out


def strided_tail_lse(bounds, tokens, count, num_splits: int, chunk_rows: int = 128):
    """Same contract as reference.strided_tail_lse: [B, Hkv, N] fp32, -inf where the tail is empty. Only the rows
    of slots below each row's count are scanned, `chunk_rows` (a power of two) rows of num_splits slots at a time."""
    if chunk_rows < 1 or chunk_rows & (chunk_rows - 1):
        raise ValueError(f"strided_tail_lse: chunk_rows must be a power of two, got {chunk_rows}")
    B, H, N = bounds.shape
    tail = torch.empty(B, H, N, dtype=torch.float32, device=bounds.device)
    rows = min(chunk_rows, _pow2(math.ceil(N / num_splits)))
    _tail_kernel[(B * H,)](bounds.contiguous(), tokens.to(torch.int32).contiguous(), count.contiguous(), tail,
                           N, num_splits, ROWS=rows, SP=_pow2(num_splits))
    return tail


def score_select(q, summary_a, summary_b, page_table, seq_lens, forced, *, num_kv_heads: int, page_size: int,
                 sm_scale: float, score: int, select: bool, budget_pages: int, forced_only: bool,
                 certified: bool, num_splits: int, max_kept: int, block_s: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, score_splits: int | None = None,
                 terms_out=None, last_first: bool = False, within_splits: bool = False, phys_out=None):
    """Fused scoring + selection for one layer (one launch, no host sync).

    score: 0 none (kept pages in natural order), 1 box bound (summary_a/b = key_min/key_max
    [pages, Hkv, D]), 2 exact page max (summary_a = summary_b = k cache [pages, Hkv, S, D]).
    select: keep forced + the best pages under budget_pages by the score; else keep the forced pages
    (forced_only) or every page, ordered by the score. forced [B, P] bool.
    max_kept: a static upper bound on the kept pages per (request, KV head) (sizes the sort).
    block_s / num_warps / num_stages: launch tuning (benchmarks/kernel_sweep.py sweeps them).
    score_splits: programs per (request, KV head) that score slices of the pages (None: enough to give the
    GPU's SMs about 4 programs each; 1 on CPU). The last slice to finish selects, in the same launch.
    terms_out: None, or a [B, Hkv, P] fp32 buffer (certified=True, score != 0) that receives each listed
    page's U + log n in list order (reference.tail_terms; -inf past count), for the calibrated stop.
    last_first: the request's last page heads the order (the calibrated stop's read order; score != 0).
    within_splits: every page kept (no select, not forced_only, score != 0) in the split-local order of
    reference.order_within_splits: one program per (request, KV head, split), no global sort.
    phys_out: None, or (within_splits only) a contiguous int32 [B, Hkv, P] buffer that receives
    page_table[b, order] (-1 past count), for paged_decode's `phys`.
    Returns (order [B, Hkv, P] int32, count [B, Hkv] int32, tail [B, Hkv, P] fp32 or None).
    """
    B, Hq, D = q.shape
    Hkv = num_kv_heads
    G = Hq // Hkv
    P = page_table.shape[1]
    dev = q.device
    BP = _pow2(P, 16)
    SB = sort_block_for(max_kept, P) if select or forced_only else BP
    order = torch.empty(B, Hkv, P, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    scores = torch.empty(B, Hkv, P, dtype=torch.float32, device=dev) if score else order
    keys = torch.empty(B * Hkv, SB, dtype=torch.int64, device=dev) if score and SB < BP else order
    tail = torch.empty(B, Hkv, P, dtype=torch.float32, device=dev) if certified else None
    if terms_out is not None and (not certified or not score or terms_out.shape != (B, Hkv, P)
                                  or terms_out.dtype != torch.float32 or not terms_out.is_contiguous()):
        raise ValueError(f"terms_out: expected a contiguous fp32 [B, Hkv, P] = {[B, Hkv, P]} buffer with "
                         f"certified=True and a score, got {list(terms_out.shape)} {terms_out.dtype}, "
                         f"certified={certified}, score={score}")
    a = summary_a if score else q
    b_ = summary_b if score else q
    st = a.stride() if score else (0, 0, 0)
    exact = score == 2
    elt = a.element_size() if score else 4
    BLOCK_S = block_s or (16 if exact else box_block_s(D, elt))
    if within_splits:
        if select or forced_only or not score:
            raise ValueError("within_splits: every page is kept and ordered by a score (select=False, "
                             f"forced_only=False, score != 0), got select={select}, forced_only={forced_only}, "
                             f"score={score}")
        if phys_out is not None and (phys_out.shape != (B, Hkv, P) or phys_out.dtype != torch.int32
                                     or not phys_out.is_contiguous()):
            raise ValueError(f"phys_out: expected a contiguous int32 [B, Hkv, P] = {[B, Hkv, P]} buffer, got "
                             f"{list(phys_out.shape)} {phys_out.dtype}")
        S = max(1, int(num_splits))
        KP = _pow2(-(-P // S), 16)
        _score_order_splits_kernel[(B * Hkv, S)](
            q, q.stride(0), q.stride(1), a, b_, st[0], st[1], st[2] if exact else 0,
            page_table, page_table.stride(0), seq_lens, scores, order, order if phys_out is None else phys_out,
            count, tail if certified else scores, terms_out if terms_out is not None else scores, P,
            float(sm_scale), S, HKV=Hkv, G=G, GP=_pow2(G, 16), D=D, DP=_pow2(D, 16), PAGE=page_size, SCORE=score,
            CERTIFIED=bool(certified), TERMS=terms_out is not None, PHYS=phys_out is not None,
            LAST_FIRST=bool(last_first),
            BLOCK_S=BLOCK_S, KP=KP, DOT_F32=dot_f32(q, a.dtype), num_warps=num_warps or (4 if KP <= 2048 else 8))
        return order, count, tail
    if phys_out is not None:
        raise ValueError("phys_out is written by the split-local order only (within_splits=True)")
    KP = _pow2(math.ceil(min(P, SB) / num_splits)) if certified else 1  # count <= SB
    SP = _pow2(num_splits) if certified else 1
    # H100 sweep (benchmarks/kernel_sweep.py, bf16 Llama shapes): 128 pages of box summaries per block (64 KB of
    # key min+max, BLOCK_S above), 4 warps; 8 warps and 3 stages past 2048 pages. fp32 summaries keep the tile
    # at 64 KB.
    nw = num_warps or (4 if BP <= 2048 else 8)
    if num_stages is None:
        num_stages = 3 if BP > 2048 and elt <= 2 else 2
    splits = _score_splits(B * Hkv, P, BLOCK_S, dev) if score_splits is None else int(score_splits)
    splits = max(1, min(splits, -(-P // BLOCK_S))) if score else 1
    arrivals = _arrivals(B * Hkv, dev) if splits > 1 else count
    _score_select_kernel[(B * Hkv, splits)](
        q, q.stride(0), q.stride(1), a, b_, st[0], st[1], st[2] if exact else 0,
        page_table, page_table.stride(0), seq_lens, forced, forced.stride(0),
        scores, keys, order, count, tail if certified else scores,
        terms_out if terms_out is not None else scores, arrivals,
        P, float(sm_scale), int(budget_pages), int(num_splits),
        HKV=Hkv, G=G, GP=_pow2(G, 16), D=D, DP=_pow2(D, 16), PAGE=page_size, SCORE=score,
        SELECT=bool(select), FORCED_ONLY=bool(forced_only), CERTIFIED=bool(certified),
        TERMS=terms_out is not None, LAST_FIRST=bool(last_first) and bool(score),
        BLOCK_S=BLOCK_S, BP=BP, SORT_BLOCK=SB, KP=KP, SP=SP,
        DOT_F32=dot_f32(q, a.dtype) if score else True, NUM_STAGES=num_stages, SCORE_SPLITS=splits,
        num_warps=nw)
    return order, count, tail


def box_block_s(D: int, elt: int) -> int:
    """Pages of box summaries scored per block: 64 KB of key min + max (H100 sweep, kernel_sweep.py)."""
    return max(16, min(128, 32768 // (_pow2(D, 16) * elt)))


_SMS: dict = {}
_ARRIVALS: dict = {}
_RETIRED: list = []


def sm_count(dev) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _score_splits(rows: int, P: int, block_s: int, dev) -> int:
    """Scoring slices per row: about 4 programs per SM, each slice at least 4 blocks of pages; 1 on CPU."""
    if dev.type != "cuda":
        return 1
    want = -(-4 * sm_count(dev) // rows)
    return max(1, min(want, P // (4 * block_s), 16))


def _arrivals(rows: int, dev) -> torch.Tensor:
    """Per-row arrival counters (int32, zero between launches: the last arrival resets its row), one buffer
    per device. Launches run in stream order, so split-scoring launches must not run concurrently on two
    streams of one device. A CUDA graph keeps the buffer's address: a buffer is never freed (a bigger one
    replaces it, the old one stays alive), and none may be first allocated during a capture."""
    key = str(dev)
    buf = _ARRIVALS.get(key)
    if buf is None or buf.numel() < rows:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"score_select: its arrival counters for {rows} rows are allocated on the first "
                               f"eager call; run one eager decode step at this batch size before capturing "
                               f"a CUDA graph")
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(rows, 1 << 16), dtype=torch.int32, device=dev)
        _ARRIVALS[key] = buf
    return buf
