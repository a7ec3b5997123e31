"""Key min/max page summaries after a batch of K writes, in one Triton launch (same contract as reference.py).

One program per (token, KV head). The tokens of one page are consecutive in a vLLM batch (a page belongs to
one request, whose tokens are contiguous and in slot order), so the program of a page's first token in the
batch (a run head: its page differs from the previous token's) reduces the run, at most page_size tokens,
and writes the page once: no atomics, no race. A run that starts at offset 0 opens its page and overwrites
it; any other run combines with the stored summary. Other programs exit. Padding tokens (slot -1) go to
the trash page, whose contents nobody reads.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from ..page_score.triton import _pow2


@triton.jit
def _page_of(slot, trash, PAGE: tl.constexpr):
    return tl.where(slot >= 0, slot // PAGE, trash)


@triton.jit
def _minmax_write_kernel(slot_ptr, k_ptr, stride_kt, stride_kh, kmin_ptr, kmax_ptr, stride_sp, stride_sh, T, trash,
                         PAGE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    page = _page_of(slot, trash, PAGE)
    prev = tl.load(slot_ptr + tl.maximum(t - 1, 0)).to(tl.int64)
    if (t == 0) | (_page_of(prev, trash, PAGE) != page):  # the head of its page's run
        d = tl.arange(0, DP)
        dm = d < D
        row = k_ptr + h * stride_kh + d
        lo = tl.load(row + t.to(tl.int64) * stride_kt, mask=dm, other=0.0).to(tl.float32)  # [DP]
        hi = lo
        for i in range(1, PAGE):  # the run's other tokens: at most PAGE - 1
            u = t + i
            su = tl.load(slot_ptr + u, mask=u < T, other=-2).to(tl.int64)
            same = (u < T) & (_page_of(su, trash, PAGE) == page)
            samev = (d * 0 + same.to(tl.int32)) != 0  # [DP]: a scalar & a vector mask trips the interpreter
            x = tl.load(row + u.to(tl.int64) * stride_kt, mask=dm & samev, other=0.0).to(tl.float32)
            lo = tl.where(samev, tl.minimum(lo, x), lo)
            hi = tl.where(samev, tl.maximum(hi, x), hi)
        srow = page * stride_sp + h * stride_sh + d
        if (slot < 0) | (slot % PAGE != 0):  # the page was opened before this batch: combine
            lo = tl.minimum(lo, tl.load(kmin_ptr + srow, mask=dm).to(tl.float32))
            hi = tl.maximum(hi, tl.load(kmax_ptr + srow, mask=dm).to(tl.float32))
        tl.store(kmin_ptr + srow, lo.to(kmin_ptr.dtype.element_ty), mask=dm)
        tl.store(kmax_ptr + srow, hi.to(kmax_ptr.dtype.element_ty), mask=dm)


def minmax_write(slot_mapping: torch.Tensor, key: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor,
                 page_size: int, trash_page: int) -> None:
    T, Hkv, D = key.shape
    if T == 0:
        return
    if key.stride(-1) != 1 or key_min.stride() != key_max.stride() or key_min.stride(-1) != 1:
        raise ValueError(f"minmax_write: key and the summaries need unit stride in D and key_min / key_max the "
                         f"same strides, got {key.stride()}, {key_min.stride()}, {key_max.stride()}")
    _minmax_write_kernel[(T, Hkv)](slot_mapping, key, key.stride(0), key.stride(1), key_min, key_max,
                                   key_min.stride(0), key_min.stride(1), T, int(trash_page), PAGE=page_size, D=D,
                                   DP=_pow2(D, 16), num_warps=1)
