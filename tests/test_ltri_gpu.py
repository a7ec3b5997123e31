"""Ltri on the GPU: the span-score, span-select and window k-means kernels vs their references, and the stage."""
import pytest
import torch

import composable_kv as ckv

from helpers import build_cache
from test_ltri import check_close_windows, check_span_scores, check_span_select, ltri_policy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("group", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("R", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_span_kernel_grid(group, head_dim, R, dtype, tol):
    check_span_scores(group, head_dim, R, [0, 1, 33, 257, 1000], dtype=dtype, device="cuda", tol=tol)


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("head_dim", [16, 64, 128])  # 16: padded to the int8 dot's K of 32
@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_span_kernel_int8_reps_grid(group, head_dim, R, dtype, tol):
    check_span_scores(group, head_dim, R, [0, 1, 33, 257, 1000], dtype=dtype, device="cuda", tol=tol, int8=True)


@pytest.mark.parametrize("q_scale", [100.0, 1000.0])
def test_span_kernel_extreme_logits(q_scale):
    check_span_scores(4, 128, 4, [5, 300], q_scale=q_scale, device="cuda")


@pytest.mark.parametrize("vote", ["group", "layer"])
@pytest.mark.parametrize("G,P", [(1, 33), (4, 700), (7, 2048), (4, 2100)])  # 2,100: 4,096-wide tiles, 16 warps
@pytest.mark.parametrize("budget", [0, 64, 100000])
@pytest.mark.parametrize("window", [8, 64])
def test_span_select_kernel_grid(vote, G, P, budget, window):
    check_span_select(4, 2, G, P, budget, vote, seed=P + budget, device="cuda", window=window,
                      shared_state=budget == 64)


@pytest.mark.parametrize("B,N,Hkv,D,W,R", [(16, 20, 8, 128, 4, 4), (3, 5, 2, 64, 2, 3), (5, 7, 3, 64, 8, 8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_close_windows_kernels_grid(monkeypatch, B, N, Hkv, D, W, R, dtype, tol):
    check_close_windows(monkeypatch, B, N, Hkv, D, W, R, steps=6, seed=B * W, device="cuda", dtype=dtype, tol=tol)


@pytest.mark.parametrize("B,N,Hkv,D,W,R", [(16, 20, 8, 128, 4, 4), (3, 5, 2, 64, 2, 3)])
def test_close_windows_kernels_int8_grid(monkeypatch, B, N, Hkv, D, W, R):
    check_close_windows(monkeypatch, B, N, Hkv, D, W, R, steps=6, seed=B * W, device="cuda", tol=1e-4, int8=True)


@pytest.mark.parametrize("terminal", [None, {"stage": "art", "stop": "certified", "delta": 0.01}])
def test_stage_on_cuda_matches_cpu_reference(terminal):
    pol = ltri_policy(128, terminal, max_span_pages=3)
    lens = [63, 111, 300, 1000]
    outs = {}
    for dev in ("cpu", "cuda"):
        pipe = ckv.compile(pol, backend="reference" if dev == "cpu" else "auto")
        cache, ids, _, _ = build_cache(lens, head_dim=64, summaries=pipe.required_summaries, device=dev, seed=2)
        q = torch.randn(len(lens), 8, 64, generator=torch.Generator().manual_seed(5)).to(dev)
        pipe.plan(cache, ids, num_splits=1)
        res = pipe.run(q, cache, 0)
        outs[dev] = (res.out.cpu(), res.pages_read.cpu())
    torch.testing.assert_close(outs["cuda"][0], outs["cpu"][0], rtol=2e-4, atol=2e-4)
    assert torch.equal(outs["cuda"][1], outs["cpu"][1])
