"""Value checks on CUDA: off by default (no host sync, so pipeline.run stays capturable in a CUDA graph),
on with validate=True / CKV_VALIDATE=1."""
import pytest
import torch

pytestmark = pytest.mark.gpu

import composable_kv as ckv  # noqa: E402

POLICY = "configs/quest_art.yaml"


def setup(validate):
    pipe = ckv.compile(POLICY, validate=validate)
    cache = ckv.PagedKVCache(3, 2, 64, 64, page_size=16, dtype=torch.bfloat16, device="cuda",
                             summaries=pipe.required_summaries, validate=validate)
    ids = [cache.add_sequence() for _ in range(2)]
    cache.append(ids, [100, 300], *(torch.randn(3, 400, 2, 64, device="cuda", dtype=torch.bfloat16),) * 2)
    pipe.plan(cache, ids)
    return pipe, cache, torch.randn(2, 4, 64, device="cuda", dtype=torch.bfloat16)


def test_default_run_is_graph_capturable_and_skips_value_checks():
    pipe, cache, q = setup(None)
    assert not cache.check_values
    for layer in range(3):
        pipe.run(q, cache, layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [pipe.run(q, cache, layer) for layer in range(3)]
    graph.replay()
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(o.out).all()) for o in outs)


def test_validate_true_refuses_nan_on_cuda():
    pipe, cache, q = setup(True)
    bad = q.clone()
    bad[1, 3, 5] = float("nan")
    with pytest.raises(ckv.TensorContractError, match=r"q holds 1 non-finite values \(NaN first at \[b=1, head=3, d=5\]\)"):
        pipe.run(bad, cache, 2)
    k = torch.randn(3, 1, 2, 64, device="cuda", dtype=torch.bfloat16)
    k[2, 0, 1, 7] = float("inf")
    with pytest.raises(ckv.TensorContractError, match="append: k holds 1 non-finite values"):
        cache.append([0], [1], k, k.nan_to_num())
