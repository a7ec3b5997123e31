"""Ablation per stage on the reference path: each stage alone and every shipped stack against dense."""
from pathlib import Path

import pytest
import torch

import composable_kv as ckv
from composable_kv.kernels.page_score import reference as score_ref
from composable_kv.kernels.page_select import reference as select_ref
from composable_kv.kernels.paged_decode import reference as decode_ref

from helpers import build_cache, dense_attention

pytestmark = pytest.mark.cpu
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
LENS = [1, 17, 63, 111, 160]


def policy(*stages, page_size=16, dense_layers=()):
    return {"name": "t", "page_size": page_size, "dense_layers": list(dense_layers), "stages": list(stages)}


def run_policy(pol, lens, *, group=2, head_dim=16, seed=0, q_scale=1.0, k_scale=1.0, num_splits=None):
    pipe = ckv.compile(pol, backend="reference")
    cache, ids, keys, values = build_cache(lens, head_dim=head_dim, summaries=pipe.required_summaries,
                                           seed=seed, k_scale=k_scale, page_size=pipe.page_size)
    q = torch.randn(len(lens), cache.num_kv_heads * group, head_dim,
                    generator=torch.Generator().manual_seed(seed + 1)) * q_scale
    pipe.plan(cache, ids, num_splits=num_splits)
    return pipe, cache, q, pipe.run(q, cache, 0), keys, values


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dense_equals_attention(group, head_dim):
    _, _, q, res, keys, values = run_policy(policy({"stage": "attend"}), LENS, group=group, head_dim=head_dim)
    torch.testing.assert_close(res.out, dense_attention(q, keys, values), rtol=1e-5, atol=1e-5)
    assert res.pages_read.tolist() == [[-(-n // 16)] * 2 for n in LENS]


FULL_BUDGET = 1 << 20
STACKS_AT_FULL_BUDGET = {
    "quest": [{"stage": "quest", "budget_tokens": FULL_BUDGET}, {"stage": "attend"}],
    "topk": [{"stage": "topk", "budget_tokens": FULL_BUDGET}, {"stage": "attend"}],
    "sink_window_all": [{"stage": "sink_window", "sink_tokens": 0, "window_tokens": FULL_BUDGET},
                        {"stage": "attend"}],
    "art_stability_dense": [{"stage": "art", "stop": "stability", "scale_tol": 0.0, "direction_tol": 0.0}],
    "quest_art_certified_tiny_delta": [{"stage": "quest", "budget_tokens": FULL_BUDGET},
                                       {"stage": "art", "stop": "certified", "delta": 1e-30}],
    "swqa": [{"stage": "sink_window"}, {"stage": "quest", "budget_tokens": FULL_BUDGET},
             {"stage": "art", "stop": "certified", "delta": 1e-30}],
}


@pytest.mark.parametrize("name", STACKS_AT_FULL_BUDGET)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_stack_at_full_budget_equals_dense(name, num_splits):
    _, _, q, res, keys, values = run_policy(policy(*STACKS_AT_FULL_BUDGET[name]), LENS, group=3,
                                            num_splits=num_splits)
    torch.testing.assert_close(res.out, dense_attention(q, keys, values), rtol=1e-5, atol=1e-5)
    assert res.pages_read.tolist() == [[-(-n // 16)] * 2 for n in LENS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_with_budget_above_length_equals_dense(path):
    import yaml
    raw = yaml.safe_load(path.read_text())
    # An admission stage (write_gate) needs the gated cache: its read path runs here on a plain cache,
    # and tests/test_admission.py checks the gated cache itself against attention over the kept tokens.
    raw["stages"] = [st for st in raw["stages"] if st["stage"] != "write_gate"]
    for st in raw["stages"]:
        if "budget_tokens" in st:
            st["budget_tokens"] = FULL_BUDGET
        if st["stage"] == "sink_window":
            st["window_tokens"] = FULL_BUDGET
        if st["stage"] == "art":
            st.update({"delta": 1e-30, "scale_tol": 0.0, "direction_tol": 0.0})
    _, _, q, res, keys, values = run_policy(raw, LENS, group=2)
    torch.testing.assert_close(res.out, dense_attention(q, keys, values), rtol=1e-5, atol=1e-5)


def test_budget_below_length_reads_budget_and_last_page():
    pipe, cache, q, res, *_ = run_policy(policy({"stage": "quest", "budget_tokens": 32}, {"stage": "attend"}),
                                         [1, 40, 200])
    assert res.pages_read.tolist() == [[1, 1], [2, 2], [2, 2]]
    order, count, _ = pipe.select(ckv.pipeline.LayerContext(q, cache, 0, pipe.current_plan, 0.25))
    last = (torch.tensor([1, 40, 200]) - 1) // 16
    for b in range(3):
        for h in range(2):
            assert last[b].item() in order[b, h, :count[b, h]].tolist()


def test_budget_zero_keeps_only_forced_pages():
    _, _, _, res, *_ = run_policy(policy({"stage": "sink_window", "sink_tokens": 16, "window_tokens": 0},
                                         {"stage": "quest", "budget_tokens": 0}, {"stage": "attend"}), [100])
    assert res.pages_read.tolist() == [[2, 2]]  # sink page + last page


def test_streaming_reads_sink_and_window_only():
    pol = policy({"stage": "sink_window", "sink_tokens": 20, "window_tokens": 40}, {"stage": "attend"})
    pipe, cache, q, res, keys, values = run_policy(pol, [300])
    # pages 0,1 (sink: tokens 0..19) and the window 260..299 -> pages 16, 17, 18
    assert res.pages_read.tolist() == [[5, 5]]
    kept = torch.tensor([0, 1, 16, 17, 18])
    tok = torch.cat([torch.arange(p * 16, min(p * 16 + 16, 300)) for p in kept.tolist()])
    sub_k, sub_v = [keys[0][:, tok]], [values[0][:, tok]]
    torch.testing.assert_close(res.out, dense_attention(q, sub_k, sub_v), rtol=1e-5, atol=1e-5)


def test_dense_layers_attend_densely():
    pol = policy({"stage": "quest", "budget_tokens": 16}, {"stage": "attend"}, dense_layers=[0])
    _, _, q, res, keys, values = run_policy(pol, [200])
    assert res.pages_read.tolist() == [[13, 13]]
    torch.testing.assert_close(res.out, dense_attention(q, keys, values), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("seed", range(4))
def test_quest_score_bounds_every_logit(group, seed):
    cache, ids, keys, _ = build_cache([37, 200], seed=seed, k_scale=3.0)
    q = torch.randn(2, 2 * group, 16, generator=torch.Generator().manual_seed(seed)) * 5
    table, lens = cache.padded_page_table(ids)
    num_pages = (lens + 15) // 16
    bound = score_ref.quest_scores(q, cache.key_min[0], cache.key_max[0], table, num_pages, 0.25)
    exact = score_ref.exact_page_max_scores(q, cache.k[0], table, lens, 0.25)
    valid = exact > float("-inf")
    assert (bound[valid] >= exact[valid] - 1e-4).all()
    assert (bound[valid] - exact[valid]).max() > 0  # a bound, not the exact value


def test_topk_keeps_the_best_pages():
    pipe, cache, q, res, *_ = run_policy(policy({"stage": "topk", "budget_tokens": 48}, {"stage": "attend"}),
                                         [200], group=2)
    table, lens = cache.padded_page_table([0])
    exact = score_ref.exact_page_max_scores(q, cache.k[0], table, lens, q.shape[-1] ** -0.5)
    order, count, _ = pipe.select(ckv.pipeline.LayerContext(q, cache, 0, pipe.current_plan, q.shape[-1] ** -0.5))
    for h in range(2):
        chosen = set(order[0, h, :count[0, h]].tolist())
        best = exact[0, h, :12].topk(2).indices.tolist()  # 3 pages: 2 best of the rest + the last
        assert chosen == set(best) | {12}




CERTIFIED_LENS = [1, 33, 250, 400]


@pytest.mark.parametrize("bound", ["box", "exact"])
@pytest.mark.parametrize("k_scale,q_scale", [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0), (30.0, 30.0), (1.0, 1e3)])
@pytest.mark.parametrize("delta", [0.3, 0.05, 1e-3])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_certified_art_error_within_bound(bound, k_scale, q_scale, delta, num_splits):
    stages = [{"stage": "art", "stop": "certified", "delta": delta, "chunk_pages": 1}]
    if bound == "exact":  # the exact page max is the tightest sound bound: the stop fires most
        stages.insert(0, {"stage": "topk", "budget_tokens": FULL_BUDGET})
    pipe, cache, q, res, keys, values = run_policy(policy(*stages), CERTIFIED_LENS, group=2, k_scale=k_scale,
                                                   q_scale=q_scale, num_splits=num_splits, head_dim=16)
    ref = dense_attention(q, keys, values)
    assert res.tau_bound is not None and (res.tau_bound <= delta + 1e-6).all()
    v_max = torch.stack([v[0].float().norm(dim=-1).max() for v in values])  # [B]
    err = (res.out.float() - ref).norm(dim=-1)  # [B, Hq]
    bound = res.tau_bound * (v_max[:, None] + res.out.float().norm(dim=-1))
    assert (err <= bound + 1e-5).all(), (err - bound).max()


def test_certified_grid_exercises_early_stops():
    """The error-bound grid above must include cases where the stop really fired."""
    pol = policy({"stage": "topk", "budget_tokens": FULL_BUDGET},
                 {"stage": "art", "stop": "certified", "delta": 0.05, "chunk_pages": 1})
    _, _, _, res, *_ = run_policy(pol, CERTIFIED_LENS, group=2, k_scale=2.0, q_scale=2.0, head_dim=16)
    full = torch.tensor([-(-n // 16) for n in CERTIFIED_LENS])[:, None]
    assert (res.pages_read < full).any() and (res.tau_bound > 0).any()


def test_certified_art_stops_early_on_peaked_attention():
    # One page holds all the mass: the certified stop must fire after the first chunk.
    cache, ids, keys, values = build_cache([512], head_dim=16)
    q = torch.zeros(1, 2, 16)
    q[0, :, 0] = 40.0
    for layer_k in cache.k:
        layer_k[:, :, :, 0] = -1.0
    hot = cache.pages(0)[7]
    cache.k[0][hot, :, 3, 0] = 1.0
    cache.key_min[0].fill_(0)
    cache.key_max[0].fill_(0)
    # rebuild summaries from the edited keys
    cache.key_min[0][:] = cache.k[0].amin(dim=2)
    cache.key_max[0][:] = cache.k[0].amax(dim=2)
    pipe = ckv.compile(policy({"stage": "art", "stop": "certified", "delta": 0.01, "chunk_pages": 1}),
                       backend="reference")
    pipe.plan(cache, ids)
    res = pipe.run(q, cache, 0)
    assert res.pages_read.tolist() == [[1, 1]]
    assert res.tau_bound.max() < 1e-3


def test_stability_art_stops_and_stays_close():
    pol = policy({"stage": "art", "stop": "stability", "scale_tol": 1e-2, "direction_tol": 1e-3,
                  "patience": 2, "chunk_pages": 1})
    pipe, cache, q, res, keys, values = run_policy(pol, [800], group=2, k_scale=3.0, q_scale=3.0)
    assert res.pages_read.max() < 50
    assert res.tau_bound is None


def test_select_pages_orders_by_score_with_forced_first_class():
    key = torch.tensor([[[0.5, 3.0, 1.0, 2.0, float("-inf")]]])
    forced = torch.tensor([[[True, False, False, False, False]]])
    cand = torch.tensor([[[True, True, True, True, False]]])
    order, count = select_ref.select_pages(key, forced, cand, 2)
    assert count.tolist() == [[2]] and order[0, 0, :2].tolist() == [1, 0]
    order, count = select_ref.select_pages(key, forced, cand, None)
    assert order[0, 0].tolist() == [1, 3, 2, 0, -1]


def test_strided_tail_lse_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    bounds = torch.randn(2, 3, 11, generator=g) * 5
    tokens = torch.randint(1, 17, (2, 3, 11), generator=g)
    count = torch.tensor([[11, 7, 0], [3, 11, 1]])
    for S in (1, 2, 3):
        tail = select_ref.strided_tail_lse(bounds, tokens, count, S)
        for b in range(2):
            for h in range(3):
                for i in range(11):
                    js = [j for j in range(i, int(count[b, h]), S)]
                    want = torch.logsumexp(torch.stack([bounds[b, h, j] + tokens[b, h, j].float().log()
                                                        for j in js]), 0) if js else torch.tensor(float("-inf"))
                    torch.testing.assert_close(tail[b, h, i], want)


def test_extreme_logits_stay_finite():
    pol = policy({"stage": "quest", "budget_tokens": 64}, {"stage": "art", "stop": "certified"})
    _, _, q, res, keys, values = run_policy(pol, [1, 100], q_scale=1e4, k_scale=1e2)
    assert torch.isfinite(res.out).all()


def test_empty_decode_order_reads_nothing():
    cache, ids, _, _ = build_cache([40])
    table, lens = cache.padded_page_table(ids)
    order = torch.full((1, 2, 3), -1, dtype=torch.int32)
    out = decode_ref.paged_decode(torch.randn(1, 2, 16), cache.k[0], cache.v[0], table, lens, order,
                                  torch.zeros(1, 2, dtype=torch.int32), sm_scale=0.25)
    assert out.pages_read.tolist() == [[0, 0]] and (out.out == 0).all()


def test_box_bound_bytes_count_the_listed_pages_after_a_scorer():
    """ART's certified stop after a scorer whose scores bound nothing reads Quest's key min/max of the listed pages
    only (page_score.quest_scores_listed); with no scorer the box orders every page and reads them all."""
    cache, ids, _, _ = build_cache([40, 300, 1000])
    minmax = 2 * cache.head_dim * cache.dtype.itemsize  # a page's key min and max, one KV head
    art = {"stage": "art", "stop": "certified", "delta": 0.01}
    box_only = ckv.compile({"name": "box", "page_size": 16, "stages": [art]})
    box_only.plan(cache, ids)
    pages = box_only.current_plan.num_pages.double()
    torch.testing.assert_close(box_only.summary_bytes(cache), pages * minmax * cache.num_kv_heads)
    scored = ckv.compile({"name": "ap", "page_size": 16, "stages": [
        {"stage": "attention_predictor", "budget_tokens": 160, "history_steps": 4}, art]})
    assert scored.needs_box_bound
    scored.plan(cache, ids)
    plan, predictor = scored.current_plan, scored.selectors[0]
    listed = torch.minimum(pages, plan.forced.sum(-1).double().clamp(min=predictor.budget_pages(16)))
    assert (listed < pages).any() and (listed == pages).any()  # the long requests list fewer pages than they hold
    want = (pages * predictor.summary_bytes_per_page(cache) + listed * minmax) * cache.num_kv_heads
    torch.testing.assert_close(scored.summary_bytes(cache), want)
