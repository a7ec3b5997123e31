"""The decoder layer's small ops in Triton; same signatures and results as ``reference.py``.

Each kernel rounds to the model dtype where transformers' modules do (after each multiply of the
rotary, after the norm, after SiLU), so a bf16 step matches the modules up to the last bit of a
transcendental function.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)


def _pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


@triton.jit
def _add_rms_norm_kernel(res_ptr, delta_ptr, w_ptr, out_ptr, stride_r, stride_d, stride_o, N, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    r = tl.load(res_ptr + row * stride_r + cols, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * stride_d + cols, mask=m, other=0.0)
        r = (r.to(tl.float32) + d.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, r, mask=m)
    x = r.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    y = (x * rstd).to(res_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    B, N = residual.shape
    out = torch.empty(B, N, dtype=torch.promote_types(weight.dtype, residual.dtype), device=residual.device)
    block = _pow2(N)
    _add_rms_norm_kernel[(B,)](residual, residual if delta is None else delta, weight, out,
                               residual.stride(0), 0 if delta is None else delta.stride(0), out.stride(0),
                               N, eps, HAS_DELTA=delta is not None, BLOCK=block,
                               num_warps=max(1, min(16, block // 256)))
    return out


@triton.jit
def _rotate_half(x1, x2, c1, c2, s1, s2, DT: tl.constexpr):
    # transformers: x * cos + rotate_half(x) * sin, each product and the sum rounded to the model dtype
    a1 = (x1 * c1).to(DT).to(tl.float32)
    b1 = (-x2 * s1).to(DT).to(tl.float32)
    a2 = (x2 * c2).to(DT).to(tl.float32)
    b2 = (x1 * s2).to(DT).to(tl.float32)
    return (a1 + b1).to(DT), (a2 + b2).to(DT)


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr,
                       kmin_ptr, kmax_ptr, vn_ptr, page_ptr, off_ptr,
                       stride_qb, stride_kb, stride_vb, stride_cb, stride_qob, stride_qoh,
                       stride_cp, stride_ch, stride_cs, stride_sp, stride_sh, stride_np,
                       HQ: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr,
                       HAS_MINMAX: tl.constexpr, HAS_VNORM: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, HP)
    m = i < HALF
    DT: tl.constexpr = q_ptr.dtype.element_ty
    c1 = tl.load(cos_ptr + b * stride_cb + i, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * stride_cb + HALF + i, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * stride_cb + i, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * stride_cb + HALF + i, mask=m, other=0.0).to(tl.float32)
    if h < HQ:  # a query head: rotate into q_out
        src = q_ptr + b * stride_qb + h * D
        x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        o1, o2 = _rotate_half(x1, x2, c1, c2, s1, s2, DT)
        dst = qo_ptr + b * stride_qob + h * stride_qoh
        tl.store(dst + i, o1, mask=m)
        tl.store(dst + HALF + i, o2, mask=m)
    else:  # a KV head: rotate k, write k and v into the page slot, update the page's summaries
        j = h - HQ
        CT: tl.constexpr = kc_ptr.dtype.element_ty
        page = tl.load(page_ptr + b).to(tl.int64)
        off = tl.load(off_ptr + b).to(tl.int64)
        src = k_ptr + b * stride_kb + j * D
        x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        k1, k2 = _rotate_half(x1, x2, c1, c2, s1, s2, DT)
        k1 = k1.to(CT)
        k2 = k2.to(CT)
        slot = page * stride_cp + j * stride_ch + off * stride_cs
        tl.store(kc_ptr + slot + i, k1, mask=m)
        tl.store(kc_ptr + slot + HALF + i, k2, mask=m)
        vsrc = v_ptr + b * stride_vb + j * D
        v1 = tl.load(vsrc + i, mask=m, other=0.0).to(CT)
        v2 = tl.load(vsrc + HALF + i, mask=m, other=0.0).to(CT)
        tl.store(vc_ptr + slot + i, v1, mask=m)
        tl.store(vc_ptr + slot + HALF + i, v2, mask=m)
        if HAS_MINMAX:  # one token per request, its page owned by this program: no atomics needed
            # compared in fp32 (exact for these values): the interpreter compares bf16 as raw uint16
            srow = kmin_ptr + page * stride_sp + j * stride_sh
            tl.store(srow + i, tl.minimum(tl.load(srow + i, mask=m).to(tl.float32), k1.to(tl.float32)).to(CT), mask=m)
            tl.store(srow + HALF + i, tl.minimum(tl.load(srow + HALF + i, mask=m).to(tl.float32),
                                                 k2.to(tl.float32)).to(CT), mask=m)
            srow = kmax_ptr + page * stride_sp + j * stride_sh
            tl.store(srow + i, tl.maximum(tl.load(srow + i, mask=m).to(tl.float32), k1.to(tl.float32)).to(CT), mask=m)
            tl.store(srow + HALF + i, tl.maximum(tl.load(srow + HALF + i, mask=m).to(tl.float32),
                                                 k2.to(tl.float32)).to(CT), mask=m)
        if HAS_VNORM:
            f1 = v1.to(tl.float32)
            f2 = v2.to(tl.float32)
            norm = tl.sqrt(tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0))
            nptr = vn_ptr + page * stride_np + j
            tl.store(nptr, tl.maximum(tl.load(nptr), norm))


def rope_write(q, k, v, cos, sin, k_pages, v_pages, page_ids, offsets, key_min=None, key_max=None,
               value_norm=None):
    B, D = cos.shape
    Hkv = k_pages.shape[1]
    Hq = q.shape[1] // D
    q_out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    minmax = key_min is not None
    vnorm = value_norm is not None
    summ = key_min if minmax else k_pages
    _rope_write_kernel[(B, Hq + Hkv)](
        q, k, v, cos, sin, q_out, k_pages, v_pages,
        summ, key_max if minmax else k_pages, value_norm if vnorm else k_pages, page_ids, offsets,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), q_out.stride(0), q_out.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), summ.stride(0), summ.stride(1),
        value_norm.stride(0) if vnorm else 0,
        HQ=Hq, D=D, HALF=D // 2, HP=_pow2(D // 2), HAS_MINMAX=minmax, HAS_VNORM=vnorm, num_warps=1)
    return q_out


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, stride_qb, stride_kb, stride_cb,
                 stride_qob, stride_qoh, stride_kob, stride_koh,
                 HQ: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, HP)
    m = i < HALF
    c1 = tl.load(cos_ptr + b * stride_cb + i, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * stride_cb + HALF + i, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * stride_cb + i, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * stride_cb + HALF + i, mask=m, other=0.0).to(tl.float32)
    DT: tl.constexpr = q_ptr.dtype.element_ty  # q and k share the projections' dtype (rope checks)
    if h < HQ:  # a query head
        src = q_ptr + b * stride_qb + h * D
        dst = qo_ptr + b * stride_qob + h * stride_qoh
    else:  # a KV head
        src = k_ptr + b * stride_kb + (h - HQ) * D
        dst = ko_ptr + b * stride_kob + (h - HQ) * stride_koh
    x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
    o1, o2 = _rotate_half(x1, x2, c1, c2, s1, s2, DT)
    tl.store(dst + i, o1, mask=m)
    tl.store(dst + HALF + i, o2, mask=m)


def rope(q, k, cos, sin):
    if q.dtype != k.dtype or q.stride(1) != 1 or k.stride(1) != 1:
        raise ValueError(f"rope: q and k must share a dtype and have contiguous rows, got {q.dtype}/{k.dtype}, "
                         f"strides {q.stride()}/{k.stride()}; pass the projections' outputs")
    B, D = cos.shape
    Hq, Hkv = q.shape[1] // D, k.shape[1] // D
    q_out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(B, Hkv, D, dtype=k.dtype, device=k.device)
    _rope_kernel[(B, Hq + Hkv)](q, k, cos, sin, q_out, k_out, q.stride(0), k.stride(0), cos.stride(0),
                                q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                                HQ=Hq, D=D, HALF=D // 2, HP=_pow2(D // 2), num_warps=1)
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, stride_g, stride_u, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    DT: tl.constexpr = g_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    B, N = gate.shape
    out = torch.empty(B, N, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    block = 1024
    _silu_mul_kernel[(B, triton.cdiv(N, block))](gate, up, out, gate.stride(0), up.stride(0), out.stride(0), N,
                                                  BLOCK=block, num_warps=4)
    return out
