"""Key shadow kernels on the GPU (compiled): the interpret grid, larger and in bf16; fused == generic for
shadow stacks, bf16 and CUDA-graph capture are covered by tests/test_kernels_gpu.py's config loops."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from kernel_checks import check_pipeline
    from shadow_checks import check_shadow_scores, check_shadow_select

LENS = [1, 17, 63, 111, 1000, 4099]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (8, 128)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("q_scale", [1.0, 300.0])
def test_shadow_scores_gpu(bits, group, head_dim, dtype, q_scale):
    check_shadow_scores(LENS, bits=bits, group=group, head_dim=head_dim, dtype=getattr(torch, dtype),
                        device="cuda", q_scale=q_scale, tol=2e-4)


@pytest.mark.parametrize("budget", [0, 3, 100, 3000])
@pytest.mark.parametrize("n_cand,num_splits", [(None, 1), (400, 8)])
def test_shadow_select_gpu(budget, n_cand, num_splits):
    check_shadow_select(LENS, budget, bits=8 if budget % 2 else 4, group=4, head_dim=128, num_splits=num_splits,
                        device="cuda", n_cand=n_cand, seed=budget)


STACKS = {
    "quest_shadow8_art": [{"stage": "sink_window", "sink_tokens": 64, "window_tokens": 256},
                          {"stage": "quest", "budget_tokens": 2048},
                          {"stage": "key_shadow", "bits": 8, "budget_tokens": 512},
                          {"stage": "art", "stop": "certified", "delta": 0.05}],
    "topk_shadow4_attend": [{"stage": "topk", "budget_tokens": 1024},
                            {"stage": "key_shadow", "bits": 4, "budget_tokens": 256}, {"stage": "attend"}],
    "shadow4_art_stability": [{"stage": "key_shadow", "bits": 4, "budget_tokens": 512},
                              {"stage": "art", "stop": "stability", "chunk_pages": 2}],
}


@pytest.mark.parametrize("name", STACKS)
@pytest.mark.parametrize("num_splits", [None, 4])
def test_shadow_stacks_fused_equal_generic_gpu(name, num_splits):
    pol = {"name": name, "page_size": 16, "dense_layers": [0], "stages": STACKS[name]}
    check_pipeline(pol, [1, 17, 63, 111, 1000, 5000], group=4, head_dim=128, num_layers=2, num_splits=num_splits,
                   device="cuda")
