"""The decode window's k-means reps in one Triton launch (same contract as reference.window_reps).

One program per (request, KV head): the window's W * S keys [N, D] in registers (fp32), the reference's
initial centroids (evenly spaced tokens), then its Lloyd steps: distances by one dot, argmin, new means by
a one-hot dot. Dots in IEEE fp32, so it matches the torch reference up to summation order.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2


@triton.jit
def _window_kmeans_kernel(rows_ptr, pt_ptr, stride_pb, seq_ptr, k_ptr, stride_kp, stride_kh, stride_kt,
                          cov_ptr, out_ptr, closing_ptr, P, HKV: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
                          NP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                          ITERS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    cov = tl.load(cov_ptr + tl.load(rows_ptr + b)).to(tl.int32)
    if h == 0:
        tl.store(closing_ptr + b, (tl.load(seq_ptr + b) // S >= cov + W).to(tl.int8))
    n: tl.constexpr = W * S
    pt_row = pt_ptr + b.to(tl.int64) * stride_pb
    d = tl.arange(0, DP)
    dv = d < D
    t = tl.arange(0, NP)  # the window's tokens
    tv = t < n
    phys = tl.load(pt_row + tl.minimum(cov + t // S, P - 1), mask=tv, other=0).to(tl.int64)
    keys = tl.load(k_ptr + phys[:, None] * stride_kp + h * stride_kh + (t % S)[:, None] * stride_kt + d[None, :],
                   mask=tv[:, None] & dv[None, :], other=0.0).to(tl.float32)  # [NP, DP]
    r = tl.arange(0, RP)
    rv = r < R
    init = ((r.to(tl.float32) + 0.5) * n / R).to(tl.int32)  # as the reference: evenly spaced tokens
    phys0 = tl.load(pt_row + tl.minimum(cov + init // S, P - 1), mask=rv, other=0).to(tl.int64)
    cent = tl.load(k_ptr + phys0[:, None] * stride_kp + h * stride_kh + (init % S)[:, None] * stride_kt + d[None, :],
                   mask=rv[:, None] & dv[None, :], other=0.0).to(tl.float32)  # [RP, DP]
    for _ in tl.static_range(ITERS):
        norms = tl.sum(cent * cent, axis=1)  # [RP]
        dist = norms[None, :] - 2 * tl.dot(keys, tl.trans(cent), input_precision="ieee")  # [NP, RP]
        dist = tl.where(rv[None, :], dist, float("inf"))
        slot = tl.argmin(dist, axis=1)  # [NP], ties to the lower centroid
        onehot = ((slot[:, None] == r[None, :]) & tv[:, None]).to(tl.float32)  # [NP, RP]
        count = tl.sum(onehot, axis=0)  # [RP]
        total = tl.dot(tl.trans(onehot), keys, input_precision="ieee")  # [RP, DP]
        cent = tl.where(count[:, None] > 0, total / tl.maximum(count, 1.0)[:, None], cent)
    base = (b.to(tl.int64) * HKV + h) * R
    tl.store(out_ptr + (base + r)[:, None] * D + d[None, :], cent, mask=rv[:, None] & dv[None, :])


def window_reps(rows, page_table, seq_lens, k_pages, covered, window_pages: int, page_size: int, R: int,
                iters: int = 2):
    """Same contract as reference.window_reps: (reps [B, Hkv, R, D] fp32, closing [B] bool)."""
    B, P = page_table.shape
    Hkv, S, D = k_pages.shape[1], k_pages.shape[2], k_pages.shape[3]
    if S != page_size:
        raise ValueError(f"window_reps: k_pages holds pages of {S} tokens, page_size is {page_size}")
    out = torch.empty(B, Hkv, R, D, dtype=torch.float32, device=k_pages.device)
    closing = torch.empty(B, dtype=torch.int8, device=k_pages.device)
    st = k_pages.stride()
    _window_kmeans_kernel[(B, Hkv)](
        rows, page_table, page_table.stride(0), seq_lens, k_pages, st[0], st[1], st[2], covered, out, closing, P,
        HKV=Hkv, W=window_pages, S=S, NP=_pow2(window_pages * S, 16), D=D, DP=_pow2(D, 16), R=R,
        RP=_pow2(R, 16), ITERS=iters, num_warps=4)
    return out, closing.bool()
