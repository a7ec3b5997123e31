"""Page scores per (request, KV head) in Triton: Quest's box bound and the exact page max.

Same signatures and outputs as `reference.py`. The block helpers (`_load_q_group`, `_box_block`,
`_exact_block`) are shared with the fused score+select kernel in `page_select/triton.py`.
Box bound as a matmul: max(q*kmin, q*kmax) = max(q,0)*kmax + min(q,0)*kmin, so per page
U = q+ . kmax + q- . kmin, two [G, D] x [D, pages] dots (see README.md).
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)

NEG_INF = tl.constexpr(float("-inf"))


def _pow2(n: int, lo: int = 1) -> int:
    """The next power of two >= max(n, lo), in plain int arithmetic (it runs on every launch)."""
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


@triton.jit
def _load_q_group(q_ptr, stride_qb, stride_qh, b, h,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    ptrs = q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :]
    return tl.load(ptrs, mask=(g < G)[:, None] & (d < D)[None, :], other=0.0)  # [GP, DP]


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype))


@triton.jit
def _box_block(qpos, qneg, kmin_ptr, kmax_ptr, stride_sp, stride_sh, phys, h, pmask,
               G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
               DOT_F32: tl.constexpr):
    """Box bound of a block of pages (unscaled), max over the group: [BLOCK]."""
    d = tl.arange(0, DP)
    offs = phys.to(tl.int64)[:, None] * stride_sp + h * stride_sh + d[None, :]
    m = pmask[:, None] & (d < D)[None, :]
    kmx = tl.load(kmax_ptr + offs, mask=m, other=0.0)  # [BLOCK, DP]
    kmn = tl.load(kmin_ptr + offs, mask=m, other=0.0)
    s = _dot(qpos, tl.trans(kmx), DOT_F32) + _dot(qneg, tl.trans(kmn), DOT_F32)  # [GP, BLOCK]
    s = tl.where((tl.arange(0, GP) < G)[:, None], s, NEG_INF)
    return tl.max(s, axis=0)


@triton.jit
def _exact_block(q, k_ptr, stride_kp, stride_kh, stride_kt, phys, pos, h, pmask, seq_len,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                 PAGE: tl.constexpr, BLOCK: tl.constexpr, DOT_F32: tl.constexpr):
    """Max q.k over each page's valid tokens and the group (unscaled): [BLOCK]."""
    tok = tl.arange(0, BLOCK * PAGE)
    j = tok // PAGE
    t = tok % PAGE
    ph = tl.reshape(tl.broadcast_to(phys[:, None], (BLOCK, PAGE)), (BLOCK * PAGE,))
    ps = tl.reshape(tl.broadcast_to(pos[:, None], (BLOCK, PAGE)), (BLOCK * PAGE,))
    pm = tl.reshape(tl.broadcast_to(pmask[:, None], (BLOCK, PAGE)), (BLOCK * PAGE,))
    tv = pm & (ps * PAGE + t < seq_len)
    d = tl.arange(0, DP)
    offs = ph.to(tl.int64)[:, None] * stride_kp + h * stride_kh + t[:, None] * stride_kt + d[None, :]
    k = tl.load(k_ptr + offs, mask=tv[:, None] & (d < D)[None, :], other=0.0)  # [BLOCK*PAGE, DP]
    s = _dot(q, tl.trans(k), DOT_F32)  # [GP, BLOCK*PAGE]
    s = tl.where((tl.arange(0, GP) < G)[:, None] & tv[None, :], s, NEG_INF)
    s = tl.max(s, axis=0)  # [BLOCK*PAGE]
    return tl.max(tl.reshape(s, (BLOCK, PAGE)), axis=1)


@triton.jit
def _score_kernel(q_ptr, stride_qb, stride_qh, a_ptr, b_ptr, stride_ap, stride_ah, stride_at,
                  pt_ptr, stride_ptb, seq_ptr, out_ptr, P, sm_scale, order_ptr, count_ptr, N,
                  HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  DP: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr, EXACT: tl.constexpr,
                  DOT_F32: tl.constexpr, LISTED: tl.constexpr):
    """A block of pages of one (request, KV head); LISTED: a block of list slots (N of them, count live), each
    slot's page read from order_ptr, the output at the slot (-inf from count on; a block with no live slot only
    writes that)."""
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    seq_len = tl.load(seq_ptr + b)
    n_pages = (seq_len + PAGE - 1) // PAGE
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if LISTED:
        out = out_ptr + pid.to(tl.int64) * N + j
        jm = j < tl.minimum(tl.load(count_ptr + pid), N)
        p = tl.load(order_ptr + pid.to(tl.int64) * N + j, mask=jm, other=0)
        pm = jm & (p >= 0) & (p < n_pages)
        out_mask = j < N
    else:
        out = out_ptr + pid.to(tl.int64) * P + j
        p = j
        pm = p < n_pages
        out_mask = p < P
    if tl.max(pm.to(tl.int32), axis=0) > 0:
        phys = tl.load(pt_ptr + b.to(tl.int64) * stride_ptb + p, mask=pm, other=0)
        q = _load_q_group(q_ptr, stride_qb, stride_qh, b, h, G, GP, D, DP)
        if EXACT:
            s = _exact_block(q, a_ptr, stride_ap, stride_ah, stride_at, phys, p, h, pm, seq_len,
                             G, GP, D, DP, PAGE, BLOCK, DOT_F32)
        else:
            s = _box_block(tl.maximum(q, 0.0), tl.minimum(q, 0.0), a_ptr, b_ptr, stride_ap, stride_ah, phys, h,
                           pm, G, GP, D, DP, DOT_F32)
        tl.store(out, tl.where(pm, s * sm_scale, NEG_INF), mask=out_mask)
    else:
        tl.store(out, tl.full([BLOCK], NEG_INF, tl.float32), mask=out_mask)


def dot_f32(q: torch.Tensor, kv_dtype: torch.dtype) -> bool:
    """fp32 dots (ieee) unless q and the cache share a 16-bit dtype."""
    return not (q.dtype == kv_dtype and kv_dtype in (torch.float16, torch.bfloat16))


def _launch(q, a, b_, page_table, seq_lens, sm_scale, exact, listed=None):
    B, Hq, D = q.shape
    Hkv = a.shape[1]
    G = Hq // Hkv
    P = page_table.shape[1]
    page = a.shape[2] if exact else 1
    order, count = listed if listed is not None else (page_table, seq_lens)  # (unread without LISTED)
    N = order.shape[-1] if listed is not None else P
    out = torch.empty(B, Hkv, N, dtype=torch.float32, device=q.device)
    BLOCK = 16 if exact else 64
    grid = (B * Hkv, triton.cdiv(N, BLOCK))
    st = a.stride()
    _score_kernel[grid](q, q.stride(0), q.stride(1), a, b_, st[0], st[1], st[2] if exact else 0,
                        page_table, page_table.stride(0), seq_lens, out, P, float(sm_scale), order, count, N,
                        HKV=Hkv, G=G, GP=_pow2(G, 16), D=D, DP=_pow2(D, 16), PAGE=page if exact else 1,
                        BLOCK=BLOCK, EXACT=exact, DOT_F32=dot_f32(q, a.dtype), LISTED=listed is not None)
    return out


def quest_scores(q, key_min, key_max, page_table, num_pages, sm_scale: float) -> torch.Tensor:
    """Quest's box bound, max over the group: [B, Hkv, P] fp32, -inf past a request's pages.

    `num_pages` [B] bounds the valid positions (the kernel takes lengths; a page count times 1).
    """
    page_table = page_table.contiguous()
    lens = num_pages.to(torch.int32).contiguous()  # with PAGE=1, n_pages = lens
    assert q.stride(-1) == 1 and key_min.is_contiguous() and key_max.is_contiguous()
    return _launch(q, key_min, key_max, page_table, lens, sm_scale, exact=False)


def quest_scores_listed(q, key_min, key_max, page_table, num_pages, order, count, sm_scale: float) -> torch.Tensor:
    """Same contract as reference.quest_scores_listed: the box bound of the listed pages only, [B, Hkv, N] in list
    order (-inf from count on); blocks of slots past a row's count only write -inf."""
    page_table = page_table.contiguous()
    lens = num_pages.to(torch.int32).contiguous()
    B, Hkv, N = order.shape
    if count.shape != (B, Hkv) or key_min.shape[1] != Hkv:
        raise ValueError(f"quest_scores_listed: order {list(order.shape)} and count {list(count.shape)} "
                         f"([B, Hkv, N], [B, Hkv]) for {key_min.shape[1]} KV heads")
    assert q.stride(-1) == 1 and key_min.is_contiguous() and key_max.is_contiguous()
    listed = (order.to(torch.int32).contiguous(), count.to(torch.int32).contiguous())
    return _launch(q, key_min, key_max, page_table, lens, sm_scale, exact=False, listed=listed)


def exact_page_max_scores(q, k_cache, page_table, seq_lens, sm_scale: float) -> torch.Tensor:
    """Exact page max of q.k over valid tokens and the group: [B, Hkv, P] fp32."""
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    return _launch(q, k_cache, k_cache, page_table.contiguous(), seq_lens.to(torch.int32).contiguous(),
                   sm_scale, exact=True)
