"""Triton kernels vs references under TRITON_INTERPRET=1 on CPU (small shapes).

The variable must be set before triton is imported; tests/conftest.py does it when CUDA is absent.
With CUDA present the same checks run compiled on the GPU (device="cuda").
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

from kernel_checks import (check_decode, check_narrow, check_pipeline, check_score_splits, check_scores,  # noqa: E402
                           check_select, check_tail)

pytestmark = [pytest.mark.interpret, pytest.mark.usefixtures("nan_empty")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
LENS = [1, 17, 63, 111]


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_scale", [1.0, 300.0])
def test_page_scores(group, head_dim, q_scale):
    check_scores(LENS, group, head_dim, device=DEV, q_scale=q_scale)


@pytest.mark.parametrize("score,splits,budget,certified,num_splits", [
    (1, 3, 5, False, 1), (1, 4, None, False, 1), (1, 2, 3, True, 3), (2, 3, 4, True, 1), (2, 5, None, False, 2)])
def test_score_select_split_scoring(score, splits, budget, certified, num_splits):
    # 16-page blocks: 2-4 slices of the 63-page row; the shorter rows leave slices empty
    check_score_splits([1, 17, 300, 1000], 3, 64, score, splits, budget=budget, certified=certified,
                       num_splits=num_splits, block_s=16)


@pytest.mark.parametrize("budget", [None, 0, 1, 3, 7, 50, "per_request"])
@pytest.mark.parametrize("ties", [False, True])
def test_select_pages(budget, ties):
    check_select(3, 2, 37, budget, device=DEV, ties=ties, seed=budget if isinstance(budget, int) else 5)


@pytest.mark.parametrize("budget", [0, 3, 12, 1000])
@pytest.mark.parametrize("shared", [False, True])
def test_narrow_pages(budget, shared):
    check_narrow(3, 2, 37, budget, device=DEV, seed=budget, shared=shared)


@pytest.mark.parametrize("budget,n_forced", [(3, 40), (17, 150), (33, 300)])
def test_select_pages_forced_past_the_sort_block(budget, n_forced):
    """Rows that force more pages than the budget's sort block (16, 32, 64 here) sort the whole row; the others
    sort the block."""
    from composable_kv.kernels.page_select.triton import sort_block_for
    o, c, _, _ = check_select(6, 2, 100, budget, device=DEV, seed=n_forced, n_forced=n_forced)
    block = sort_block_for(budget, 100)
    assert (c > block).any() and (c <= block).any(), (block, c)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
def test_strided_tail_lse(num_splits):
    check_tail(3, 2, 23, num_splits, device=DEV, seed=num_splits)


@pytest.mark.parametrize("num_splits,budget", [(1, None), (3, None), (1, 9), (3, 9), (2, 0)])
def test_strided_tail_lse_in_chunks(num_splits, budget):
    """Several chunks of 2 rows, live rows ending mid-chunk (a budget below the pages), empty rows after them; a
    request without bounds (+inf)."""
    check_tail(3, 2, 61, num_splits, device=DEV, seed=7 + num_splits, budget=budget, chunk_rows=2, no_bound=True)


def test_strided_tail_lse_refuses_a_chunk_that_is_no_power_of_two():
    from composable_kv.kernels.page_select import triton as select_tk
    x = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="chunk_rows must be a power of two"):
        select_tk.strided_tail_lse(x, x.int(), torch.ones(1, 1, dtype=torch.int32), 1, chunk_rows=3)


@pytest.mark.parametrize("rule", ["none", "stability", "stability_paper", "certified", "certified_c4"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (8, 128), (3, 64)])
def test_decode(rule, num_splits, group, head_dim):
    check_decode(LENS + [300], group, head_dim, rule, num_splits, device=DEV)


@pytest.mark.parametrize("rule", ["none", "stability", "certified"])
@pytest.mark.parametrize("q_scale", [100.0, 1000.0])
@pytest.mark.parametrize("budget", [3, None])
def test_decode_extreme_logits(rule, q_scale, budget):
    check_decode(LENS + [200], 2, 64, rule, 3, budget, device=DEV, q_scale=q_scale, tol=1e-3)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_pipeline_configs_fused_equal_generic(config, num_splits):
    check_pipeline(config, [1, 17, 63, 111, 333], group=2, head_dim=64, num_splits=num_splits, device=DEV)


def _pol(*stages, dense_layers=(0,)):
    return {"name": "t", "page_size": 16, "dense_layers": list(dense_layers), "stages": list(stages)}


STACKS = {
    "quest_small_budget": [{"stage": "quest", "budget_tokens": 40}, {"stage": "attend"}],
    "topk_small_budget": [{"stage": "topk", "budget_tokens": 48}, {"stage": "attend"}],
    "sw_quest_art_certified": [{"stage": "sink_window", "sink_tokens": 16, "window_tokens": 32},
                               {"stage": "quest", "budget_tokens": 96},
                               {"stage": "art", "stop": "certified", "delta": 0.3, "chunk_pages": 1}],
    "sw_art_certified_box": [{"stage": "sink_window", "sink_tokens": 32, "window_tokens": 64},
                             {"stage": "art", "stop": "certified", "delta": 0.2, "chunk_pages": 2}],
    "art_certified_box_all": [{"stage": "art", "stop": "certified", "delta": 0.1, "chunk_pages": 1}],
    "topk_art_stability": [{"stage": "topk", "budget_tokens": 128},
                           {"stage": "art", "stop": "stability", "scale_tol": 0.05, "direction_tol": 0.01,
                            "patience": 1, "chunk_pages": 1}],
    "sw_quest_shadow8_art_certified": [{"stage": "sink_window", "sink_tokens": 16, "window_tokens": 32},
                                       {"stage": "quest", "budget_tokens": 160},
                                       {"stage": "key_shadow", "bits": 8, "budget_tokens": 64},
                                       {"stage": "art", "stop": "certified", "delta": 0.2, "chunk_pages": 1}],
    "topk_shadow4_attend": [{"stage": "topk", "budget_tokens": 96}, {"stage": "key_shadow", "bits": 4,
                                                                     "budget_tokens": 40}, {"stage": "attend"}],
    "shadow4_alone_art_stability": [{"stage": "key_shadow", "bits": 4, "budget_tokens": 80},
                                    {"stage": "art", "stop": "stability", "scale_tol": 0.05,
                                     "direction_tol": 0.01, "patience": 1, "chunk_pages": 1}],
    "quest_shadow_quest_generic": [{"stage": "quest", "budget_tokens": 200},
                                   {"stage": "key_shadow", "budget_tokens": 120},
                                   {"stage": "quest", "budget_tokens": 64}, {"stage": "attend"}],
    "two_scorers_generic": [{"stage": "quest", "budget_tokens": 160}, {"stage": "topk", "budget_tokens": 64},
                            {"stage": "attend"}],
}


@pytest.mark.parametrize("name", STACKS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_stacks_fused_equal_generic(name, num_splits):
    check_pipeline(_pol(*STACKS[name]), [1, 17, 63, 111, 333], group=4, head_dim=64, num_layers=2,
                   num_splits=num_splits, device=DEV)


@pytest.mark.parametrize("q_scale", [100.0, 1000.0])
def test_pipeline_extreme_logits(q_scale):
    check_pipeline(_pol(*STACKS["sw_quest_art_certified"]), [17, 111, 400], group=2, head_dim=64, num_layers=2,
                   num_splits=3, device=DEV, q_scale=q_scale, tol=1e-3)


@pytest.mark.parametrize("config", ["ltri_art"])
def test_generic_path_bounds_use_the_triton_kernel(config, monkeypatch):
    """A stack that runs the generic path on the triton backend takes ART's box bounds from the Triton
    page-score kernel, never from the torch reference (whose temporaries cost ms a layer at 32k on a GPU);
    test_pipeline_configs_fused_equal_generic checks that the two agree."""
    import composable_kv as ckv
    from composable_kv.kernels.page_score import reference as score_ref
    from helpers import build_cache

    pipe = ckv.compile(ROOT / "configs" / f"{config}.yaml", backend="triton")
    assert pipe.needs_box_bound
    layers = max(pipe.config.dense_layers, default=-1) + 2  # the last one is sparse
    cache, ids, _, _ = build_cache([17, 111, 333], num_layers=layers, head_dim=64, summaries=pipe.required_summaries,
                                   device=DEV, page_size=pipe.page_size)
    q = torch.randn(3, 2 * cache.num_kv_heads, 64, device=DEV)
    pipe.plan(cache, ids)

    def refused(*args, **kwargs):
        raise AssertionError("the torch reference scored pages on the triton backend")
    monkeypatch.setattr(score_ref, "quest_scores", refused)
    monkeypatch.setattr(score_ref, "quest_scores_listed", refused)
    for layer in range(layers):
        assert pipe.run(q, cache, layer).pages_read.shape == (3, cache.num_kv_heads)


def test_describe_names_the_path():
    import composable_kv as ckv
    lines = ckv.compile(_pol(*STACKS["sw_quest_art_certified"]), backend="triton").describe("cuda")
    assert "score_select" in lines and "paged_decode" in lines
    generic = ckv.compile(_pol(*STACKS["two_scorers_generic"]), backend="triton").describe("cuda")
    assert "generic" in generic
    shadow = ckv.compile(_pol(*STACKS["sw_quest_shadow8_art_certified"]), backend="triton").describe("cuda")
    assert "<= 4 launches" in shadow and "shadow_select" in shadow and "int8 key shadow" in shadow


# -- page-mass side output (AttentionPredictor's history) --------------------------------------

@pytest.mark.parametrize("rule", ["none", "stability", "certified", "certified_c4"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (8, 128), (3, 64)])
def test_decode_page_mass(rule, num_splits, group, head_dim):
    from page_mass_checks import check_page_mass
    check_page_mass(LENS + [300], group, head_dim, rule, num_splits, device=DEV)


@pytest.mark.parametrize("budget", [1, 5])
@pytest.mark.parametrize("q_scale", [1.0, 1000.0])
def test_decode_page_mass_budget_extreme(budget, q_scale):
    from page_mass_checks import check_page_mass
    check_page_mass(LENS + [200], 2, 64, "certified", 3, budget, device=DEV, q_scale=q_scale, tol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_dense_decode_page_mass(num_splits):
    from page_mass_checks import check_dense_page_mass
    check_dense_page_mass([1, 17, 63, 111], 4, 64, num_splits, device=DEV)


def test_arrival_counters_are_never_freed():
    # a captured CUDA graph keeps the counters' address: growing the buffer must keep the old one alive
    from composable_kv.kernels.page_select import triton as select_tk
    dev = torch.device("cpu")
    small = select_tk._arrivals(10, dev)
    assert small.numel() >= 10 and int(small.abs().sum()) == 0
    assert select_tk._arrivals(12, dev) is small
    big = select_tk._arrivals(small.numel() + 1, dev)
    assert big is not small and big.numel() > small.numel()
    assert any(t is small for t in select_tk._RETIRED)
    assert select_tk._arrivals(5, dev) is big
