"""Paged decode over an ordered page list with ART's run-time stop, in Triton.

Same signature and outputs as `reference.py`. One program per (request, KV head, split) computes all
G query heads of the group with tl.dot (G padded to 16). Split s reads list positions s, s+S, s+2S...
(strided layout) in blocks of BLOCK_PAGES pages; the stop rule is checked after every `chunk_pages` of
its pages. With S > 1 a merge kernel combines the splits by LSE. Dense decode is the same kernel with
NATURAL=True (position i of the list is page i) and no stop. See README.md for the rules.
"""
import math

import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2
from .output import DecodeOut
from . import tuning
from ..page_score.triton import dot_f32 as score_dot_f32
from ..page_select.triton import box_block_s, order_split

NEG_INF = tl.constexpr(float("-inf"))
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

RULES = {None: 0, "stability": 1, "certified": 2, "calibrated": 3}


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 (ties to even), returned as fp32: torch's rounding, done on the bits so that
    the GPU and TRITON_INTERPRET (whose cast truncates) agree."""
    u = x.to(tl.uint32, bitcast=True)
    u = u + (((u >> 16) & 1) + 0x7FFF)
    return ((u >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _attend_block(q, m, l, acc, j0, s, n_mine, num_splits, order_row, pt_row, phys_row, last_phys, last_n,
                  k_ptr, v_ptr, stride_kp, stride_kh, stride_kt, h, seq_len, qk_scale, mass_row, P_PAD, terms_row,
                  NATURAL: tl.constexpr, PHYS: tl.constexpr, BLOCK_PAGES: tl.constexpr, PAGE: tl.constexpr,
                  D: tl.constexpr, DP: tl.constexpr, DOT_F32: tl.constexpr, TOK: tl.constexpr,
                  G: tl.constexpr, GP: tl.constexpr, PAGE_MASS: tl.constexpr, CALIB: tl.constexpr):
    """Online softmax over BLOCK_PAGES pages of this split (its j0-th.. in list order). m in log2 units.
    PAGE_MASS: also store each page's log mass (natural log, unnormalised) at mass_row[g * P_PAD + pos].
    CALIB: also return max over the block's pages of (log mass - terms_row[list index]) per head [GP]
    (the calibrated stop's observed ratio of mass to bound); -inf otherwise.
    PHYS: phys_row holds each list entry's physical page, so K/V wait on one load, not two; the request's
    last page (physical last_phys) holds last_n tokens."""
    tok = tl.arange(0, TOK)
    j = j0 + tok // PAGE
    t = tok % PAGE
    lv = (j < n_mine) & (tok < BLOCK_PAGES * PAGE)
    idx = s + j * num_splits
    if PHYS:
        phys = tl.load(phys_row + idx, mask=lv, other=0)
        tv = lv & (t < tl.where(phys == last_phys, last_n, PAGE))  # [BN]
    else:
        if NATURAL:
            pos = idx
        else:
            pos = tl.load(order_row + idx, mask=lv, other=0)
        phys = tl.load(pt_row + pos, mask=lv, other=0)
        tv = lv & (pos * PAGE + t < seq_len)  # [BN]
    d = tl.arange(0, DP)
    offs = phys.to(tl.int64)[:, None] * stride_kp + h * stride_kh + t[:, None] * stride_kt + d[None, :]
    if DP == D:
        msk = tv[:, None]
    else:
        msk = tv[:, None] & (d < D)[None, :]
    k = tl.load(k_ptr + offs, mask=msk, other=0.0)  # [BN, DP]
    v = tl.load(v_ptr + offs, mask=msk, other=0.0)
    if DOT_F32:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k.to(q.dtype)))
    qk = tl.where(tv[None, :], qk * qk_scale, NEG_INF)  # [GP, BN]
    m_new = tl.maximum(m, tl.max(qk, axis=1))
    ms = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp2(m - ms)
    p = tl.exp2(qk - ms[:, None])
    calib = tl.full([GP], NEG_INF, tl.float32)
    if PAGE_MASS or CALIB:
        ps = tl.sum(tl.reshape(p, [GP, TOK // PAGE, PAGE]), axis=2)  # [GP, pages in the block]
        jj = tl.arange(0, TOK // PAGE)
        jp = j0 + jj
        pv = (jj < BLOCK_PAGES) & (jp < n_mine)
        lm = ms[:, None] * LN2 + tl.log(ps)  # [GP, pages] natural log of each page's mass
        if PAGE_MASS:
            if NATURAL:
                ppos = s + jp * num_splits
            else:
                ppos = tl.load(order_row + s + jp * num_splits, mask=pv, other=0)
            g = tl.arange(0, GP)
            tl.store(mass_row + g[:, None] * P_PAD + ppos[None, :], lm, mask=(g < G)[:, None] & pv[None, :])
        if CALIB:  # only full pages calibrate (a partial page's box is tight: one token's is exact)
            term = tl.load(terms_row + s + jp * num_splits, mask=pv, other=0.0)  # U_b + log n_b
            full = tl.sum(tl.reshape(tv.to(tl.int32), [TOK // PAGE, PAGE]), axis=1) == PAGE
            calib = tl.max(tl.where((pv & full)[None, :], lm - term[None, :], NEG_INF), axis=1)
    l = l * alpha + tl.sum(p, axis=1)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l, acc, calib


@triton.jit
def _bound_stop(tail_row, nidx, N, may, m, l, calib, hv, log_thr, CALIBRATED: tl.constexpr):
    """The certified / calibrated test at list slot nidx (the split's next unread one) where `may` (pages left,
    not stopped): -> (stop, the tail LSE there). Calibrated: the tail scaled by the slack seen, [GP] per head;
    before any full page was seen (calib -inf) the certificate's estimate."""
    nxt = tl.load(tail_row + nidx, mask=may & (nidx < N), other=NEG_INF)
    log_z = m * LN2 + tl.log(tl.maximum(l, 1e-30))
    if CALIBRATED:
        est = nxt + tl.where(calib > NEG_INF, tl.minimum(calib, 0.0), 0.0)
    else:
        est = nxt
    ok = ((est - log_z) <= log_thr) | ~hv
    return may & (tl.min(ok.to(tl.int32), axis=0) > 0), nxt


@triton.jit
def _decode_kernel(q_ptr, stride_qb, stride_qh, k_ptr, v_ptr, stride_kp, stride_kh, stride_kt,
                   pt_ptr, stride_ptb, seq_ptr, order_ptr, phys_ptr, count_ptr, tail_ptr, terms_ptr,
                   out_ptr, stride_ob, stride_oh, pages_ptr, tau_ptr,
                   pm_ptr, pl_ptr, pacc_ptr, ppages_ptr, prem_ptr, mass_ptr, lse_ptr, P_PAD,
                   N, qk_scale, num_splits, scale_tol, direction_tol, patience, log_thr,
                   sa_ptr, sb_ptr, stride_sap, stride_sah, scores_ptr, o_scale,
                   HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   PAGE: tl.constexpr, NATURAL: tl.constexpr, PHYS: tl.constexpr, RULE: tl.constexpr,
                   CHUNK: tl.constexpr,
                   BLOCK_PAGES: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                   NUM_STAGES: tl.constexpr, TOK: tl.constexpr, PAGE_MASS: tl.constexpr,
                   ACC_BF16: tl.constexpr, CALIB_RECENT: tl.constexpr, ONCE: tl.constexpr,
                   KC: tl.constexpr, ORDER: tl.constexpr, O_BLOCK_S: tl.constexpr, O_KP: tl.constexpr,
                   O_DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    if ORDER:  # launch_decode's order_from: this split orders its own pages first (page_select.order_split)
        order_split(pid, tl.program_id(1), q_ptr, stride_qb, stride_qh, sa_ptr, sb_ptr, stride_sap, stride_sah, 0,
                    pt_ptr, stride_ptb, seq_ptr, scores_ptr, order_ptr, phys_ptr, count_ptr, tail_ptr, terms_ptr,
                    N, o_scale, num_splits, HKV, G, GP, D, DP, PAGE, 1, True, RULE == 3, PHYS, RULE == 3,
                    O_BLOCK_S, O_KP, O_DOT_F32)
        tl.debug_barrier()  # its slots of order, phys, tail and terms, written above, read below
    s = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    seq_len = tl.load(seq_ptr + b)
    n_pages = (seq_len + PAGE - 1) // PAGE
    if NATURAL or ORDER:  # ORDER: every page is listed (split 0 writes count for the caller, not read here)
        count = n_pages
    else:
        count = tl.load(count_ptr + pid)
    n_mine = (tl.maximum(count - s, 0) + num_splits - 1) // num_splits
    order_row = order_ptr + pid.to(tl.int64) * N
    phys_row = phys_ptr + pid.to(tl.int64) * N
    pt_row = pt_ptr + b.to(tl.int64) * stride_ptb
    last_n = seq_len - (n_pages - 1) * PAGE  # tokens in the request's last page
    last_phys = tl.load(pt_row + tl.maximum(n_pages - 1, 0)) if PHYS else 0
    mass_row = mass_ptr + (b.to(tl.int64) * (HKV * G) + h * G) * P_PAD
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=(g < G)[:, None] & (d < D)[None, :], other=0.0)
    m = tl.full([GP], NEG_INF, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    rem = tl.full([], NEG_INF, tl.float32)
    if RULE == 0:
        for j0 in tl.range(0, n_mine, BLOCK_PAGES, num_stages=NUM_STAGES):
            m, l, acc, _ = _attend_block(q, m, l, acc, j0, s, n_mine, num_splits, order_row, pt_row, phys_row,
                                         last_phys, last_n, k_ptr, v_ptr, stride_kp, stride_kh, stride_kt, h,
                                         seq_len, qk_scale, mass_row, P_PAD, order_row, NATURAL, PHYS,
                                         BLOCK_PAGES, PAGE, D, DP, DOT_F32, TOK, G, GP, PAGE_MASS, False)
        pages = n_mine
    elif ONCE:  # calibrate: once (reference.once_stop_slot): the first chunk, the stop from the bounds, the rest
        tail_row = tail_ptr + pid.to(tl.int64) * N
        terms_row = terms_ptr + pid.to(tl.int64) * N
        calib = tl.full([GP], NEG_INF, tl.float32)
        for jb in tl.range(0, CHUNK, BLOCK_PAGES, num_stages=NUM_STAGES):
            m, l, acc, cb = _attend_block(q, m, l, acc, jb, s, n_mine, num_splits, order_row, pt_row, phys_row,
                                          last_phys, last_n, k_ptr, v_ptr, stride_kp, stride_kh, stride_kt, h,
                                          seq_len, qk_scale, mass_row, P_PAD, terms_row, NATURAL, PHYS,
                                          BLOCK_PAGES, PAGE, D, DP, DOT_F32, TOK, G, GP, PAGE_MASS, True)
            calib = tl.maximum(calib, cb)
        c = tl.where(calib > NEG_INF, tl.minimum(calib, 0.0), 0.0)  # [GP]
        log_z = m * LN2 + tl.log(tl.maximum(l, 1e-30))
        e = (tl.arange(0, KC) + 1) * CHUNK  # [KC] chunk ends, as slots of this split
        cand = e < n_mine
        t_e = tl.load(tail_row + s + e * num_splits, mask=cand, other=NEG_INF)
        ok = ((t_e[None, :] + (c - log_z)[:, None]) <= log_thr) | ~(g < G)[:, None]  # [GP, KC]
        stop_k = cand & (tl.min(ok.to(tl.int32), axis=0) > 0)
        lim = tl.min(tl.where(stop_k, e, n_mine), axis=0)
        for jb in tl.range(CHUNK, lim, BLOCK_PAGES, num_stages=NUM_STAGES):
            m, l, acc, _ = _attend_block(q, m, l, acc, jb, s, lim, num_splits, order_row, pt_row, phys_row,
                                         last_phys, last_n, k_ptr, v_ptr, stride_kp, stride_kh, stride_kt, h,
                                         seq_len, qk_scale, mass_row, P_PAD, terms_row, NATURAL, PHYS,
                                         BLOCK_PAGES, PAGE, D, DP, DOT_F32, TOK, G, GP, PAGE_MASS, False)
        pages = tl.minimum(lim, n_mine)
    else:
        tail_row = tail_ptr + pid.to(tl.int64) * N
        terms_row = terms_ptr + pid.to(tl.int64) * N
        calib = tl.full([GP], NEG_INF, tl.float32)  # calibrated: max over read pages of log mass - (U + log n)
        hv = g < G
        prev_o = tl.zeros([GP, DP], tl.float32)
        run = tl.zeros([], tl.int32)
        c0 = tl.zeros([], tl.int32)
        active = n_mine > 0
        while active:
            cchunk = tl.full([GP], NEG_INF, tl.float32)
            for jb in tl.range(0, CHUNK, BLOCK_PAGES, num_stages=NUM_STAGES):  # pipelined when CHUNK > BLOCK
                m, l, acc, cb = _attend_block(q, m, l, acc, c0 + jb, s, n_mine, num_splits, order_row, pt_row,
                                              phys_row, last_phys, last_n, k_ptr, v_ptr, stride_kp, stride_kh,
                                              stride_kt, h, seq_len, qk_scale, mass_row, P_PAD, terms_row,
                                              NATURAL, PHYS, BLOCK_PAGES, PAGE, D, DP, DOT_F32, TOK, G, GP,
                                              PAGE_MASS, RULE == 3)
                cchunk = tl.maximum(cchunk, cb)
            if CALIB_RECENT:  # the last chunk's slack, where it had a full page
                calib = tl.where(cchunk > NEG_INF, cchunk, calib)
            else:
                calib = tl.maximum(calib, cchunk)
            has_more = c0 + CHUNK < n_mine
            o = acc / tl.maximum(l, 1e-30)[:, None]  # [GP, DP] the running output
            if ACC_BF16:  # kept in bf16 between chunks, as a bf16 accumulator would
                o = _round_bf16(o)
                acc = o * l[:, None]
            if RULE == 1:
                on = tl.sqrt(tl.sum(o * o, axis=1))
                pn = tl.sqrt(tl.sum(prev_o * prev_o, axis=1))
                d_mag = tl.abs(on - pn) / tl.maximum(pn, 1e-30)
                cos = tl.sum(o * prev_o, axis=1) / tl.maximum(on * pn, 1e-30)
                ok = ((d_mag <= scale_tol) & (1.0 - cos <= direction_tol)) | ~hv
                stable = (tl.min(ok.to(tl.int32), axis=0) > 0) & (c0 > 0)
                run = tl.where(stable, run + 1, 0)
                prev_o = o
                stop = has_more & (run >= patience)
            else:  # certified (2) or calibrated (3)
                stop, nxt = _bound_stop(tail_row, s + (c0 + CHUNK) * num_splits, N, has_more, m, l, calib, hv,
                                        log_thr, RULE == 3)
                rem = tl.where(stop, nxt, rem)
            c0 += CHUNK
            active = has_more & ~stop
        pages = tl.minimum(c0, n_mine)
    if SPLIT:
        base = pid * num_splits + s
        gm = g < G
        tl.store(pm_ptr + base * GP + g, m * LN2, mask=gm)
        tl.store(pl_ptr + base * GP + g, l, mask=gm)
        tl.store(pacc_ptr + (base.to(tl.int64) * GP + g)[:, None] * DP + d[None, :], acc, mask=gm[:, None])
        tl.store(ppages_ptr + base, pages)
        if RULE == 2:
            tl.store(prem_ptr + base, rem)
    else:
        o = acc / tl.maximum(l, 1e-30)[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None] & (d < D)[None, :])
        tl.store(pages_ptr + pid, pages)
        if RULE == 2:
            x = rem - (m * LN2 + tl.log(tl.maximum(l, 1e-30)))
            tau = 1.0 / (1.0 + tl.exp(-x))
            tau = tl.where(x != x, 0.0, tau)
            tl.store(tau_ptr + b * (HKV * G) + h * G + g, tau, mask=g < G)
        if PAGE_MASS:
            tl.store(lse_ptr + b * (HKV * G) + h * G + g, m * LN2 + tl.log(l), mask=g < G)


@triton.jit
def _merge_kernel(pm_ptr, pl_ptr, pacc_ptr, ppages_ptr, prem_ptr, out_ptr, stride_ob, stride_oh,
                  pages_ptr, tau_ptr, lse_ptr, num_splits,
                  HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  SPP: tl.constexpr, CERTIFIED: tl.constexpr, PAGE_MASS: tl.constexpr):
    pid = tl.program_id(0)  # over B * Hq
    hq_n = HKV * G
    b = pid // hq_n
    hq = pid % hq_n
    h = hq // G
    g = hq % G
    bh = b * HKV + h
    sp = tl.arange(0, SPP)
    smask = sp < num_splits
    base = bh * num_splits + sp
    m = tl.load(pm_ptr + base * GP + g, mask=smask, other=NEG_INF)
    l = tl.load(pl_ptr + base * GP + g, mask=smask, other=0.0)
    d = tl.arange(0, DP)
    acc = tl.load(pacc_ptr + (base.to(tl.int64) * GP + g)[:, None] * DP + d[None, :], mask=smask[:, None],
                  other=0.0)
    M = tl.max(m, axis=0)
    Ms = tl.where(M == NEG_INF, 0.0, M)
    sc = tl.where(smask, tl.exp(m - Ms), 0.0)
    L = tl.sum(l * sc, axis=0)
    o = tl.sum(acc * sc[:, None], axis=0) / tl.maximum(L, 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + hq * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < D)
    if PAGE_MASS:
        tl.store(lse_ptr + pid, M + tl.log(L))
    if g == 0:
        pr = tl.load(ppages_ptr + base, mask=smask, other=0)
        tl.store(pages_ptr + bh, tl.sum(pr, axis=0))
    if CERTIFIED:
        lz = tl.where(smask, m + tl.log(tl.maximum(l, 1e-30)), NEG_INF)
        zM = tl.max(lz, axis=0)
        zMs = tl.where(zM == NEG_INF, 0.0, zM)
        log_z = tl.where(zM == NEG_INF, NEG_INF, zMs + tl.log(tl.sum(tl.exp(lz - zMs), axis=0)))
        r = tl.load(prem_ptr + base, mask=smask, other=NEG_INF)
        rM = tl.max(r, axis=0)
        rMs = tl.where(rM == NEG_INF, 0.0, rM)
        rem = tl.where(rM == NEG_INF, NEG_INF, rMs + tl.log(tl.sum(tl.exp(r - rMs), axis=0)))
        x = rem - log_z
        tau = 1.0 / (1.0 + tl.exp(-x))
        tau = tl.where(x != x, 0.0, tau)
        tl.store(tau_ptr + pid, tau)


def launch_decode(q, k_cache, v_cache, page_table, seq_lens, order, count, *, sm_scale: float,
                  rule=None, tail_lse=None, bound_terms=None, num_splits: int = 1, natural: bool = False,
                  out_dtype=torch.float32, block_pages: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, page_mass=None, phys=None, order_from=None):
    """Launch decode (+ merge when num_splits > 1). natural=True: list position i is page i, count =
    the request's pages (order/count unused). Returns (out [B, Hq, D] out_dtype, pages_read, tau).
    phys: None, or [B, Hkv, N] int32, the physical page of each list entry (page_table[b, order], as
    score_select's phys_out writes it): K/V are then addressed without the order -> page-table chain.
    order_from (certified and calibrated stops): (key_min, key_max) [pages, Hkv, D], the Quest box summaries.
    Each split first orders its own pages as score_select(within_splits=True, phys_out=...) would (the
    calibrated stop's order: the request's last page first), in the same launch; order, count, tail_lse,
    bound_terms and phys are then allocated here (pass None). Same pages and outputs as the two launches.
    page_mass: None, or a pair (page_lse [B, Hq, P] fp32 pre-filled with -inf, lse [B, Hq] fp32) that
    the kernels fill (see reference.paged_decode); P = page_table.shape[1]."""
    B, Hq, D = q.shape
    Hkv, PAGE = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    GP, DP = _pow2(G, 16), _pow2(D, 16)
    dev = q.device
    kind = rule.kind if rule is not None else None
    R = RULES[kind]
    S = max(1, int(num_splits))
    if order_from is not None:
        if R not in (2, 3) or natural or any(x is not None for x in (order, count, tail_lse, bound_terms, phys)):
            raise ValueError("order_from: for the certified and calibrated stops, with order, count, tail_lse, "
                             "bound_terms and phys left to it (None) and natural=False")
        P_ = page_table.shape[1]
        order = torch.empty(B, Hkv, P_, dtype=torch.int32, device=dev)  # [B, Hkv, P] each split's slots
        count = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
        tail_lse = torch.empty(B, Hkv, P_, dtype=torch.float32, device=dev)
        bound_terms = torch.empty_like(tail_lse) if R == 3 else None
        phys = torch.empty_like(order)
        o_scores = torch.empty_like(tail_lse)
    if R in (2, 3) and tail_lse is None:
        raise ValueError(f"{kind} stop needs tail_lse (page_select.strided_tail_lse)")
    if R == 3 and bound_terms is None:
        raise ValueError("calibrated stop needs bound_terms (page_select.tail_terms, or score_select's terms_out)")
    N = page_table.shape[1] if natural else order.shape[-1]
    if phys is not None and (natural or phys.shape != order.shape or phys.dtype != torch.int32
                             or not phys.is_contiguous()):
        want = None if order is None else list(order.shape)
        raise ValueError(f"phys: expected a contiguous int32 tensor shaped like order {want} (not with "
                         f"natural=True), got {list(phys.shape)} {phys.dtype}")
    chunk = int(rule.chunk_pages) if R else 0
    is_cuda = dev.type == "cuda"
    if block_pages is None and is_cuda:  # measured on this GPU (tuning.py), if recorded
        block_pages = tuning.block_pages(dev, tuning.key(_pow2(D, 16), k_cache.element_size(), PAGE, S > 1,
                                                         bool(R)))
        if block_pages is not None and R:
            block_pages = math.gcd(block_pages, chunk)  # a divisor of the check interval
    if block_pages is None:
        # H100 sweep (benchmarks/kernel_sweep.py): 256 tokens per block without splits, 64 with splits
        tokens = (256 if S == 1 and not R else 128 if S == 1 else 64) if is_cuda else 64
        # a K tile of at most 64 KB (32 KB with a stop rule, whose loop holds more state): on the H200, fp32 at
        # head_dim 128 needed 279 KB of shared memory with a 256-token tile without a rule, and with a
        # 128-token tile under the calibrated rule (limit 227 KB)
        tokens = min(tokens, max(PAGE, (32768 if R else 65536) // (DP * k_cache.element_size())))
        target = max(1, tokens // PAGE)
        block_pages = min(chunk, target) if R else target
    once = R == 3 and getattr(rule, "calibrate", "all") == "once"
    if once and getattr(rule, "acc_bf16", False):
        raise ValueError("calibrate: 'once' reads on without checks: no bf16 running output (acc_bf16=False)")
    if not R:
        chunk = block_pages
    if R and chunk % block_pages:
        raise ValueError(f"chunk_pages {chunk} must be a multiple of block_pages {block_pages}")
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 3 if is_cuda else 1
    out = torch.empty(B, Hq, D, dtype=out_dtype, device=dev)
    pages = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    tau = torch.empty(B, Hq, dtype=torch.float32, device=dev) if R == 2 else None
    split = S > 1
    if split:
        pm = torch.empty(B * Hkv * S * GP, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B * Hkv * S * GP * DP, dtype=torch.float32, device=dev)
        ppages = torch.empty(B * Hkv * S, dtype=torch.int32, device=dev)
        prem = torch.empty(B * Hkv * S, dtype=torch.float32, device=dev) if R == 2 else pm
    else:
        pm = pl = pacc = prem = out
        ppages = pages
    dummy = page_table
    st = k_cache.stride()
    assert v_cache.stride() == st and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    thr = math.log(rule.delta / (1 - rule.delta)) if R in (2, 3) else 0.0
    dot_f32 = not (q.dtype == k_cache.dtype and k_cache.dtype in (torch.float16, torch.bfloat16))
    with_mass = page_mass is not None
    if with_mass:
        mass, lse = page_mass
        P_pad = page_table.shape[1]
        if mass.shape != (B, Hq, P_pad) or lse.shape != (B, Hq) or not mass.is_contiguous() \
                or mass.dtype != torch.float32 or lse.dtype != torch.float32:
            raise ValueError(f"page_mass: expected contiguous fp32 ([B, Hq, P] = {[B, Hq, P_pad]}, [B, Hq]), got "
                             f"({list(mass.shape)} {mass.dtype}, {list(lse.shape)} {lse.dtype})")
    else:
        mass = lse = out
        P_pad = 0
    _decode_kernel[(B * Hkv, S)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, st[0], st[1], st[2],
        page_table, page_table.stride(0), seq_lens,
        dummy if natural else order, dummy if phys is None else phys, dummy if natural else count,
        tail_lse if R in (2, 3) else dummy,
        bound_terms if R == 3 else dummy,
        out, out.stride(0), out.stride(1), pages, tau if R == 2 else out,
        pm, pl, pacc, ppages, prem, mass, lse, P_pad,
        N, float(sm_scale) * 1.4426950408889634, S,
        float(rule.scale_tol) if R == 1 else 0.0, float(rule.direction_tol) if R == 1 else 0.0,
        int(rule.patience) if R == 1 else 0, thr,
        *(_order_args(order_from, o_scores, sm_scale) if order_from is not None else (dummy, dummy, 0, 0, dummy, 0.0)),
        HKV=Hkv, G=G, GP=GP, D=D, DP=DP, PAGE=PAGE, NATURAL=bool(natural), PHYS=phys is not None, RULE=R,
        CHUNK=chunk,
        BLOCK_PAGES=block_pages, SPLIT=split, DOT_F32=dot_f32, NUM_STAGES=num_stages, TOK=max(16, block_pages * PAGE),
        PAGE_MASS=with_mass, ACC_BF16=bool(R and getattr(rule, "acc_bf16", False)),
        CALIB_RECENT=bool(R == 3 and getattr(rule, "calibrate", "all") == "recent"), ONCE=once,
        KC=_pow2(triton.cdiv(triton.cdiv(N, S), max(chunk, 1)), 16), ORDER=order_from is not None,
        O_BLOCK_S=_order_block_s(order_from, D), O_KP=_pow2(triton.cdiv(N, S), 16),
        O_DOT_F32=order_from is not None and score_dot_f32(q, order_from[0].dtype),
        num_warps=num_warps)
    if split:
        _merge_kernel[(B * Hq,)](pm, pl, pacc, ppages, prem, out, out.stride(0), out.stride(1), pages,
                                 tau if R == 2 else out, lse, S, HKV=Hkv, G=G, GP=GP, D=D, DP=DP,
                                 SPP=_pow2(S), CERTIFIED=R == 2, PAGE_MASS=with_mass,
                                 num_warps=1 if DP <= 64 else 2)
    return out, pages, tau


def order_in_decode(q, k_cache, num_splits: int) -> bool:
    """Whether dense + ART should order its pages inside the decode launch on this GPU (tuning.py's record
    for this launch kind; no record, or not CUDA: no)."""
    return q.device.type == "cuda" and tuning.order_in_decode(q.device, _pow2(q.shape[-1], 16),
                                                              k_cache.element_size(), k_cache.shape[2],
                                                              num_splits > 1)


def _order_args(order_from, scores, sm_scale):
    kmin, kmax = order_from
    if kmin.shape != kmax.shape or kmin.stride() != kmax.stride() or kmin.stride(-1) != 1:
        raise ValueError(f"order_from: key_min and key_max must share a shape and strides, unit-stride in D, got "
                         f"{list(kmin.shape)} {kmin.stride()} and {list(kmax.shape)} {kmax.stride()}")
    return kmin, kmax, kmin.stride(0), kmin.stride(1), scores, float(sm_scale)


def _order_block_s(order_from, D):
    return 16 if order_from is None else box_block_s(D, order_from[0].element_size())


def paged_decode(q, k_cache, v_cache, page_table, seq_lens, order, count, *, sm_scale: float,
                 rule=None, tail_lse=None, bound_terms=None, num_splits: int = 1,
                 page_mass: bool = False, phys=None) -> DecodeOut:
    """Same contract as reference.paged_decode. `rule`: any object with the StopRule fields
    (kind, chunk_pages, scale_tol, direction_tol, patience, delta, acc_bf16); None reads every listed page."""
    B, Hq = q.shape[:2]
    mass = None
    if page_mass:
        mass = (torch.full((B, Hq, page_table.shape[1]), float("-inf"), dtype=torch.float32, device=q.device),
                torch.empty(B, Hq, dtype=torch.float32, device=q.device))
    out, pages, tau = launch_decode(q, k_cache, v_cache, page_table.contiguous(), seq_lens.to(torch.int32),
                                    order.to(torch.int32).contiguous(), count.to(torch.int32).contiguous(),
                                    sm_scale=sm_scale, rule=rule,
                                    tail_lse=None if tail_lse is None else tail_lse.float().contiguous(),
                                    bound_terms=None if bound_terms is None else bound_terms.float().contiguous(),
                                    num_splits=num_splits, page_mass=mass,
                                    phys=None if phys is None else phys.to(torch.int32).contiguous())
    if mass is None:
        return DecodeOut(out, pages, tau)
    return DecodeOut(out, pages, tau, mass[0], mass[1])
