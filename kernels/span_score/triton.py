"""Span scores per query head in Triton (same signature and output as `reference.py`).

One program per (request, KV head), looping over blocks of spans: the group's G queries [G, D] against the block's
BLOCK_S spans in R dots, one per representative key, and an elementwise max over them. int8 keys: q is quantized the
same way (a scale a query head) and the dots run int8 x int8 on the tensor cores, each column then times both scales.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _dot, _load_q_group, _pow2, dot_f32

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _quantize_rows(x):
    """reference.quantize_reps in Triton: x [M, K] fp32 -> (the int8 values, still fp32, [M, K]; scales [M]). With
    the GPU's fast division (div_rn cost the span score 10 us of 41 on the H200), a value at a rounding midpoint may
    land one step off the reference."""
    scale = tl.max(tl.abs(x), axis=1) / 127.0
    scale = tl.where(scale > 0, scale, 1.0)
    return tl.minimum(tl.maximum(tl.floor(x / scale[:, None] + 0.5), -127.0), 127.0), scale


@triton.jit
def _span_score_kernel(q_ptr, stride_qb, stride_qh, rep_ptr, stride_rb, stride_rh, stride_rs, stride_rr,
                       sc_ptr, stride_cb, stride_ch, stride_cs,
                       row_ptr, ns_ptr, out_ptr, stride_ob, stride_oh, NS, sm_scale,
                       HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       DP: tl.constexpr, R: tl.constexpr, BLOCK_S: tl.constexpr,
                       DOT_F32: tl.constexpr, ROWS: tl.constexpr, NUM_STAGES: tl.constexpr, SCALED: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    if ROWS:
        row = tl.load(row_ptr + b).to(tl.int64)
    else:
        row = b.to(tl.int64)
    n_spans = tl.load(ns_ptr + row)
    q = _load_q_group(q_ptr, stride_qb, stride_qh, b, h, G, GP, D, DP)  # [GP, DP]
    if SCALED:  # int8 keys: q as int8 too, a scale a query head, for the int8 dot
        q, qs = _quantize_rows(q.to(tl.float32))  # [GP, DP], [GP]
        q = q.to(tl.int8)
    d = tl.arange(0, DP)
    g = tl.arange(0, GP)
    base = row * stride_rb + h * stride_rh
    # this program's blocks of spans: program_id(1), + num_programs(1), ... (a pipelined loop when there are several)
    for blk in tl.range(tl.program_id(1), tl.cdiv(NS, BLOCK_S), tl.num_programs(1), num_stages=NUM_STAGES):
        s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = s < n_spans
        best = tl.full((GP, BLOCK_S), NEG_INF, tl.float32)
        for j in tl.static_range(R):  # a dot per representative key: the max over a span's keys is elementwise
            offs = base + s.to(tl.int64)[:, None] * stride_rs + j * stride_rr + d[None, :]
            k = tl.load(rep_ptr + offs, mask=smask[:, None] & (d < D)[None, :], other=0.0)  # [BLOCK_S, DP]
            if SCALED:  # the int8 dot, then each column times its key's scale
                sc = tl.load(sc_ptr + row * stride_cb + h * stride_ch + s.to(tl.int64) * stride_cs + j, mask=smask,
                             other=0.0)
                x = tl.dot(q, tl.trans(k)).to(tl.float32) * sc[None, :]  # [GP, BLOCK_S]
            else:
                x = _dot(q, tl.trans(k), DOT_F32)  # [GP, BLOCK_S]
            best = tl.maximum(best, x)
        if SCALED:
            best = best * qs[:, None]
        best = tl.where(smask[None, :], best * sm_scale, NEG_INF)
        optr = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g)[:, None] * stride_oh + s[None, :]
        tl.store(optr, best, mask=(g < G)[:, None] & (s < NS)[None, :])


def span_scores(q, reps, num_spans, sm_scale: float, rows=None, scales=None, *, block_s=None, num_warps=None,
                programs=None, num_stages=None) -> torch.Tensor:
    """q [B, Hq, D]; reps [B, Hkv, NS, R, D] and num_spans [B], or tables [N, Hkv, NS, R, D] and [N] read at
    rows [B] long (no gather: the kernel loads row rows[b]; a slice along NS keeps its strides)
    -> [B, Hq, NS] fp32 (scaled, -inf past num_spans). scales: None, or int8 reps' scales [B or N, Hkv, NS, R]
    (reference.quantize_reps; the reps are then int8, and so is q for the dot). Tuning (gpu/ltri.py
    sweeps it): block_s (spans a block), programs (a (request, KV head) row's programs, each looping over every
    programs-th block; by default about 2,048 programs in all), num_warps, num_stages (the loop's pipelining)."""
    B, Hq, D = q.shape
    lead = B if rows is None else reps.shape[0]
    if reps.dim() != 5 or reps.shape[0] != lead or reps.shape[-1] != D or Hq % reps.shape[1]:
        raise ValueError(f"span_scores: reps expected [{'B=' + str(B) if rows is None else 'N'}, Hkv | {Hq}, NS, "
                         f"R, D={D}], got {list(reps.shape)}")
    if rows is not None and tuple(rows.shape) != (B,):
        raise ValueError(f"span_scores: rows expected [B={B}], got {list(rows.shape)}")
    Hkv, NS, R = reps.shape[1], reps.shape[2], reps.shape[3]
    G = Hq // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    if reps.stride(-1) != 1:
        reps = reps.contiguous()
    if num_spans.shape != (lead,):
        raise ValueError(f"span_scores: num_spans expected [{lead}], got {list(num_spans.shape)}")
    num_spans = num_spans.to(q.device).contiguous()  # int32 or long: the kernel loads either
    if (scales is not None) != (reps.dtype == torch.int8) or (scales is not None and (
            scales.shape != reps.shape[:4] or scales.dtype != torch.float32 or scales.stride(-1) != 1)):
        raise ValueError(f"span_scores: int8 reps need fp32 scales [{', '.join(map(str, reps.shape[:4]))}] (contiguous "
                         f"last dim), other reps none; got reps {reps.dtype} and scales "
                         f"{None if scales is None else (scales.dtype, list(scales.shape))}")
    out = torch.empty(B, Hq, NS, dtype=torch.float32, device=q.device)
    if NS == 0:
        return out
    if block_s is not None and (block_s < 16 or block_s & (block_s - 1)):
        raise ValueError(f"span_scores: block_s must be a power of two >= 16 (tl.dot's columns), got {block_s}")
    BLOCK_S = block_s or max(16, min(_pow2(NS), 64))
    blocks = triton.cdiv(NS, BLOCK_S)
    # about 2,048 programs in all, each looping over its blocks with the next one's load in flight (an H200 sweep
    # at B = 16, 32k, Llama-8B heads: 42 us against 53 us for a program per block; gpu/ltri.py)
    per_row = min(programs or triton.cdiv(2048, B * Hkv), blocks)
    grid = (B * Hkv, per_row)
    st = reps.stride()
    row_arg = num_spans if rows is None else rows.to(device=q.device, dtype=torch.int64).contiguous()
    sc = reps if scales is None else scales  # (unread without SCALED)
    sst = (0, 0, 0) if scales is None else scales.stride()[:3]
    _span_score_kernel[grid](q, q.stride(0), q.stride(1), reps, st[0], st[1], st[2], st[3], sc, *sst, row_arg,
                             num_spans, out, out.stride(0), out.stride(1), NS, float(sm_scale),
                             HKV=Hkv, G=G, GP=_pow2(G, 16), D=D, DP=_pow2(D, 16 if scales is None else 32),
                             R=R, BLOCK_S=BLOCK_S, DOT_F32=dot_f32(q, reps.dtype),  # (int8 dots: K >= 32)
                             ROWS=rows is not None, NUM_STAGES=num_stages or (2 if per_row < blocks else 1),
                             SCALED=scales is not None,
                             **({"num_warps": num_warps} if num_warps else {}))
    return out
