"""The fused predictor CNN kernel (kernels/predictor_cnn/triton.py) against its torch reference:
interpreter grids on CPU (rows gathered out of order, ring pointers that wrap, P not a multiple of the
tile, channel counts padded for tl.dot, rows not due), a larger grid on the GPU."""
import os

import pytest
import torch

from composable_kv.kernels.predictor_cnn import reference as ref

TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def random_cnn(c1, c2, seed=0) -> ref.CNNWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.5: torch.randn(*s, generator=g) * scale  # noqa: E731
    return ref.CNNWeights(r(c1, 1, 3, 3), r(c1), r(c2, c1, 3, 3, scale=0.3), r(c2), r(1, c2, 1), r(1))


def random_ring(R, Hh, H, Pcap, seed=0):
    """Masses in [0, 1) with 40% unread (0) pages, and each row's next slot."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.rand(R, Hh, H, Pcap, generator=g) * (torch.rand(R, Hh, H, Pcap, generator=g) < 0.6)
    return hist, torch.randint(0, H, (R,), generator=g)


def check(B, Hh, H, P, block, c1=16, c2=32, due=None, device="cpu", precision=None, tol=1e-4, seed=0, keep=False):
    """keep: pass each row's last scores (`last`), which rows not due return and due rows overwrite."""
    from composable_kv.kernels.predictor_cnn import triton as tk
    R, Pcap = B + 2, P + 5
    hist, ptr = random_ring(R, Hh, H, Pcap, seed)
    ptr[0], ptr[-1] = 0, H - 1  # the ring's first and last slot as the oldest step
    rows = torch.randperm(R, generator=torch.Generator().manual_seed(seed))[:B]
    num_pages = torch.randint(1, P + 1, (B,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    w = random_cnn(c1, c2, seed)
    last = torch.randn(R, Hh, Pcap, generator=torch.Generator().manual_seed(seed + 1)) if keep else None
    last_want = None if last is None else last.clone()
    with torch.no_grad():
        want = ref.predictor_scores(hist, rows, ptr, num_pages, P, w, due, last_want)  # [B, Hh, P]
    d = lambda t: None if t is None else t.to(device)  # noqa: E731
    w_dev = ref.CNNWeights(*(t.to(device) for t in w))
    last_got = d(last)
    got = tk.predictor_scores(d(hist), d(rows), d(ptr), d(num_pages), P, tk.pack_weights(w_dev), d(due), last_got,
                              precision=precision, block=block).cpu()
    assert got.shape == (B, Hh, P)
    scale = want.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=tol * float(scale))
    if due is not None:
        kept = last[rows[~due], :, :P] if keep else 0
        assert (got[~due] == kept).all()  # rows off their turn: exactly their last scores (or 0)
    if keep:
        torch.testing.assert_close(last_got.cpu(), last_want, rtol=0, atol=tol * float(scale))
        assert not torch.equal(last_want, last)  # due rows were recorded
    return want


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_OK, reason="no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)")
@pytest.mark.parametrize("B,Hh,H,P,block,c1,c2", [
    (2, 2, 5, 37, 16, 16, 32),  # P = 2 tiles + 5 pages; the paper-sized CNN
    (1, 1, 3, 16, 16, 16, 32),  # H = 3: every step is at the image's border; P exactly one tile
    (3, 1, 4, 7, 16, 4, 8),     # channels padded to 16 for tl.dot; P smaller than the tile
    (1, 3, 6, 70, 64, 16, 16),  # the GPU tile, a partial second tile
])
def test_kernel_equals_reference(B, Hh, H, P, block, c1, c2):
    want = check(B, Hh, H, P, block, c1, c2, seed=B * 100 + P)
    assert want.std() > 0.01  # pages get different scores (a degenerate CNN would pass anything)


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_OK, reason="no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)")
@pytest.mark.parametrize("keep", [False, True])
def test_kernel_skips_rows_not_due(keep):
    check(3, 2, 4, 20, 16, due=torch.tensor([True, False, True]), seed=7, keep=keep)


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_OK, reason="no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)")
def test_kernel_bf16_inputs_close_to_reference():
    """bf16 dot inputs (fp32 sums): within bf16's rounding of the fp32 reference."""
    check(2, 2, 5, 37, 16, due=torch.tensor([True, False]), precision="bf16", tol=3e-2, seed=3, keep=True)


@pytest.mark.cpu
def test_reference_is_the_conv_stack_on_the_ring_window():
    """The reference equals nn.Conv2d/Conv1d layers on a window gathered by hand, slot by slot."""
    w = random_cnn(16, 32)
    hist, ptr = random_ring(4, 2, 5, 12)
    rows, n, P = torch.tensor([2, 0]), torch.tensor([9, 12]), 11
    conv1, conv2, head = torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Conv1d(32, 1, 1)
    with torch.no_grad():
        for layer, (wt, b) in zip((conv1, conv2, head), ((w.w1, w.b1), (w.w2, w.b2), (w.wh, w.bh))):
            layer.weight.copy_(wt)
            layer.bias.copy_(b)
        for i, r in enumerate(rows.tolist()):
            x = torch.stack([hist[r, :, (int(ptr[r]) + t) % 5, :P] for t in range(5)], 1)  # [Hh, H, P]
            x = torch.log1p(x * n[i])
            y = torch.relu(conv2(torch.relu(conv1(x[:, None]))))  # [Hh, 32, H, P]
            want = head(y.mean(2))[:, 0]
            got = ref.predictor_scores(hist, rows, ptr, n, P, w)[i]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hh,H,P", [(16, 8, 64, 2048), (4, 8, 16, 1000), (3, 32, 8, 513)])
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-4), ("tf32", 1e-2), ("bf16", 3e-2)])
@pytest.mark.parametrize("block", [64, 128])
def test_kernel_equals_reference_gpu(B, Hh, H, P, precision, tol, block):
    torch.backends.cudnn.allow_tf32, before = False, torch.backends.cudnn.allow_tf32  # an fp32 reference
    try:
        due = torch.arange(B) % 3 != 1
        check(B, Hh, H, P, block, due=due, device="cuda", precision=precision, tol=tol, seed=P, keep=block == 128)
    finally:
        torch.backends.cudnn.allow_tf32 = before
