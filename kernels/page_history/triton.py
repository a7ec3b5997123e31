"""AttentionPredictor's history push in one Triton launch (same contract as reference.push): one program per
request writes every head's slot, then ticks the row's clock (no other program reads it: no race)."""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2


@triton.jit
def _push_kernel(hist_ptr, stride_hr, stride_hh, stride_hs, ptr_ptr, steps_ptr, rows_ptr, mass_ptr, stride_mb,
                 stride_mh, P, CAP, HEADS, H, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = tl.load(rows_ptr + b)
    slot = tl.load(ptr_ptr + row)
    base = hist_ptr + row * stride_hr + slot * stride_hs
    for hh in range(HEADS):
        for p0 in range(0, CAP, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            src = mass_ptr + b.to(tl.int64) * stride_mb + (hh * GROUP) * stride_mh + p
            acc = tl.load(src, mask=p < P, other=0.0).to(tl.float32)
            for g in tl.static_range(1, GROUP):
                acc += tl.load(src + g * stride_mh, mask=p < P, other=0.0).to(tl.float32)
            tl.store(base + hh * stride_hh + p, acc / GROUP, mask=p < CAP)
    tl.store(ptr_ptr + row, (slot + 1) % H)
    tl.store(steps_ptr + row, tl.load(steps_ptr + row) + 1)


def push(hist, ptr, steps, rows, mass, group: int = 1) -> None:
    """Same contract as reference.push (in place)."""
    R, Hh, H, cap = hist.shape
    B, Hq, P = mass.shape
    if Hq != Hh * group or P > cap or rows.shape != (B,) or not hist.is_contiguous() or hist.dtype != torch.float32:
        raise ValueError(f"push: hist {list(hist.shape)} {hist.dtype} (contiguous fp32 [R, Hh, H, Pcap]), mass "
                         f"{list(mass.shape)} ([B, Hh * group = {Hh} * {group}, P <= Pcap]), rows {list(rows.shape)}")
    if B == 0:
        return
    mass = mass if mass.stride(-1) == 1 else mass.contiguous()
    _push_kernel[(B,)](hist, hist.stride(0), hist.stride(1), hist.stride(2), ptr, steps, rows.contiguous(), mass,
                       mass.stride(0), mass.stride(1), P, cap, Hh, H, GROUP=group, BLOCK=min(_pow2(cap, 16), 1024),
                       num_warps=4)
