"""GPU: the decode kernels' page-mass side output vs the reference (larger grid, bf16), and the
attention_predictor stage compiled on CUDA equal to its reference path."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from page_mass_checks import check_dense_page_mass, check_page_mass

LENS = [1, 17, 63, 111, 1000, 4099]


@pytest.mark.parametrize("rule", ["none", "stability", "certified", "certified_c4"])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 128), (8, 128), (3, 64)])
def test_page_mass_gpu(rule, num_splits, group, head_dim):
    check_page_mass(LENS, group, head_dim, rule, num_splits, device="cuda")


@pytest.mark.parametrize("budget", [3, 100])
@pytest.mark.parametrize("q_scale", [1.0, 1000.0])
def test_page_mass_gpu_budget_extreme(budget, q_scale):
    check_page_mass(LENS, 4, 128, "certified", 3, budget, device="cuda", q_scale=q_scale, tol=1e-4)


def test_page_mass_gpu_bf16():
    # bf16 dots: masses close; stop decisions may flip at the threshold
    check_page_mass(LENS, 4, 128, "none", 3, device="cuda", dtype=torch.bfloat16, tol=2e-2)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_dense_page_mass_gpu(num_splits):
    check_dense_page_mass([1, 17, 63, 111, 2049], 4, 128, num_splits, device="cuda")


def test_stage_cuda_equals_reference(tmp_path, no_tf32):
    import composable_kv as ckv
    from composable_kv.policies.attention_predictor.predictor import PredictorCNN, save_weights
    from helpers import build_cache
    torch.manual_seed(0)
    w = str(save_weights(PredictorCNN(), tmp_path / "w.pt"))
    pol = {"name": "ap", "page_size": 16, "dense_layers": [0], "stages": [
        {"stage": "attention_predictor", "budget_tokens": 128, "history_steps": 16, "calibrate_every": 3,
         "weights": w}, {"stage": "art", "stop": "certified", "delta": 0.05}]}
    outs = {}
    for dev, backend in (("cpu", "reference"), ("cuda", "triton")):
        pipe = ckv.compile(pol, backend=backend)
        cache, ids, _, _ = build_cache([300, 1000, 77], num_layers=2, num_kv_heads=2, head_dim=64,
                                       extra_pages=16, summaries=pipe.required_summaries, device=dev)
        g = torch.Generator().manual_seed(1)
        res = []
        for step in range(7):
            slots = cache.reserve(ids, [1] * len(ids))
            for layer in range(2):
                cache.write(layer, slots, torch.randn(3, 2, 64, generator=g).to(dev),
                            torch.randn(3, 2, 64, generator=g).to(dev))
            pipe.plan(cache, ids, num_splits=2)
            q = torch.randn(3, 8, 64, generator=g).to(dev) * 2
            res.append([pipe.run(q, cache, layer) for layer in range(2)])
        outs[dev] = res
    for a, b in zip(outs["cpu"], outs["cuda"]):
        for ra, rb in zip(a, b):
            assert torch.equal(ra.pages_read, rb.pages_read.cpu())
            torch.testing.assert_close(ra.out, rb.out.cpu(), rtol=1e-3, atol=1e-3)
