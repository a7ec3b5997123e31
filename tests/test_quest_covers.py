"""Quest whose budget covers the whole context: no scoring, no summary bytes, so it never reads more
than dense (% KV read <= 100), on the reference and the Triton (interpret) paths and end to end."""

import pytest
import torch

import composable_kv as ckv
from composable_kv import hf

from helpers import build_cache, tiny_llama

pytestmark = pytest.mark.cpu

LENS = [40, 77]  # pages of 16: 3 and 5; the table is 5 pages wide


def _policy(budget_tokens, terminal):
    return {"name": f"q{budget_tokens}", "page_size": 16,
            "stages": [{"stage": "quest", "budget_tokens": budget_tokens}, terminal]}


def _run(policy, backend="reference"):
    pipe = ckv.compile(policy, backend=backend)
    cache, ids, keys, values = build_cache(LENS, summaries=pipe.required_summaries, seed=3)
    torch.manual_seed(1)
    q = torch.randn(len(LENS), 4, 16)  # [B, Hq, D]
    pipe.plan(cache, ids)
    res = pipe.run(q, cache, 0)
    return pipe, cache, res


def _dense_bytes(cache):
    pages = torch.tensor([-(-n // 16) for n in LENS], dtype=torch.float64)
    return pages * cache.num_kv_heads * 2 * 16 * cache.head_dim * cache.dtype.itemsize  # [B]


@pytest.mark.parametrize("terminal", [{"stage": "attend"}, {"stage": "art", "stop": "certified", "delta": 0.01},
                                      {"stage": "art", "stop": "stability"}])
def test_covering_budget_reads_every_page_and_no_summary(terminal):
    pipe, cache, res = _run(_policy(5 * 16, terminal))
    dense_pipe, _, dense = _run({"name": "dense", "page_size": 16, "stages": [{"stage": "attend"}]})
    assert res.pages_read.tolist() == [[3, 3], [5, 5]]
    torch.testing.assert_close(res.out, dense.out, atol=1e-5, rtol=1e-5)
    assert pipe.kv_bytes_read(res, cache, 0).tolist() == _dense_bytes(cache).tolist()  # no summary bytes
    if terminal.get("stop") == "certified":
        assert res.tau_bound.abs().max() == 0  # every page read: nothing left unread


def test_budget_below_the_table_still_scores_and_counts_summaries():
    pipe, cache, res = _run(_policy(4 * 16, {"stage": "attend"}))
    assert res.pages_read.tolist() == [[3, 3], [4, 4]]  # the short request fits, the long one is cut
    summaries = pipe.kv_bytes_read(res, cache, 0) - res.pages_read.sum(-1) * 2 * 16 * 16 * 4
    assert summaries.tolist() == [n * 2 * 2 * 16 * 4 for n in (3, 5)]  # key min + max per page and KV head


@pytest.mark.interpret
def test_triton_path_agrees_when_the_budget_covers():
    policy = _policy(5 * 16, {"stage": "art", "stop": "certified", "delta": 0.01})
    _, _, ref = _run(policy, "reference")
    _, _, tri = _run(policy, "triton")
    assert tri.pages_read.tolist() == ref.pages_read.tolist()
    torch.testing.assert_close(tri.out, ref.out, atol=1e-4, rtol=1e-4)


def test_kv_read_never_exceeds_dense_end_to_end():
    model = tiny_llama()
    prompt = [list(range(1, 90))]
    out = {name: hf.generate(model, None, prompt, policy=p, max_new_tokens=6, stop_at_eos=False)
           for name, p in [("dense", "configs/dense.yaml"),
                           ("quest", _policy(96, {"stage": "attend"})),
                           ("quest_art", _policy(96, {"stage": "art", "stop": "certified", "delta": 0.01}))]}
    for name in ("quest", "quest_art"):
        assert out[name].sequences == out["dense"].sequences
        assert out[name].kv_read_fraction[0] == pytest.approx(1.0)
        assert out[name].kv_bytes_per_token[0] == pytest.approx(out["dense"].kv_bytes_per_token[0])
