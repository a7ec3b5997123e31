"""AttentionPredictor's page-score CNN in one Triton kernel (same outputs as `reference.py`).

One program per (request, head, tile of BLOCK pages). It reads the tile's history straight from the
ring buffer (slot (ptr + t) % H for step t, pages tile-2 .. tile+BLOCK+1: the two 3x3 convs' halo) and
walks the H axis once: per step it computes the next row of conv1 (at the three page shifts conv2
needs, as [BLOCK, 16 taps] x [16, C1] dots), one row of conv2 (nine [BLOCK, C1] x [C1, C2] dots),
and adds its ReLU to a running sum over H; the 1x1 head ends it. Registers hold three conv1 rows and
the sum; nothing of size [C2, H, P] touches memory. Math and costs: README.md.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..paged_decode.triton import _round_bf16

TAPS = 16  # the 9 taps of a 3x3 kernel, padded for tl.dot
PRECISIONS = ("tf32", "bf16", "ieee")


class PackedCNN(NamedTuple):
    """The CNN's weights laid out for the kernel (pack_weights); channels zero-padded to C1P, C2P."""
    w1: torch.Tensor  # [TAPS, C1P]: row bitrev4(t) holds tap t = 3*dh + dw (the column order _conv1_row builds)
    b1: torch.Tensor  # [C1P]
    w2: torch.Tensor  # [9, C1P, C2P]: tap dh*3 + dw
    b2: torch.Tensor  # [C2P]
    wh: torch.Tensor  # [C2P]
    bh: torch.Tensor  # [1]


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def _bitrev4(t: int) -> int:
    return int(f"{t:04b}"[::-1], 2)


def pack_weights(w) -> PackedCNN:
    """reference.CNNWeights (w1 [C1,1,3,3], b1, w2 [C2,C1,3,3], b2, wh [1,C2,1], bh [1]) -> PackedCNN.
    Once per weights file (the stage caches it), not per step."""
    C1, C2 = w.w1.shape[0], w.w2.shape[0]
    C1P, C2P = _pow2(C1, 16), _pow2(C2, 16)
    dev = w.w1.device
    w1 = torch.zeros(TAPS, C1P, device=dev)
    taps = w.w1.detach().float().reshape(C1, 9).t()  # [9, C1]
    w1[[_bitrev4(t) for t in range(9)], :C1] = taps
    w2 = torch.zeros(9, C1P, C2P, device=dev)
    w2[:, :C1, :C2] = w.w2.detach().float().permute(2, 3, 1, 0).reshape(9, C1, C2)
    pad = lambda v, n: torch.nn.functional.pad(v.detach().float().reshape(-1), (0, n - v.numel()))  # noqa: E731
    return PackedCNN(w1.contiguous(), pad(w.b1, C1P), w2.contiguous(), pad(w.b2, C2P), pad(w.wh, C2P),
                     w.bh.detach().float().reshape(1).contiguous())


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation: bf16 inputs for PREC "bf16", else tl.dot's input_precision PREC.
    PREC "bf16-emulated" (the interpreter, whose bf16 tl.dot is wrong): the inputs rounded to bf16, then an
    fp32 dot, the same products as the tensor cores'."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PREC == "bf16-emulated":
        return tl.dot(_round_bf16(a), _round_bf16(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _history_step(hist_row, stride_t, ptr, t, H, pages, P, n_pages):
    """Features log1p(mass * num_pages) of step t (0 = oldest; ring slot (ptr + t) % H) at pages - 2 ..
    pages + 2: five [BLOCK] vectors, 0 off the image (t off [0, H) or a page off [0, P))."""
    base = hist_row + ((ptr + t + H) % H).to(tl.int64) * stride_t
    ok = (t >= 0) & (t < H)
    m2 = tl.load(base + pages - 2, mask=ok & (pages >= 2) & (pages - 2 < P), other=0.0)
    m1 = tl.load(base + pages - 1, mask=ok & (pages >= 1) & (pages - 1 < P), other=0.0)
    c0 = tl.load(base + pages, mask=ok & (pages < P), other=0.0)
    p1 = tl.load(base + pages + 1, mask=ok & (pages + 1 < P), other=0.0)
    p2 = tl.load(base + pages + 2, mask=ok & (pages + 2 < P), other=0.0)
    return (tl.log(1.0 + m2 * n_pages), tl.log(1.0 + m1 * n_pages), tl.log(1.0 + c0 * n_pages),
            tl.log(1.0 + p1 * n_pages), tl.log(1.0 + p2 * n_pages))


@triton.jit
def _conv1_row(xa, xb, xc, t, H, pages, P, w1, b1, s: tl.constexpr, PREC: tl.constexpr):
    """Conv1 + ReLU of step t at pages + s - 1 from the features of steps t-1, t, t+1 (xa, xb, xc):
    [BLOCK, C1P], 0 where (t, page) is off the image (conv2's zero padding). The nine taps are joined
    into [BLOCK, 16] columns; nested joins put tap t in column bitrev4(t) (pack_weights matches)."""
    z = tl.zeros_like(xa[0])
    lo = tl.join(tl.join(tl.join(xa[s], xa[s + 1]), tl.join(xa[s + 2], xb[s])),
                 tl.join(tl.join(xb[s + 1], xb[s + 2]), tl.join(xc[s], xc[s + 1])))
    hi = tl.join(tl.join(tl.join(xc[s + 2], z), tl.join(z, z)), tl.join(tl.join(z, z), tl.join(z, z)))
    x = tl.reshape(tl.join(lo, hi), (z.shape[0], 16))
    y = tl.maximum(_mm(x, w1, tl.zeros([z.shape[0], w1.shape[1]], tl.float32), PREC) + b1[None, :], 0.0)
    q = pages + (s - 1)
    ok = (t >= 0) & (t < H) & (q >= 0) & (q < P)
    return tl.where(ok[:, None], y, 0.0)


@triton.jit
def _predictor_cnn_kernel(hist_ptr, stride_hr, stride_hh, stride_ht, rows_ptr, ptr_ptr, npages_ptr, due_ptr,
                          w1_ptr, b1_ptr, w2_ptr, b2_ptr, wh_ptr, bh_ptr, out_ptr, stride_ob, stride_oh,
                          last_ptr, stride_lr, stride_lh, H, P,
                          HH: tl.constexpr, C1P: tl.constexpr, C2P: tl.constexpr, BLOCK: tl.constexpr,
                          HAS_DUE: tl.constexpr, HAS_LAST: tl.constexpr, PREC: tl.constexpr):
    n = tl.program_id(0)
    b = n // HH
    head = n % HH
    pages = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    out = out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + pages
    row = tl.load(rows_ptr + b).to(tl.int64)
    last = last_ptr + row * stride_lr + head * stride_lh + pages
    if HAS_DUE:
        run = tl.load(due_ptr + b).to(tl.int32)
    else:
        run = 1
    if run != 0:
        ptr = tl.load(ptr_ptr + row).to(tl.int32)
        n_pages = tl.load(npages_ptr + b).to(tl.float32)
        hist_row = hist_ptr + row * stride_hr + head * stride_hh
        c1 = tl.arange(0, C1P)
        c2 = tl.arange(0, C2P)
        w1 = tl.load(w1_ptr + tl.arange(0, 16)[:, None] * C1P + c1[None, :])  # [16, C1P]
        b1 = tl.load(b1_ptr + c1)
        w2p = w2_ptr + c1[:, None] * C2P + c2[None, :]
        w2 = (tl.load(w2p), tl.load(w2p + C1P * C2P), tl.load(w2p + 2 * C1P * C2P),
              tl.load(w2p + 3 * C1P * C2P), tl.load(w2p + 4 * C1P * C2P), tl.load(w2p + 5 * C1P * C2P),
              tl.load(w2p + 6 * C1P * C2P), tl.load(w2p + 7 * C1P * C2P), tl.load(w2p + 8 * C1P * C2P))
        b2 = tl.load(b2_ptr + c2)

        zero_step = (tl.zeros([BLOCK], tl.float32),) * 5
        xa = _history_step(hist_row, stride_ht, ptr, 0, H, pages, P, n_pages)
        xb = _history_step(hist_row, stride_ht, ptr, 1, H, pages, P, n_pages)
        y_prev = (tl.zeros([BLOCK, C1P], tl.float32),) * 3  # conv1 of step -1: padding
        y_cur = (_conv1_row(zero_step, xa, xb, 0, H, pages, P, w1, b1, 0, PREC),
                 _conv1_row(zero_step, xa, xb, 0, H, pages, P, w1, b1, 1, PREC),
                 _conv1_row(zero_step, xa, xb, 0, H, pages, P, w1, b1, 2, PREC))
        total = tl.zeros([BLOCK, C2P], tl.float32)  # sum over steps of ReLU(conv2)
        for t in range(0, H):
            xc = _history_step(hist_row, stride_ht, ptr, t + 2, H, pages, P, n_pages)
            y_next = (_conv1_row(xa, xb, xc, t + 1, H, pages, P, w1, b1, 0, PREC),
                      _conv1_row(xa, xb, xc, t + 1, H, pages, P, w1, b1, 1, PREC),
                      _conv1_row(xa, xb, xc, t + 1, H, pages, P, w1, b1, 2, PREC))
            acc = tl.zeros([BLOCK, C2P], tl.float32)
            acc = _mm(y_prev[0], w2[0], acc, PREC)
            acc = _mm(y_prev[1], w2[1], acc, PREC)
            acc = _mm(y_prev[2], w2[2], acc, PREC)
            acc = _mm(y_cur[0], w2[3], acc, PREC)
            acc = _mm(y_cur[1], w2[4], acc, PREC)
            acc = _mm(y_cur[2], w2[5], acc, PREC)
            acc = _mm(y_next[0], w2[6], acc, PREC)
            acc = _mm(y_next[1], w2[7], acc, PREC)
            acc = _mm(y_next[2], w2[8], acc, PREC)
            total += tl.maximum(acc + b2[None, :], 0.0)
            y_prev = y_cur
            y_cur = y_next
            xa = xb
            xb = xc
        wh = tl.load(wh_ptr + c2)
        score = tl.sum(total * wh[None, :], axis=1) / H + tl.load(bh_ptr)
        tl.store(out, score, mask=pages < P)
        if HAS_LAST:
            tl.store(last, score, mask=pages < P)
    elif HAS_LAST:  # off its turn: the row's last scores
        tl.store(out, tl.load(last, mask=pages < P), mask=pages < P)
    else:
        tl.store(out, tl.zeros([BLOCK], tl.float32), mask=pages < P)


def predictor_scores(hist, rows, ptr, num_pages, P: int, packed: PackedCNN, due=None, last=None, *,
                     precision: str | None = None, block: int = 128) -> torch.Tensor:
    """CNN scores of every (request, head), read from the ring buffer in place; same contract as
    reference.predictor_scores (due, last: the rows off their turn and their kept scores).

    packed: pack_weights(...). precision: tl.dot's inputs on the GPU, "tf32" (tensor cores), "bf16" (tensor
    cores at twice the rate; fp32 sums) or "ieee" (exact fp32); None: as torch runs the reference's fp32
    convolutions (tf32 if torch.backends.cudnn.allow_tf32, its default). The interpreter computes in fp32 for
    tf32. block: pages a program (128: 1.6x the rate of 64 on the H200, same results)."""
    R, Hh, H, Pcap = hist.shape
    B = rows.shape[0]
    if hist.dtype != torch.float32 or hist.stride(-1) != 1 or P > Pcap:
        raise ValueError(f"predictor_scores: hist expected fp32 [R, Hh, H, Pcap >= P={P}] with contiguous pages, "
                         f"got {hist.dtype} {list(hist.shape)} strides {hist.stride()}")
    if tuple(num_pages.shape) != (B,) or (due is not None and tuple(due.shape) != (B,)):
        raise ValueError(f"predictor_scores: num_pages and due expected [B={B}], got {list(num_pages.shape)} "
                         f"and {None if due is None else list(due.shape)}")
    if last is not None and (last.dtype != torch.float32 or last.shape[:2] != (R, Hh) or last.shape[2] < P
                             or last.stride(-1) != 1):
        raise ValueError(f"predictor_scores: last expected fp32 [R={R}, Hh={Hh}, >= P={P}] with contiguous pages, "
                         f"got {last.dtype} {list(last.shape)}")
    if precision is None:
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    if precision not in PRECISIONS:
        raise ValueError(f"predictor_scores: precision expected one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and hist.device.type != "cuda":
        precision = "bf16-emulated"
    out = torch.empty(B, Hh, P, dtype=torch.float32, device=hist.device)
    if B == 0 or P == 0:
        return out
    C1P, C2P = packed.w1.shape[1], packed.w2.shape[2]
    grid = (B * Hh, triton.cdiv(P, block))
    lst = out if last is None else last
    _predictor_cnn_kernel[grid](hist, hist.stride(0), hist.stride(1), hist.stride(2), rows, ptr, num_pages,
                                rows if due is None else due, packed.w1, packed.b1, packed.w2, packed.b2,
                                packed.wh, packed.bh, out, out.stride(0), out.stride(1),
                                lst, lst.stride(0), lst.stride(1), H, P,
                                HH=Hh, C1P=C1P, C2P=C2P, BLOCK=block, HAS_DUE=due is not None,
                                HAS_LAST=last is not None, PREC=precision)
    return out
