"""Property tests (hypothesis): every Triton kernel against its reference under TRITON_INTERPRET=1.

Inputs drawn at random: ragged batches (1 token, exact page multiples, odd lengths), GQA 1..8, fp32 /
fp16 / bf16, budgets 0, 1 and past the context, and four key patterns:
  random      keys and q ~ N(0, 1)
  equal       every key identical: all logits of a head tie
  one_token   one token per request carries ~all the softmax mass (logit gap ~32 nats)
  near_limit  keys at +-2^14 (fp16: near its max 65504), +-2^60 (fp32), +-2^100 (bf16), q in {-2..2}:
              logits far past exp's range, with exact ties among the largest
The certified stop's bound ||o - o_S|| <= delta * (max||v|| + ||o_S||) is checked on every certified
result, kernel and reference, against attention over every listed page.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

import composable_kv as ckv  # noqa: E402
from composable_kv.kernels.page_score import reference as score_ref  # noqa: E402
from composable_kv.kernels.page_score import triton as score_tk  # noqa: E402
from composable_kv.kernels.page_select import reference as select_ref  # noqa: E402
from composable_kv.kernels.page_select import triton as select_tk  # noqa: E402
from composable_kv.kernels.paged_decode import reference as decode_ref  # noqa: E402
from composable_kv.kernels.paged_decode import triton as decode_tk  # noqa: E402
from composable_kv.stages import StopRule  # noqa: E402

from kernel_checks import check_select, check_tail, close  # noqa: E402

pytestmark = pytest.mark.interpret
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# CI: 20 fixed examples per test; CKV_PROP_EXAMPLES=500 hunts with fresh random examples
_HUNT = int(os.environ.get("CKV_PROP_EXAMPLES", "0"))
PROPS = settings(max_examples=_HUNT or 20, deadline=None, derandomize=not _HUNT,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LIMIT = {torch.float16: 2.0 ** 14, torch.float32: 2.0 ** 60, torch.bfloat16: 2.0 ** 100}
TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# deltas whose delta/(1-delta) is no ratio of small token counts: all-equal logits never sit on the threshold
DELTAS = [0.013, 0.057, 0.31]


@st.composite
def batches(draw, max_len_pages=5):
    page = draw(st.sampled_from([4, 16]))
    one_len = st.one_of(st.just(1), st.sampled_from([page, 2 * page, 3 * page]),
                        st.integers(1, max_len_pages * page))
    return dict(page=page, lens=draw(st.lists(one_len, min_size=1, max_size=3)),
                hkv=draw(st.integers(1, 2)), group=draw(st.integers(1, 8)),
                head_dim=draw(st.sampled_from([16, 32])), dtype=DTYPES[draw(st.sampled_from(list(DTYPES)))],
                mode=draw(st.sampled_from(["random", "equal", "one_token", "near_limit"])),
                seed=draw(st.integers(0, 2 ** 16)))


def build(case, num_layers=1, summaries=("key_minmax", "value_norm")):
    """A cache filled per `case['mode']`, plus q [B, Hq, D]; K/V as appended (cache dtype)."""
    g = torch.Generator().manual_seed(case["seed"])
    lens, hkv, D, dtype, G = case["lens"], case["hkv"], case["head_dim"], case["dtype"], case["group"]
    B, mode = len(lens), case["mode"]
    pages = sum(-(-n // case["page"]) for n in lens) + 2
    cache = ckv.PagedKVCache(num_layers, hkv, D, pages, page_size=case["page"], dtype=dtype, device=DEV,
                             summaries=frozenset(summaries))
    q = torch.randn(B, hkv * G, D, generator=g)
    u = torch.nn.functional.normalize(torch.randn(hkv, D, generator=g), dim=-1)
    if mode == "one_token":
        q = 4 * u.repeat_interleave(G, 0)[None] + 0.1 * q
    elif mode == "near_limit":
        q = torch.randint(-2, 3, q.shape, generator=g).float()
    ids = []
    for n in lens:
        shape = (num_layers, n, hkv, D)
        if mode == "equal":
            k = torch.randn(num_layers, 1, hkv, D, generator=g).expand(shape).clone()
        elif mode == "one_token":
            k = 0.1 * torch.randn(shape, generator=g)
            k[:, int(torch.randint(0, n, (1,), generator=g))] = 8 * math.sqrt(D) * u
        elif mode == "near_limit":
            k = LIMIT[dtype] * torch.randint(-1, 2, shape, generator=g).float()
        else:
            k = torch.randn(shape, generator=g)
        v = torch.randn(shape, generator=g)
        sid = cache.add_sequence()
        cache.append([sid], [n], k.to(dtype).to(DEV), v.to(dtype).to(DEV))
        ids.append(sid)
    # the interpreter stores bf16 as raw uint16 and cannot tl.dot it: bf16 caches get an fp32 q here
    # (the fp32-dot path); bf16 x bf16 dots run in tests/test_kernels_gpu.py
    q_dtype = torch.float32 if dtype == torch.bfloat16 and DEV == "cpu" else dtype
    return cache, ids, q.to(q_dtype).to(DEV)


def ordered_pages(cache, ids, q, budget, num_splits):
    """Quest-ordered page lists as the pipeline builds them: (order, count, tail, bounds)."""
    table, seq_lens = cache.padded_page_table(ids)
    S = cache.page_size
    num_pages = (seq_lens + S - 1) // S
    sm = q.shape[-1] ** -0.5
    bound = score_ref.quest_scores(q, cache.key_min[0], cache.key_max[0], table, num_pages, sm)
    P = table.shape[1]
    valid = (torch.arange(P)[None, None] < num_pages[:, None, None]).expand_as(bound)
    forced = valid & (torch.arange(P)[None, None] == (num_pages - 1)[:, None, None])
    order, count = select_ref.select_pages(bound, forced, valid, budget)
    tok = select_ref.page_token_counts(order, seq_lens, S)
    tail = select_ref.strided_tail_lse(bound.gather(-1, order.long().clamp(min=0)), tok, count, num_splits)
    return table, seq_lens, order, count, tail, sm


def listed_value_norm_max(cache, table, seq_lens, order, count):
    """max ||v|| over the tokens of every listed page, per query head's KV head: [B, Hkv]."""
    vn = cache.value_norm[0].float()  # [pages, Hkv]
    B, H, N = order.shape
    phys = table.long().gather(1, order.long().clamp(min=0).flatten(1)).view(B, H, N)
    per = vn[phys, torch.arange(H)[None, :, None]]  # [B, Hkv, N]
    live = torch.arange(N)[None, None] < count[..., None]
    return per.masked_fill(~live, 0.0).amax(-1)


def assert_certified_bound(o_full, res, vmax, delta, group, slack):
    """||o - o_S|| <= tau * (max||v|| + ||o_S||) with tau = tau_bound <= delta."""
    o_s = res.out.float().cpu()
    err = (o_full - o_s).norm(dim=-1)  # [B, Hq]
    scale = vmax.repeat_interleave(group, 1) + o_s.norm(dim=-1)
    tau = res.tau_bound.float().cpu()
    assert bool((tau <= delta * (1 + 1e-5) + 1e-7).all()), tau
    bad = err > tau * scale + slack * (1 + scale)
    assert not bool(bad.any()), (err[bad], (tau * scale)[bad])


@PROPS
@given(batches())
def test_page_scores_match_reference_and_bound_every_logit(case):
    cache, ids, q = build(case)
    table, seq_lens = cache.padded_page_table(ids)
    num_pages = (seq_lens + case["page"] - 1) // case["page"]
    sm = case["head_dim"] ** -0.5
    tol = TOL[case["dtype"]]
    box_r = score_ref.quest_scores(q, cache.key_min[0], cache.key_max[0], table, num_pages, sm)
    box_t = score_tk.quest_scores(q, cache.key_min[0], cache.key_max[0], table, num_pages, sm)
    ex_r = score_ref.exact_page_max_scores(q, cache.k[0], table, seq_lens, sm)
    ex_t = score_tk.exact_page_max_scores(q, cache.k[0], table, seq_lens, sm)
    for a, b in ((box_r, box_t), (ex_r, ex_t)):
        mag = float(a[torch.isfinite(a)].abs().max())
        close(a / max(mag, 1.0), b.cpu() / max(mag, 1.0), tol)
    fin = torch.isfinite(ex_r)
    assert torch.equal(fin, torch.isfinite(box_r))
    # the box bound is an upper bound on the exact page max (fp32 sums: relative rounding slack)
    assert bool((box_t.cpu()[fin] >= ex_r[fin] - 1e-5 * (1 + ex_r[fin].abs())).all())


@PROPS
@given(B=st.integers(1, 3), H=st.integers(1, 3), P=st.integers(1, 40),
       budget=st.one_of(st.sampled_from([None, 0, 1, 1000]), st.integers(0, 40)),
       ties=st.booleans(), n_forced=st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_select_pages_match_reference(B, H, P, budget, ties, n_forced, seed):
    order, count, key, lens = check_select(B, H, P, budget, device=DEV, ties=ties, seed=seed, n_forced=n_forced)
    valid = torch.arange(P)[None, None] < lens[:, None, None]
    assert bool((count <= valid.sum(-1)).all())
    if budget is not None:  # past the budget only forced pages (at most n_forced of them)
        assert bool((count <= max(budget, n_forced)).all())
    listed = order >= 0
    assert torch.equal(listed.sum(-1).to(torch.int32), count)
    assert bool((order.gather(-1, (count[..., None] - 1).clamp(min=0).long()) < lens[:, None, None]).all())


@PROPS
@given(B=st.integers(1, 3), H=st.integers(1, 2), P=st.integers(1, 40), num_splits=st.integers(1, 6),
       seed=st.integers(0, 2 ** 16))
def test_strided_tail_lse_matches_reference(B, H, P, num_splits, seed):
    check_tail(B, H, P, num_splits, device=DEV, seed=seed)


@PROPS
@given(case=batches(), rule=st.sampled_from(["none", "stability", "certified"]), delta=st.sampled_from(DELTAS),
       chunk=st.sampled_from([1, 2, 4]), budget=st.sampled_from([None, 0, 1, 2, 1000]),
       num_splits=st.integers(1, 3))
def test_decode_matches_reference_and_certified_bound_holds(case, rule, delta, chunk, budget, num_splits):
    cache, ids, q = build(case)
    table, seq_lens, order, count, tail, sm = ordered_pages(cache, ids, q, budget, num_splits)
    stop = {"none": StopRule(), "stability": StopRule(kind="stability", chunk_pages=chunk, scale_tol=1e-2,
                                                      direction_tol=1e-3, patience=2),
            "certified": StopRule(kind="certified", chunk_pages=chunk, delta=delta)}[rule]
    args = (q, cache.k[0], cache.v[0], table, seq_lens, order, count)
    ref = decode_ref.paged_decode(*args, sm_scale=sm, rule=stop, tail_lse=tail, num_splits=num_splits)
    tri = decode_tk.paged_decode(*args, sm_scale=sm, rule=stop, tail_lse=tail, num_splits=num_splits)
    assert bool(torch.isfinite(tri.out).all()), "non-finite decode output"
    assert bool((tri.pages_read.cpu() <= count).all())
    tol = TOL[case["dtype"]]
    if rule == "none" or torch.equal(ref.pages_read, tri.pages_read.cpu()):
        assert torch.equal(ref.pages_read, tri.pages_read.cpu()), (ref.pages_read, tri.pages_read)
        close(ref.out, tri.out, tol)
    if rule == "certified":
        full = decode_ref.paged_decode(*args, sm_scale=sm, rule=StopRule(), num_splits=1).out
        vmax = listed_value_norm_max(cache, table, seq_lens, order, count)
        slack = 1e-4 if case["dtype"] == torch.float32 else 4 * tol
        for res in (ref, tri):
            assert_certified_bound(full, res, vmax, delta, case["group"], slack)


STACKS = {
    "quest_art": lambda b, d: [{"stage": "quest", "budget_tokens": b},
                               {"stage": "art", "stop": "certified", "delta": d, "chunk_pages": 1}],
    "sink_window_quest_art": lambda b, d: [{"stage": "sink_window", "sink_tokens": 4, "window_tokens": 8},
                                           {"stage": "quest", "budget_tokens": b},
                                           {"stage": "art", "stop": "certified", "delta": d, "chunk_pages": 2}],
    "topk_attend": lambda b, d: [{"stage": "topk", "budget_tokens": b}, {"stage": "attend"}],
    "quest_attend": lambda b, d: [{"stage": "quest", "budget_tokens": b}, {"stage": "attend"}],
    "art_box": lambda b, d: [{"stage": "art", "stop": "certified", "delta": d, "chunk_pages": 1}],
}


def _fused_case(case, stack, budget, delta, num_splits):
    test_fused_pipeline_matches_reference.hypothesis.inner_test(case, stack, budget, delta, num_splits)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["near_limit", "equal"])
def test_fused_pipeline_extremes(dtype, mode):
    """Keys at the dtype's limit / all-equal logits, every dtype, through quest + certified ART."""
    case = dict(page=4, lens=[1, 16, 37], hkv=2, group=5, head_dim=16, dtype=DTYPES[dtype], mode=mode, seed=3)
    _fused_case(case, "sink_window_quest_art", 16, DELTAS[2], 2)


@PROPS
@given(case=batches(max_len_pages=4), stack=st.sampled_from(sorted(STACKS)),
       budget=st.sampled_from([0, 1, 4, 16, 33, 10 ** 6]), delta=st.sampled_from(DELTAS),
       num_splits=st.integers(1, 3))
def test_fused_pipeline_matches_reference(case, stack, budget, delta, num_splits):
    """score_select + decode (+ merge) == the generic reference path; certified bound vs the kept pages."""
    policy = {"name": "p", "page_size": case["page"], "dense_layers": [], "stages": STACKS[stack](budget, delta)}
    ref, tri = ckv.compile(policy, backend="reference"), ckv.compile(policy, backend="triton")
    cache, ids, q = build(case)
    tri_plan = tri.plan(cache, ids, num_splits=num_splits)
    ref.plan(cache, ids, num_splits=tri_plan.num_splits)
    a, b = ref.run(q, cache, 0), tri.run(q, cache, 0)
    assert b.out.dtype == q.dtype and bool(torch.isfinite(b.out.float()).all())
    same_pages = torch.equal(a.pages_read, b.pages_read.cpu())
    if STACKS[stack](0, 0)[-1]["stage"] == "attend":
        assert same_pages, (a.pages_read, b.pages_read)
    if same_pages:
        close(a.out, b.out, TOL[case["dtype"]])
    if a.tau_bound is not None:
        attend = dict(policy, stages=policy["stages"][:-1] + [{"stage": "attend"}])
        full_pipe = ckv.compile(attend, backend="reference")
        full_pipe.plan(cache, ids, num_splits=1)
        full = full_pipe.run(q.float(), _as_float(cache), 0).out.float()
        vmax = torch.stack([cache.value_norm[0][cache.pages(s)].float().amax(0) for s in ids])  # [B, Hkv]
        slack = 1e-4 if case["dtype"] == torch.float32 else 4 * TOL[case["dtype"]]
        for res in (a, b):
            assert_certified_bound(full, res, vmax, delta, case["group"], slack)


def _as_float(cache):
    import copy
    c = copy.copy(cache)
    c.dtype = torch.float32
    for name in ("k", "v", "key_min", "key_max", "value_norm"):
        val = getattr(cache, name)
        if val is not None:
            setattr(c, name, [t.float() for t in val])
    return c


def test_empty_request_reads_nothing_and_returns_zeros():
    """A request admitted but not yet appended (length 0) sits in a batch: no pages, zero output."""
    policy = {"page_size": 16, "stages": STACKS["quest_art"](32, 0.05)}
    cache, ids, q = build(dict(page=16, lens=[17], hkv=2, group=2, head_dim=16, dtype=torch.float32,
                               mode="random", seed=1))
    empty = cache.add_sequence()
    q = torch.cat([q, q])
    for backend in ("reference", "triton"):
        pipe = ckv.compile(policy, backend=backend)
        pipe.plan(cache, ids + [empty], num_splits=2)
        res = pipe.run(q, cache, 0)
        assert res.pages_read[1].tolist() == [0, 0] and bool((res.out[1] == 0).all())
        assert bool(torch.isfinite(res.out).all())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_certified_stop_fires_and_its_bound_holds(dtype, num_splits):
    """Mass on one token: the certified stop ends the read early, and the bound holds where it does."""
    case = dict(page=4, lens=[64, 37, 80], hkv=2, group=3, head_dim=16, dtype=DTYPES[dtype], mode="one_token",
                seed=5)
    cache, ids, q = build(case)
    table, seq_lens, order, count, tail, sm = ordered_pages(cache, ids, q, None, num_splits)
    rule = StopRule(kind="certified", chunk_pages=1, delta=DELTAS[1])
    args = (q, cache.k[0], cache.v[0], table, seq_lens, order, count)
    full = decode_ref.paged_decode(*args, sm_scale=sm, rule=StopRule()).out
    vmax = listed_value_norm_max(cache, table, seq_lens, order, count)
    for decode in (decode_ref.paged_decode, decode_tk.paged_decode):
        res = decode(*args, sm_scale=sm, rule=rule, tail_lse=tail, num_splits=num_splits)
        assert bool((res.pages_read.cpu() < count).all()), (res.pages_read, count)
        assert_certified_bound(full, res, vmax, DELTAS[1], case["group"], 1e-4 if dtype == "float32" else 2e-2)
