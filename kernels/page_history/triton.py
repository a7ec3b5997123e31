"""AttentionPredictor's history in Triton (same contracts as reference.py): the step's turns (clock) and the push, one
launch each. push: one program per (request, head) writes the head's slot; the row's last head to arrive (a counter,
as Quest's split scoring) ticks the clock, after every head has read the slot."""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2
from ..page_select.triton import _arrivals


@triton.jit
def _push_kernel(hist_ptr, stride_hr, stride_hh, stride_hs, ptr_ptr, steps_ptr, rows_ptr, lp_ptr, stride_mb,
                 stride_mh, lse_ptr, stride_lb, arrivals_ptr, P, CAP, H, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    hh = tl.program_id(1)
    row = tl.load(rows_ptr + b)
    slot = tl.load(ptr_ptr + row)
    dst = hist_ptr + row * stride_hr + hh * stride_hh + slot * stride_hs
    src = lp_ptr + b.to(tl.int64) * stride_mb + (hh * GROUP) * stride_mh
    lse_row = lse_ptr + b.to(tl.int64) * stride_lb + hh * GROUP
    for p0 in range(0, CAP, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for g in tl.static_range(0, GROUP):
            lp = tl.load(src + g * stride_mh + p, mask=p < P, other=float("-inf")).to(tl.float32)
            m = tl.exp(lp - tl.load(lse_row + g).to(tl.float32))
            acc += tl.where(m == m, m, 0.0)  # a page not read (-inf), or a head that read nothing (nan): 0
        tl.store(dst + p, acc / GROUP, mask=p < CAP)
    tl.debug_barrier()
    # the row's last head to arrive (every head has read the slot) ticks the clock and resets the counter
    if tl.atomic_add(arrivals_ptr + b, 1, sem="acq_rel", scope="gpu") == tl.num_programs(1) - 1:
        tl.store(arrivals_ptr + b, 0)
        tl.store(ptr_ptr + row, (slot + 1) % H)
        tl.store(steps_ptr + row, tl.load(steps_ptr + row) + 1)


@triton.jit
def _clock_kernel(steps_ptr, seeded_ptr, scores_ptr, stride_sr, rows_ptr, calibrate_ptr, due_ptr, B, calibrate_every,
                  run_every, CALIBRATE_FIRST: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.arange(0, BLOCK)
    live = b < B
    row = tl.load(rows_ptr + b, mask=live, other=0)
    s = tl.load(steps_ptr + row, mask=live, other=0)
    calibrate = s % calibrate_every == 0
    if CALIBRATE_FIRST:
        calibrate = calibrate | ((s == 1) & (tl.load(seeded_ptr + row, mask=live, other=0) != 0))
    never = tl.load(scores_ptr + row * stride_sr, mask=live, other=0.0) == float("-inf")
    tl.store(calibrate_ptr + b, calibrate.to(tl.int8), mask=live)
    tl.store(due_ptr + b, ((s % run_every == 0) | never).to(tl.int8), mask=live)


def clock(steps, seeded, scores, rows, calibrate_every: int, calibrate_first: bool, run_every: int):
    """Same contract as reference.clock, one launch."""
    B = rows.shape[0]
    calibrate = torch.empty(B, dtype=torch.bool, device=rows.device)
    due = torch.empty_like(calibrate)
    if B:
        _clock_kernel[(1,)](steps, seeded.view(torch.uint8), scores, scores.stride(0), rows.contiguous(),
                            calibrate.view(torch.int8), due.view(torch.int8), B, int(calibrate_every), int(run_every),
                            CALIBRATE_FIRST=bool(calibrate_first), BLOCK=_pow2(B, 16), num_warps=1)
    return calibrate, due


def push(hist, ptr, steps, rows, page_lse, lse, group: int = 1) -> None:
    """Same contract as reference.push (in place)."""
    R, Hh, H, cap = hist.shape
    B, Hq, P = page_lse.shape
    if Hq != Hh * group or P > cap or rows.shape != (B,) or lse.shape != (B, Hq) or not hist.is_contiguous() \
            or hist.dtype != torch.float32:
        raise ValueError(f"push: hist {list(hist.shape)} {hist.dtype} (contiguous fp32 [R, Hh, H, Pcap]), page_lse "
                         f"{list(page_lse.shape)} ([B, Hh * group = {Hh} * {group}, P <= Pcap]), lse "
                         f"{list(lse.shape)} ([B, Hh * group]), rows {list(rows.shape)}")
    if B == 0:
        return
    page_lse = page_lse if page_lse.stride(-1) == 1 else page_lse.contiguous()
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    _push_kernel[(B, Hh)](hist, hist.stride(0), hist.stride(1), hist.stride(2), ptr, steps, rows.contiguous(),
                          page_lse, page_lse.stride(0), page_lse.stride(1), lse, lse.stride(0),
                          _arrivals(B, page_lse.device), P, cap, H, GROUP=group,
                          BLOCK=min(_pow2(cap, 16), 1024), num_warps=4)
