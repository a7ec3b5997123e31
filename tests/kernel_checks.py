"""Triton kernels against their references; shared by the interpret (CPU) and gpu test modules."""
import math

import torch

import composable_kv as ckv
from composable_kv.kernels.page_score import reference as score_ref
from composable_kv.kernels.page_score import triton as score_tk
from composable_kv.kernels.page_select import reference as select_ref
from composable_kv.kernels.page_select import triton as select_tk
from composable_kv.kernels.paged_decode import reference as decode_ref
from composable_kv.kernels.paged_decode import triton as decode_tk
from composable_kv.stages import StopRule

from helpers import build_cache

RULES = {
    "none": StopRule(),
    "stability": StopRule(kind="stability", chunk_pages=1, scale_tol=1e-2, direction_tol=1e-3, patience=2),
    "stability_paper": StopRule(kind="stability", chunk_pages=2),
    "certified": StopRule(kind="certified", chunk_pages=1, delta=0.05),
    "certified_c4": StopRule(kind="certified", chunk_pages=4, delta=0.2),
}


def make(lens, *, group, head_dim, num_kv_heads=2, dtype=torch.float32, device="cpu", seed=0, q_scale=1.0,
         page_size=16):
    cache, ids, keys, values = build_cache(lens, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                                           seed=seed, device=device, page_size=page_size)
    g = torch.Generator().manual_seed(seed + 7)
    q = (torch.randn(len(lens), num_kv_heads * group, head_dim, generator=g) * q_scale).to(dtype).to(device)
    table, seq_lens = cache.padded_page_table(ids)
    return cache, q, table, seq_lens


def same_inf(a, b):
    assert torch.equal(torch.isinf(a) & (a < 0), torch.isinf(b) & (b < 0))


def close(a, b, tol):
    a, b = a.float().cpu(), b.float().cpu()
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b)), "finite masks differ"
    torch.testing.assert_close(a[fin], b[fin], rtol=tol, atol=tol)


def random_lists(num_pages, H, P, seed=0):
    """Per (request, head): a random order of the request's pages (then -1) and a random count of them live (0 to
    all; the pages listed past count are not -1, so only count marks them): (order [B, H, P] int32, count [B, H])."""
    g = torch.Generator().manual_seed(seed)
    B = num_pages.shape[0]
    valid = torch.arange(P)[None, None] < num_pages[:, None, None]
    order = torch.rand(B, H, P, generator=g).masked_fill(~valid, 2.0).argsort(-1).int()
    count = (torch.rand(B, H, generator=g) * (num_pages[:, None] + 1)).long().clamp(max=num_pages[:, None])
    count[0, 0] = 0
    count[-1, -1] = num_pages[-1]
    order = order.masked_fill(torch.arange(P)[None, None] >= num_pages[:, None, None], -1)
    return order, count.int()


def check_scores(lens, group, head_dim, *, dtype=torch.float32, device="cpu", q_scale=1.0, tol=1e-4):
    cache, q, table, seq_lens = make(lens, group=group, head_dim=head_dim, dtype=dtype, device=device,
                                     q_scale=q_scale)
    S = cache.page_size
    num_pages = (seq_lens + S - 1) // S
    sm = head_dim ** -0.5
    a = score_ref.quest_scores(q, cache.key_min[0], cache.key_max[0], table, num_pages, sm)
    b = score_tk.quest_scores(q, cache.key_min[0], cache.key_max[0], table, num_pages, sm)
    close(a, b, tol * max(1.0, q_scale))
    order, count = random_lists(num_pages.cpu(), cache.num_kv_heads, table.shape[1])
    a = score_ref.quest_scores_listed(q, cache.key_min[0], cache.key_max[0], table, num_pages, order.to(device),
                                      count.to(device), sm)
    b = score_tk.quest_scores_listed(q, cache.key_min[0], cache.key_max[0], table, num_pages, order.to(device),
                                     count.to(device), sm)
    close(a, b, tol * max(1.0, q_scale))
    assert torch.isinf(b.cpu()).eq(torch.arange(order.shape[-1]) >= count[..., None]).all()
    a = score_ref.exact_page_max_scores(q, cache.k[0], table, seq_lens, sm)
    b = score_tk.exact_page_max_scores(q, cache.k[0], table, seq_lens, sm)
    close(a, b, tol * max(1.0, q_scale))


def check_select(B, H, P, budget, *, device="cpu", seed=0, ties=False, n_forced=2):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(B, H, P, generator=g)
    if ties:
        key = (key * 2).round() / 2  # many exact ties: lower position first
    lens = torch.randint(1, P + 1, (B,), generator=g)
    valid = torch.arange(P)[None, None] < lens[:, None, None]
    key = key.masked_fill(~valid, float("-inf"))
    forced = torch.zeros(B, H, P, dtype=torch.bool)
    forced.scatter_(-1, torch.randint(0, P, (B, H, n_forced), generator=g), True)
    forced &= valid
    cand = valid & (torch.rand(B, H, P, generator=g) < 0.9)
    args = [t.to(device) for t in (key, forced, cand)]
    if budget == "per_request":  # a budget per request, broadcast over the KV heads (snapkv's)
        budget = torch.randint(0, P, (B, 1, 1), generator=g)
    o1, c1 = select_ref.select_pages(*[t.cpu() for t in args], budget)
    o2, c2 = select_tk.select_pages(*args, budget.to(device) if isinstance(budget, torch.Tensor) else budget)
    assert torch.equal(c1, c2.cpu()), (c1, c2)
    assert torch.equal(o1, o2.cpu()), (o1, o2)
    return o1, c1, key, lens


def check_narrow(B, H, P, budget, *, device="cpu", seed=0, shared=False):
    """narrow_pages, kernel against reference: raw scores, forced pages and candidates past each request's pages
    (out of play there), forced and candidates broadcast over the heads when shared (SelectionState's layout)."""
    g = torch.Generator().manual_seed(seed)
    key = (torch.randn(B, H, P, generator=g) * 2).round() / 2  # ties: lower position first
    num_pages = torch.randint(1, P + 1, (B,), generator=g).to(torch.int32)
    forced = torch.rand(B, 1 if shared else H, P, generator=g) < 0.08
    cand = torch.rand(B, 1 if shared else H, P, generator=g) < 0.9
    forced, cand = (m.expand(B, H, P) for m in (forced, cand))
    want = select_ref.narrow_pages(key, forced, cand, num_pages, budget)
    got = select_tk.narrow_pages(*(t.to(device) for t in (key, forced, cand, num_pages)), budget)
    for name, w, x in zip(("order", "count", "kept"), want, got):
        assert torch.equal(w, x.cpu()), name
    valid = torch.arange(P)[None, None] < num_pages[:, None, None]
    assert not (want[2] & ~valid).any() and torch.equal(want[2].sum(-1).int(), want[1])
    return want


def check_tail(B, H, P, num_splits, *, device="cpu", seed=0, budget=None, chunk_rows=128, no_bound=False):
    o, c, key, lens = check_select(B, H, P, budget, device=device, seed=seed)
    bounds = key.gather(-1, o.long().clamp(min=0)) * 3.0
    if no_bound:  # a scorer that covered every page unscored: +inf bounds (the stop never fires)
        bounds[0] = float("inf")
    tok = select_ref.page_token_counts(o, lens * 16 - 5, 16)  # the last page holds 11 tokens; -1 pads hold none
    tok_k = select_tk.page_token_counts(o.to(device), (lens * 16 - 5).to(device), 16)
    assert tok_k.dtype == torch.int32 and torch.equal(tok_k.cpu().long(), tok)
    assert torch.equal(tok == 0, o < 0) and (budget is not None or (tok == 11).any())
    t1 = select_ref.strided_tail_lse(bounds, tok, c, num_splits)
    t2 = select_tk.strided_tail_lse(bounds.to(device), tok_k, c.to(device), num_splits, chunk_rows)
    close(t1, t2, 1e-5)
    assert torch.equal(torch.isinf(t1), torch.isinf(t2.cpu()))


def decode_inputs(lens, group, head_dim, budget, *, device="cpu", dtype=torch.float32, q_scale=1.0, seed=0,
                  num_splits=1):
    cache, q, table, seq_lens = make(lens, group=group, head_dim=head_dim, device=device, dtype=dtype,
                                     q_scale=q_scale, seed=seed)
    S = cache.page_size
    num_pages = (seq_lens + S - 1) // S
    sm = head_dim ** -0.5
    bound = score_ref.quest_scores(q.cpu(), cache.key_min[0].cpu(), cache.key_max[0].cpu(), table.cpu(),
                                   num_pages.cpu(), sm)
    P = table.shape[1]
    valid = torch.arange(P)[None, None] < num_pages.cpu()[:, None, None]
    valid = valid.expand_as(bound)
    forced = valid & (torch.arange(P)[None, None] == (num_pages.cpu() - 1)[:, None, None])
    order, count = select_ref.select_pages(bound, forced, valid, budget)
    tok = select_ref.page_token_counts(order, seq_lens.cpu(), S)
    tail = select_ref.strided_tail_lse(bound.gather(-1, order.long().clamp(min=0)), tok, count, num_splits)
    return cache, q, table, seq_lens, order, count, tail, sm


def check_decode(lens, group, head_dim, rule_name, num_splits, budget=None, *, device="cpu",
                 dtype=torch.float32, q_scale=1.0, seed=0, tol=2e-4, strict_pages=True):
    cache, q, table, seq_lens, order, count, tail, sm = decode_inputs(
        lens, group, head_dim, budget, device=device, dtype=dtype, q_scale=q_scale, seed=seed,
        num_splits=num_splits)
    rule = RULES[rule_name]
    r1 = decode_ref.paged_decode(q.cpu(), cache.k[0].cpu(), cache.v[0].cpu(), table.cpu(), seq_lens.cpu(), order,
                                 count, sm_scale=sm, rule=rule, tail_lse=tail, num_splits=num_splits)
    r2 = decode_tk.paged_decode(q, cache.k[0], cache.v[0], table, seq_lens, order.to(device), count.to(device),
                                sm_scale=sm, rule=rule, tail_lse=tail.to(device), num_splits=num_splits)
    assert r2.out.dtype == torch.float32 and r2.pages_read.dtype == torch.int32
    if strict_pages:
        assert torch.equal(r1.pages_read, r2.pages_read.cpu()), (r1.pages_read, r2.pages_read)
    if torch.equal(r1.pages_read, r2.pages_read.cpu()):
        close(r1.out, r2.out, tol)
        if rule.kind == "certified":
            close(r1.tau_bound, r2.tau_bound, tol)
    else:
        assert r2.tau_bound is None or bool(torch.isfinite(r2.tau_bound).all())
    return r1, r2


def check_pipeline(policy, lens, *, group=2, head_dim=64, num_layers=3, num_splits=None, device="cpu",
                   dtype=torch.float32, q_scale=1.0, seed=0, tol=2e-4):
    """Fused Triton path == generic reference path, every layer (dense layers included)."""
    ref = ckv.compile(policy, backend="reference")
    if ref.admission is not None:  # an admission stack: check its read path (policies/write_gate/admission.py)
        from composable_kv.policies.write_gate.admission import GatedPipeline
        policy = GatedPipeline(ref).sparse.config
        ref = ckv.compile(policy, backend="reference")
    tri = ckv.compile(policy, backend="triton")
    need = ref.required_summaries | frozenset({"key_minmax", "value_norm"})
    cache, ids, _, _ = build_cache(lens, num_layers=num_layers, head_dim=head_dim, summaries=need, dtype=dtype,
                                   seed=seed, device=device, page_size=ref.page_size)
    g = torch.Generator().manual_seed(seed + 3)
    q = (torch.randn(len(lens), cache.num_kv_heads * group, head_dim, generator=g) * q_scale).to(dtype)
    plan_t = tri.plan(cache, ids, num_splits=num_splits)
    ref.plan(_cpu_cache(cache) if device != "cpu" else cache, ids, num_splits=plan_t.num_splits)
    rc = _cpu_cache(cache) if device != "cpu" else cache
    for layer in range(num_layers):
        a = ref.run(q, rc, layer)
        b = tri.run(q.to(device), cache, layer)
        assert b.out.dtype == q.dtype
        assert torch.equal(a.pages_read, b.pages_read.cpu()), (layer, a.pages_read, b.pages_read)
        close(a.out, b.out, tol)
        assert (a.tau_bound is None) == (b.tau_bound is None)
        if a.tau_bound is not None:
            close(a.tau_bound, b.tau_bound, tol)
    return ref, tri


def _cpu_cache(cache):
    import copy
    c = copy.copy(cache)
    c.device = torch.device("cpu")
    for name in ("k", "v", "key_min", "key_max", "value_norm"):
        val = getattr(cache, name)
        if val is not None:
            setattr(c, name, [t.cpu() for t in val])
    for name in ("shadow_codes", "shadow_step"):
        setattr(c, name, {bits: [t.cpu() for t in ts] for bits, ts in getattr(cache, name, {}).items()})
    return c


def check_score_splits(lens, group, head_dim, score, splits, *, budget=5, certified=False, num_splits=1,
                       dtype=torch.float32, device="cpu", block_s=None):
    """score_select with the pages scored in `splits` slices (the last slice to arrive selects) == one
    program per row, exactly; and the arrival counters are back at zero for the next launch."""
    cache, q, table, seq_lens = make(lens, group=group, head_dim=head_dim, dtype=dtype, device=device)
    forced = torch.zeros_like(table, dtype=torch.bool)
    n_pages = (seq_lens + cache.page_size - 1) // cache.page_size
    forced[torch.arange(len(lens)), (n_pages - 1).long()] = True
    a, b = (cache.key_min[0], cache.key_max[0]) if score == 1 else (cache.k[0], cache.k[0])
    kw = dict(num_kv_heads=cache.num_kv_heads, page_size=cache.page_size, sm_scale=head_dim ** -0.5, score=score,
              select=budget is not None, budget_pages=budget or 0, forced_only=False, certified=certified,
              num_splits=num_splits, max_kept=budget or table.shape[1], block_s=block_s)
    from unittest import mock
    empty = torch.empty

    def poisoned(*args, **kwargs):  # a slice that selects before the others scored would read this garbage
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    with mock.patch.object(torch, "empty", poisoned):
        many = select_tk.score_select(q, a, b, table, seq_lens, forced, score_splits=splits, **kw)
    one = select_tk.score_select(q, a, b, table, seq_lens, forced, score_splits=1, **kw)
    assert torch.equal(one[1], many[1]), (one[1], many[1])
    assert torch.equal(one[0], many[0])
    if certified:
        assert torch.equal(one[2], many[2])
    assert all(int(buf.abs().sum()) == 0 for buf in select_tk._ARRIVALS.values())
    return one
