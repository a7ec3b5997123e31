"""Key shadow scoring in Triton: the per-page bound alone, and the fused shadow select kernel.

Same contracts as `reference.py` (`shadow_scores`). `shadow_select` is the pipeline's second launch
for a stack like quest -> key_shadow -> art: per (request, KV head) it scores the pages the previous
selector kept (its order list) from the shadow, keeps the forced pages plus the best others under the
shadow's budget, orders them best-first and, for the certified stop, writes the strided tail LSE of
the shadow bounds. Selection, ordering and tail reuse page_select's helpers, so ties and layouts are
those of `page_select/reference.py`. Dots are fp32-accurate (ieee, or tf32x3 on tensor cores) so the
bound stays sound up to fp32 rounding.
"""
import math

import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)

from ..page_score.triton import _load_q_group, _pow2
from ..page_select.triton import _keep_top, _ord32, _program_row, _tail_lse, _write_order, sort_block_for

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _shadow_block(q, qabs, codes_ptr, step_ptr, kmin_ptr, stride_cp, stride_ch, stride_ct, stride_sp, stride_sh,
                  phys, pos, h, pmask, seq_len,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, PAGE: tl.constexpr,
                  BLOCK: tl.constexpr, BITS: tl.constexpr, PREC: tl.constexpr):
    """max over the group and each page's valid tokens of q.k^ + |q|.step/2 (unscaled): [BLOCK].

    q.k^_t = q.kmin + q.(code_t * step): the per-page terms q.kmin + |q|.step/2 are added after the max
    over the page's tokens; only code * step is formed per token."""
    tok = tl.arange(0, BLOCK * PAGE)
    t = tok % PAGE
    ph = tl.reshape(tl.broadcast_to(phys[:, None], (BLOCK, PAGE)), (BLOCK * PAGE,)).to(tl.int64)
    ps = tl.reshape(tl.broadcast_to(pos[:, None], (BLOCK, PAGE)), (BLOCK * PAGE,))
    pm = tl.reshape(tl.broadcast_to(pmask[:, None], (BLOCK, PAGE)), (BLOCK * PAGE,))
    tv = pm & (ps * PAGE + t < seq_len)
    d = tl.arange(0, DP)
    m = tv[:, None] & (d < D)[None, :]
    crow = codes_ptr + ph[:, None] * stride_cp + h * stride_ch + t[:, None] * stride_ct
    if BITS == 8:
        c = tl.load(crow + d[None, :], mask=m, other=0).to(tl.float32)
    else:
        byte = tl.load(crow + (d // 2)[None, :], mask=m, other=0).to(tl.int32)
        c = ((byte >> ((d % 2) * 4)[None, :]) & 15).to(tl.float32)
    prow = phys.to(tl.int64)[:, None] * stride_sp + h * stride_sh + d[None, :]
    pmd = pmask[:, None] & (d < D)[None, :]
    step = tl.load(step_ptr + prow, mask=pmd, other=0.0).to(tl.float32)  # [BLOCK, DP]
    kmin = tl.load(kmin_ptr + prow, mask=pmd, other=0.0).to(tl.float32)
    step_t = tl.reshape(tl.broadcast_to(step[:, None, :], (BLOCK, PAGE, DP)), (BLOCK * PAGE, DP))
    s = tl.dot(q, tl.trans(c * step_t), input_precision=PREC)  # [GP, BLOCK*PAGE]
    s = tl.where(tv[None, :], s, NEG_INF)
    s = tl.max(tl.reshape(s, (GP, BLOCK, PAGE)), axis=2)  # [GP, BLOCK]
    base = tl.sum(q[:, None, :] * kmin[None, :, :] + qabs[:, None, :] * (step * 0.5)[None, :, :], axis=2)
    s = tl.where((tl.arange(0, GP) < G)[:, None], s + base, NEG_INF)
    return tl.max(s, axis=0)


@triton.jit
def _shadow_score_kernel(q_ptr, stride_qb, stride_qh, codes_ptr, step_ptr, kmin_ptr,
                         stride_cp, stride_ch, stride_ct, stride_sp, stride_sh,
                         pt_ptr, stride_ptb, seq_ptr, out_ptr, P, sm_scale,
                         HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         DP: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                         PREC: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seq_len = tl.load(seq_ptr + b)
    pm = p < (seq_len + PAGE - 1) // PAGE
    phys = tl.load(pt_ptr + b.to(tl.int64) * stride_ptb + p, mask=pm, other=0)
    q = _load_q_group(q_ptr, stride_qb, stride_qh, b, h, G, GP, D, DP).to(tl.float32)
    s = _shadow_block(q, tl.abs(q), codes_ptr, step_ptr, kmin_ptr, stride_cp, stride_ch, stride_ct, stride_sp,
                      stride_sh, phys, p, h, pm, seq_len, G, GP, D, DP, PAGE, BLOCK, BITS, PREC)
    tl.store(out_ptr + pid.to(tl.int64) * P + p, tl.where(pm, s * sm_scale, NEG_INF), mask=p < P)


@triton.jit
def _shadow_select_kernel(
        q_ptr, stride_qb, stride_qh, codes_ptr, step_ptr, kmin_ptr,
        stride_cp, stride_ch, stride_ct, stride_sp, stride_sh,
        pt_ptr, stride_ptb, seq_ptr, forced_ptr, stride_fb, cand_order_ptr, cand_count_ptr,
        scores_ptr, keys_ptr, order_ptr, count_ptr, tail_ptr,
        P, sm_scale, budget, num_splits,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        PAGE: tl.constexpr, BITS: tl.constexpr, FROM_LIST: tl.constexpr, CERTIFIED: tl.constexpr,
        BLOCK: tl.constexpr, BP: tl.constexpr, SORT_BLOCK: tl.constexpr, KP: tl.constexpr, SP: tl.constexpr,
        PREC: tl.constexpr):
    # FROM_LIST: score only the previous selector's list (cand_order[:cand_count]); else every page.
    pid = tl.program_id(0)
    b, h, row, seq_len, n_pages, pt_row = _program_row(pid, seq_ptr, pt_ptr, stride_ptb, P, HKV, PAGE)
    offs = tl.arange(0, BP)
    valid = offs < n_pages
    q = _load_q_group(q_ptr, stride_qb, stride_qh, b, h, G, GP, D, DP).to(tl.float32)
    qabs = tl.abs(q)
    if FROM_LIST:
        tl.store(scores_ptr + row + offs, NEG_INF, mask=offs < P)
        tl.debug_barrier()
        n_cand = tl.load(cand_count_ptr + pid)
    else:
        n_cand = n_pages
    for j0 in range(0, n_cand, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jm = j < n_cand
        if FROM_LIST:
            p = tl.load(cand_order_ptr + row + j, mask=jm, other=0)
        else:
            p = j
        phys = tl.load(pt_row + p, mask=jm, other=0)
        s = _shadow_block(q, qabs, codes_ptr, step_ptr, kmin_ptr, stride_cp, stride_ch, stride_ct, stride_sp,
                          stride_sh, phys, p, h, jm, seq_len, G, GP, D, DP, PAGE, BLOCK, BITS, PREC)
        tl.store(scores_ptr + row + p, s * sm_scale, mask=jm)
    tl.debug_barrier()
    key = tl.load(scores_ptr + row + offs, mask=valid, other=NEG_INF)
    if FROM_LIST:
        cand = valid & (key != NEG_INF)
    else:
        cand = valid
    forced = tl.load(forced_ptr + b.to(tl.int64) * stride_fb + offs, mask=valid, other=0) != 0
    forced = forced & valid
    free = tl.maximum(budget - tl.sum(forced.to(tl.int32), axis=0), 0)
    keep = forced | _keep_top(_ord32(key), cand & ~forced, free)
    count = tl.sum(keep.to(tl.int32), axis=0)
    tl.store(count_ptr + pid, count)
    _write_order(order_ptr + row, keys_ptr + pid.to(tl.int64) * SORT_BLOCK, key, keep, count, offs, P,
                 BP, SORT_BLOCK)
    if CERTIFIED:
        tl.store(tail_ptr + row + offs, NEG_INF, mask=(offs >= count) & (offs < P))
        tl.debug_barrier()
        _tail_lse(order_ptr + row, scores_ptr + row, tail_ptr + row, count, seq_len, n_pages,
                  num_splits, P, PAGE, KP, SP)


def _precision(device: torch.device) -> str:
    return "tf32x3" if device.type == "cuda" else "ieee"


def _block_pages(page_size: int) -> int:
    return max(1, 64 // page_size)


def _check(codes, step, key_min, bits, head_dim):
    cd = head_dim if bits == 8 else head_dim // 2
    if codes.dtype != torch.uint8 or codes.shape[-1] != cd:
        raise ValueError(f"codes: expected uint8 [..., {cd}] for {bits}-bit codes of head_dim {head_dim}, "
                         f"got {codes.dtype} {list(codes.shape)}")
    if codes.stride(-1) != 1 or step.stride(-1) != 1 or key_min.stride(-1) != 1 or step.stride() != key_min.stride():
        raise ValueError("codes/step/key_min: expected contiguous last dims and step laid out like key_min")


def shadow_scores(q, codes, step, key_min, page_table, seq_lens, sm_scale: float, bits: int):
    """Same contract as reference.shadow_scores: [B, Hkv, P] fp32, -inf past a request's pages."""
    B, Hq, D = q.shape
    _check(codes, step, key_min, bits, D)
    Hkv, S = codes.shape[1], codes.shape[2]
    P = page_table.shape[1]
    out = torch.empty(B, Hkv, P, dtype=torch.float32, device=q.device)
    BLOCK = _block_pages(S)
    q = q if q.stride(-1) == 1 else q.contiguous()
    _shadow_score_kernel[(B * Hkv, triton.cdiv(P, BLOCK))](
        q, q.stride(0), q.stride(1), codes, step, key_min, *codes.stride()[:3], *step.stride()[:2],
        page_table.contiguous(), page_table.shape[1], seq_lens.to(torch.int32).contiguous(), out, P,
        float(sm_scale), HKV=Hkv, G=Hq // Hkv, GP=_pow2(Hq // Hkv, 16), D=D, DP=_pow2(D, 16), PAGE=S,
        BLOCK=BLOCK, BITS=bits, PREC=_precision(q.device))
    return out


def shadow_select(q, codes, step, key_min, page_table, seq_lens, forced, cand_order, cand_count, *, bits: int,
                  num_kv_heads: int, page_size: int, sm_scale: float, budget_pages: int, certified: bool,
                  num_splits: int, max_kept: int):
    """Fused shadow scoring + selection for one layer (one launch, no host sync).

    cand_order [B, Hkv, P] int32 / cand_count [B, Hkv]: the previous selector's kept pages (any order),
    or None to score every page. forced [B, P] bool. Keeps forced + the best others under budget_pages.
    Returns (order [B, Hkv, P] int32, count [B, Hkv] int32, tail [B, Hkv, P] fp32 or None).
    """
    B, Hq, D = q.shape
    _check(codes, step, key_min, bits, D)
    Hkv = num_kv_heads
    P = page_table.shape[1]
    dev = q.device
    BP = _pow2(P, 16)
    SB = sort_block_for(max_kept, P)
    order = torch.empty(B, Hkv, P, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    scores = torch.empty(B, Hkv, P, dtype=torch.float32, device=dev)
    keys = torch.empty(B * Hkv, SB, dtype=torch.int64, device=dev) if SB < BP else order
    tail = torch.empty(B, Hkv, P, dtype=torch.float32, device=dev) if certified else None
    from_list = cand_order is not None
    KP = _pow2(math.ceil(min(P, SB) / num_splits)) if certified else 1
    SP = _pow2(num_splits) if certified else 1
    q = q if q.stride(-1) == 1 else q.contiguous()
    _shadow_select_kernel[(B * Hkv,)](
        q, q.stride(0), q.stride(1), codes, step, key_min, *codes.stride()[:3], *step.stride()[:2],
        page_table, page_table.stride(0), seq_lens, forced, forced.stride(0),
        cand_order if from_list else order, cand_count if from_list else count,
        scores, keys, order, count, tail if certified else scores,
        P, float(sm_scale), int(budget_pages), int(num_splits),
        HKV=Hkv, G=Hq // Hkv, GP=_pow2(Hq // Hkv, 16), D=D, DP=_pow2(D, 16), PAGE=page_size, BITS=bits,
        FROM_LIST=from_list, CERTIFIED=bool(certified), BLOCK=_block_pages(page_size), BP=BP, SORT_BLOCK=SB,
        KP=KP, SP=SP, PREC=_precision(dev), num_warps=4 if BP <= 2048 else 8)
    return order, count, tail
