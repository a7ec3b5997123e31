"""ART options: the running output rounded to bf16 after every chunk (reference and Triton kernel), and
natural read order. Kernel tests run under TRITON_INTERPRET=1 on CPU with tiny grids."""
import os

import pytest
import torch

import composable_kv as ckv
from composable_kv.kernels.paged_decode import reference as decode_ref
from composable_kv.stages import StopRule

from helpers import build_cache
from kernel_checks import check_pipeline, decode_inputs

INTERPRET_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not INTERPRET_OK,
                                  reason="no CUDA and TRITON_INTERPRET unset (tests/conftest.py sets it)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
PAPER = dict(scale_tol=1e-7, direction_tol=1e-3, patience=5)


def peaked(n_pages=20, page=16, D=16):
    """One request, one KV head: page 0 holds nearly all the mass (logit +10, values 1.5); every other
    page adds ~1e-4 of mass with random values. o then moves ~1e-4 per page: far above the paper's 1e-7
    scale tolerance in fp32, far below half a bf16 ulp of o's elements (~0.004 at 1.5)."""
    g = torch.Generator().manual_seed(0)
    T = n_pages * page
    direction = torch.zeros(D)
    direction[0] = 1.0
    q = (8.0 * direction).view(1, 1, D)
    k = torch.randn(T, D, generator=g) * 0.05 - 0.5 * direction  # logits ~ -1 * (8 * 0.25) = -2 after scaling
    k[:page] = 5.0 * direction  # logit 8 * 5 / 4 = +10
    v = torch.randn(T, D, generator=g)
    v[:page] = 1.5
    cache = ckv.PagedKVCache(1, 1, D, n_pages + 1, page_size=page, dtype=torch.float32)
    sid = cache.add_sequence()
    cache.append([sid], [T], k[None, :, None], v[None, :, None])
    table, lens = cache.padded_page_table([sid])
    order = torch.arange(n_pages, dtype=torch.int32).view(1, 1, n_pages)
    count = torch.tensor([[n_pages]], dtype=torch.int32)
    return q, cache, table, lens, order, count


def run_ref(q, cache, table, lens, order, count, rule, tail=None, splits=1):
    return decode_ref.paged_decode(q, cache.k[0], cache.v[0], table, lens, order, count, sm_scale=0.25, rule=rule,
                                   tail_lse=tail, num_splits=splits)


@pytest.mark.cpu
def test_bf16_accumulation_makes_the_paper_stop_fire_where_fp32_does_not():
    args = peaked()
    fp32 = run_ref(*args, StopRule(kind="stability", chunk_pages=1, **PAPER))
    bf16 = run_ref(*args, StopRule(kind="stability", chunk_pages=1, acc_bf16=True, **PAPER))
    assert fp32.pages_read.item() == 20  # ||o|| moves ~1e-4 per page: never stable at 1e-7
    assert bf16.pages_read.item() == 6  # the check after page 0 never counts; after pages 1..5: unchanged
    torch.testing.assert_close(bf16.out, torch.full_like(bf16.out, 1.5), rtol=0, atol=0)  # the rest was rounded away


@pytest.mark.cpu
def test_bf16_accumulation_rounds_the_output_and_keeps_certified_decisions():
    cache, q, table, lens, order, count, tail, sm = decode_inputs([17, 63, 200], 2, 16, None)
    for kind in ("certified", None):
        a = decode_ref.paged_decode(q, cache.k[0], cache.v[0], table, lens, order, count, sm_scale=sm, tail_lse=tail,
                                    rule=StopRule(kind=kind, chunk_pages=2, delta=0.2))
        b = decode_ref.paged_decode(q, cache.k[0], cache.v[0], table, lens, order, count, sm_scale=sm, tail_lse=tail,
                                    rule=StopRule(kind=kind, chunk_pages=2, delta=0.2, acc_bf16=True))
        assert torch.equal(a.pages_read, b.pages_read)  # the certified stop reads m and l, not acc
        if kind is None:  # no ART: nothing is rounded
            assert torch.equal(a.out, b.out)
        else:
            assert not torch.equal(a.out, b.out)
            torch.testing.assert_close(b.out, a.out, rtol=2 ** -7, atol=1e-3)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("acc_bf16", [False, True])
def test_kernel_equals_reference_on_the_peaked_case(acc_bf16):
    from composable_kv.kernels.paged_decode import triton as decode_tk
    q, cache, table, lens, order, count = peaked()
    rule = StopRule(kind="stability", chunk_pages=1, acc_bf16=acc_bf16, **PAPER)
    a = run_ref(q, cache, table, lens, order, count, rule)
    b = decode_tk.paged_decode(q.to(DEV), cache.k[0].to(DEV), cache.v[0].to(DEV), table.to(DEV), lens.to(DEV),
                               order.to(DEV), count.to(DEV), sm_scale=0.25, rule=rule)
    assert a.pages_read.item() == b.pages_read.item() == (6 if acc_bf16 else 20)
    torch.testing.assert_close(b.out.cpu(), a.out, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("kind,chunk", [("stability", 1), ("certified", 2)])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 32)])
def test_kernel_equals_reference_bf16(kind, chunk, num_splits, group, head_dim):
    from composable_kv.kernels.paged_decode import triton as decode_tk
    cache, q, table, lens, order, count, tail, sm = decode_inputs([1, 17, 63, 200], group, head_dim, None,
                                                                 num_splits=num_splits, seed=group)
    rule = StopRule(kind=kind, chunk_pages=chunk, scale_tol=1e-2, direction_tol=1e-3, patience=2, delta=0.05,
                    acc_bf16=True)
    a = decode_ref.paged_decode(q, cache.k[0], cache.v[0], table, lens, order, count, sm_scale=sm, rule=rule,
                                tail_lse=tail, num_splits=num_splits)
    d = [t.to(DEV) for t in (q, cache.k[0], cache.v[0], table, lens, order, count, tail)]
    b = decode_tk.paged_decode(*d[:7], sm_scale=sm, rule=rule, tail_lse=d[7], num_splits=num_splits)
    assert torch.equal(a.pages_read, b.pages_read.cpu())
    # the fp32 values before each rounding differ in the last bits: rarely, one bf16 ulp (2^-7 relative) apart
    torch.testing.assert_close(b.out.cpu(), a.out, rtol=2 ** -7, atol=1e-3)
    fp32 = decode_ref.paged_decode(q, cache.k[0], cache.v[0], table, lens, order, count, sm_scale=sm,
                                   rule=StopRule(**{**rule.__dict__, "acc_bf16": False}), tail_lse=tail,
                                   num_splits=num_splits)

    def differ(x, y):  # share of output elements more than 1e-5 apart (relative)
        return float(((x.cpu() - y).abs() > 1e-5 * y.abs().clamp(min=1e-3)).float().mean())
    assert differ(b.out, a.out) <= 0.01 < 0.2 < differ(b.out, fp32.out)
    if kind == "certified":
        torch.testing.assert_close(b.tau_bound.cpu(), a.tau_bound, rtol=1e-4, atol=1e-6)


def _pol(*stages):
    return {"name": "t", "page_size": 16, "dense_layers": [0], "stages": list(stages)}


NATURAL_STACKS = {
    "dense_art_natural_bf16": [{"stage": "art", "stop": "stability", "order": "natural", "accumulate": "bf16",
                                "scale_tol": 1e-2, "patience": 1, "chunk_pages": 1}],
    "sink_window_art_natural": [{"stage": "sink_window", "sink_tokens": 16, "window_tokens": 64},
                                {"stage": "art", "stop": "stability", "order": "natural", "scale_tol": 1e-2,
                                 "patience": 1, "chunk_pages": 2}],
    "quest_art_natural_certified": [{"stage": "quest", "budget_tokens": 96},
                                    {"stage": "art", "stop": "certified", "order": "natural", "delta": 0.3,
                                     "accumulate": "bf16", "chunk_pages": 1}],
}


@pytest.mark.cpu
def test_natural_order_reads_kept_pages_in_page_order():
    for name, stages in NATURAL_STACKS.items():
        pipe = ckv.compile(_pol(*stages), backend="reference")
        cache, ids, _, _ = build_cache([63, 333], num_layers=2, head_dim=16, summaries=pipe.required_summaries)
        plan = pipe.plan(cache, ids)
        q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
        order, count, _ = pipe.select(ckv.pipeline.LayerContext(q, cache, 1, plan, 0.25))
        for b in range(2):
            for h in range(2):
                listed = order[b, h, :count[b, h]].tolist()
                assert listed == sorted(listed) and len(listed) > 0, (name, listed)
    assert "box" not in str(ckv.compile(_pol(*NATURAL_STACKS["dense_art_natural_bf16"])).required_summaries)


@needs_triton
@pytest.mark.interpret
@pytest.mark.parametrize("name", NATURAL_STACKS)
def test_natural_and_bf16_stacks_triton_equal_reference(name):
    check_pipeline(_pol(*NATURAL_STACKS[name]), [17, 111, 333], group=2, head_dim=32, num_layers=2, num_splits=1,
                   device=DEV, tol=2 ** -7)
