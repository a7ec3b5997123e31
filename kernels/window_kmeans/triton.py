"""ltri's decode-window close in two Triton launches (same result as SpanTable.close_windows' torch path).

Launch 1, a program per (request, KV head): if the request's open window is full, the window's W * S keys
[N, D] in registers (fp32), the reference's initial centroids (evenly spaced tokens), then its Lloyd steps
(distances by one dot, argmin, new means by a one-hot dot), stored in the table's dtype at the row's next
span slot (int8 tables: quantized with a scale a key); else it returns before any key load. Launch 2, a program
per request: a closing row's pages, span count and covered page. Dots in IEEE fp32: the reps match the torch
reference up to summation order.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2
from ..span_score.triton import _quantize_rows


@triton.jit
def _window_kmeans_kernel(rows_ptr, pt_ptr, stride_pb, seq_ptr, k_ptr, stride_kp, stride_kh, stride_kt,
                          cov_ptr, ns_ptr, reps_ptr, stride_rr, stride_rh, stride_rs, sc_ptr, stride_cr, stride_ch,
                          stride_cs, P, CAP, W: tl.constexpr, S: tl.constexpr, NP: tl.constexpr, D: tl.constexpr,
                          DP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, ITERS: tl.constexpr,
                          QUANT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(rows_ptr + b).to(tl.int64)
    cov = tl.load(cov_ptr + row).to(tl.int32)
    if tl.load(seq_ptr + b) // S < cov + W:  # the window is not full: nothing closes
        return
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
    span = tl.minimum(tl.load(ns_ptr + row), CAP - 1)
    out = reps_ptr + row * stride_rr + h * stride_rh + span * stride_rs
    if QUANT:  # int8 with a scale a key, as span_score.reference.quantize_reps
        cent, scale = _quantize_rows(cent)  # [RP, DP], [RP]
        tl.store(sc_ptr + row * stride_cr + h * stride_ch + span * stride_cs + r, scale, mask=rv)
    tl.store(out + r[:, None] * D + d[None, :], cent.to(reps_ptr.dtype.element_ty), mask=rv[:, None] & dv[None, :])


@triton.jit
def _close_spans_kernel(rows_ptr, seq_ptr, cov_ptr, ns_ptr, sop_ptr, stride_sr, PCAP,
                        W: tl.constexpr, S: tl.constexpr, WP: tl.constexpr):
    b = tl.program_id(0)
    row = tl.load(rows_ptr + b).to(tl.int64)
    cov = tl.load(cov_ptr + row)
    if tl.load(seq_ptr + b) // S < cov + W:
        return
    ns = tl.load(ns_ptr + row)
    p = cov + tl.arange(0, WP)
    tl.store(sop_ptr + row * stride_sr + p, ns + tl.zeros([WP], ns.dtype), mask=(p < cov + W) & (p < PCAP))
    tl.store(ns_ptr + row, ns + 1)
    tl.store(cov_ptr + row, cov + W)


def close_windows(rows, page_table, seq_lens, k_pages, covered, num_spans, span_of_page, reps, window_pages: int,
                  page_size: int, iters: int = 2, rep_scale=None) -> None:
    """SpanTable.close_windows on the table's tensors, in place: where the open window of `rows[b]` is full
    (seq_lens[b] // page_size >= covered + window_pages), k-means reps of its keys go to
    reps[row, :, min(num_spans, cap - 1)], its pages get span id num_spans, then num_spans += 1 and
    covered += window_pages. Two launches, no host sync.

    rows [B]; page_table [B, P]; seq_lens [B]; k_pages [pages, Hkv, S, D]; covered, num_spans [N] long;
    span_of_page [N, cap] long; reps [N, Hkv, cap, R, D]; rep_scale: None, or (int8 reps) [N, Hkv, cap, R] fp32,
    the reps quantized as span_score.reference.quantize_reps."""
    B, P = page_table.shape
    Hkv, S, D = k_pages.shape[1], k_pages.shape[2], k_pages.shape[3]
    R, cap = reps.shape[3], reps.shape[2]
    if S != page_size:
        raise ValueError(f"close_windows: k_pages holds pages of {S} tokens, page_size is {page_size}")
    if reps.stride(4) != 1 or reps.stride(3) != D or span_of_page.stride(1) != 1:
        raise ValueError("close_windows: reps [N, Hkv, cap, R, D] and span_of_page need contiguous last dims")
    if (rep_scale is not None) != (reps.dtype == torch.int8) or (rep_scale is not None and (
            rep_scale.shape != reps.shape[:4] or rep_scale.stride(-1) != 1 or rep_scale.dtype != torch.float32)):
        got = None if rep_scale is None else list(rep_scale.shape)
        raise ValueError(f"close_windows: int8 reps need an fp32 rep_scale shaped {list(reps.shape[:4])}, other reps "
                         f"none; got reps {reps.dtype}, rep_scale {got}")
    W = window_pages
    sk, sr = k_pages.stride(), reps.stride()
    sc, scs = (reps, (0, 0, 0)) if rep_scale is None else (rep_scale, rep_scale.stride()[:3])
    _window_kmeans_kernel[(B, Hkv)](
        rows, page_table, page_table.stride(0), seq_lens, k_pages, sk[0], sk[1], sk[2], covered, num_spans, reps,
        sr[0], sr[1], sr[2], sc, *scs, P, cap, W=W, S=S, NP=_pow2(W * S, 16), D=D, DP=_pow2(D, 16), R=R,
        RP=_pow2(R, 16), ITERS=iters, QUANT=rep_scale is not None, num_warps=4)
    _close_spans_kernel[(B,)](rows, seq_lens, covered, num_spans, span_of_page, span_of_page.stride(0),
                              span_of_page.shape[1], W=W, S=S, WP=_pow2(W), num_warps=1)
