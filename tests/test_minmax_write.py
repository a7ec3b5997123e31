"""kernels/minmax_write: the key min/max summaries after vLLM-style K writes, kernel against reference."""
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

from composable_kv.kernels.minmax_write import reference as ref  # noqa: E402
from composable_kv.kernels.minmax_write import triton as tk  # noqa: E402


def batch(runs, num_pages, page, Hkv, D, dtype, device, seed=0, pad=0):
    """runs: (first slot, tokens) per request, its tokens consecutive (chunked prefill or one decode token);
    `pad` padding tokens (slot -1) at the end, as a CUDA-graph batch has. -> slot_mapping [T], key [T, Hkv, D]."""
    slots = [s + i for s, n in runs for i in range(n)] + [-1] * pad
    g = torch.Generator().manual_seed(seed)
    key = (torch.randn(len(slots), Hkv, D, generator=g) * 3).to(dtype).to(device)
    return torch.tensor(slots, dtype=torch.int32, device=device), key


def summaries(num_pages, Hkv, D, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    lo = (torch.randn(num_pages, Hkv, D, generator=g) - 2).to(dtype).to(device)
    return lo, lo + 4  # [pages, Hkv, D] an older state: opened pages must forget it, the others keep it


def check(runs, *, page=16, Hkv=2, D=64, dtype=torch.float32, device="cpu", pad=0, num_pages=40):
    slot, key = batch(runs, num_pages, page, Hkv, D, dtype, device, pad=pad)
    want_lo, want_hi = summaries(num_pages + 1, Hkv, D, dtype, device)
    got_lo, got_hi = want_lo.clone(), want_hi.clone()
    want_lo, want_hi = want_lo.cpu(), want_hi.cpu()
    ref.minmax_write(slot.cpu(), key.cpu(), want_lo, want_hi, page, num_pages)
    tk.minmax_write(slot, key, got_lo, got_hi, page, num_pages)
    # the trash row (padding) holds garbage by design; every real page must match exactly
    assert torch.equal(got_lo[:num_pages].cpu(), want_lo[:num_pages])
    assert torch.equal(got_hi[:num_pages].cpu(), want_hi[:num_pages])
    touched = {x // page for first, n in runs for x in range(first, first + n)}
    assert any(not torch.equal(got_lo[p].cpu(), summaries(num_pages + 1, Hkv, D, dtype, "cpu")[0][p]) for p in touched)


RUNS = {
    "decode": [(3 * 16 + 5, 1), (7 * 16 + 0, 1), (9 * 16 + 15, 1), (2 * 16 + 1, 1)],
    "prefill_from_0": [(4 * 16, 40)],  # opens pages 4, 5, 6 (the last one partly)
    "prefill_mid_page": [(10 * 16 + 9, 30)],  # ends page 10, opens 11, 12
    "mixed": [(20 * 16 + 3, 1), (21 * 16 + 12, 1), (30 * 16, 17), (25 * 16 + 14, 20)],
}


@pytest.mark.interpret
@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [0, 3])
def test_kernel_equals_reference(name, dtype, pad):
    check(RUNS[name], dtype=dtype, pad=pad, device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("D,Hkv", [(64, 2), (128, 8)])
def test_kernel_equals_reference_gpu(page, D, Hkv):
    runs = [(p * page + (p * 7) % page, 1) for p in range(0, 300, 3)]  # 100 decode tokens
    runs += [(400 * page, 5 * page + 3), (450 * page + 5, 3 * page)]  # two prefill chunks
    check(runs, page=page, Hkv=Hkv, D=D, dtype=torch.bfloat16, device="cuda", pad=7, num_pages=500)


def test_reference_is_what_the_summaries_define():
    """The reference against KeyMinMax.rebuild's definition: a page's min / max over the tokens written to it
    since it was opened (here every page is opened in the batch)."""
    page, Hkv, D = 16, 2, 8
    slot, key = batch([(0, 16), (16, 5), (48, 9)], 10, page, Hkv, D, torch.float32, "cpu")
    lo, hi = summaries(11, Hkv, D, torch.float32, "cpu")
    ref.minmax_write(slot, key, lo, hi, page, 10)
    for p, (a, b) in {0: (0, 16), 1: (16, 21), 3: (21, 30)}.items():
        assert torch.equal(lo[p], key[a:b].amin(0)) and torch.equal(hi[p], key[a:b].amax(0))
    assert torch.equal(lo[2], summaries(11, Hkv, D, torch.float32, "cpu")[0][2])  # untouched
