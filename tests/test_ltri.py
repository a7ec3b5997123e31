"""Ltri-LLM span retrieval: boundaries (triangle score + NMS), the span-score kernel, the stage."""
import os

import pytest
import torch

import composable_kv as ckv
from composable_kv.policies.ltri import spans as sp
from composable_kv.kernels.span_score import reference as span_ref

from helpers import build_cache, dense_attention

P_PLANTED = [3, 9, 14, 22, 27]  # span starts (pages) after the sink page; last page 32


def block_map(starts, P, *, noise=0.0, seed=0):
    """A row-stochastic page attention map: each row attends uniformly to the earlier pages of its span."""
    g = torch.Generator().manual_seed(seed)
    span = torch.zeros(P, dtype=torch.long)
    for s in starts:
        span[s:] += 1
    same = (span[:, None] == span[None, :]) & torch.ones(P, P, dtype=torch.bool).tril()
    a = same.float() + noise * torch.rand(P, P, generator=g).tril()
    return a / a.sum(-1, keepdim=True)


def planted_qk(starts, P, *, page_size=16, heads=2, kv_heads=1, D=32, seed=0):
    """q, k whose tokens carry their span's topic vector: attention is block diagonal by span."""
    g = torch.Generator().manual_seed(seed)
    span = torch.zeros(P * page_size, dtype=torch.long)
    for s in starts:
        span[s * page_size:] += 1
    topics = torch.randn(len(starts) + 1, D, generator=g) * 3
    k = topics[span][None].repeat(kv_heads, 1, 1) + 0.3 * torch.randn(kv_heads, P * page_size, D, generator=g)
    q = topics[span][None].repeat(heads, 1, 1) + 0.3 * torch.randn(heads, P * page_size, D, generator=g)
    return q, k


@pytest.mark.cpu
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_triangle_nms_finds_planted_boundaries(noise):
    P = 32
    a = block_map([0] + P_PLANTED, P, noise=noise)
    tri = sp.triangle_scores(a, window=3)
    tri[:2] = float("-inf")  # the sink page and the first span start are not boundaries
    assert sp.nms_1d(tri, radius=2, min_score=0.0).nonzero().flatten().tolist() == P_PLANTED


@pytest.mark.cpu
def test_triangle_inside_a_span_scores_below_its_start():
    a = block_map([0, 10], 20)
    tri = sp.triangle_scores(a, window=4)
    assert tri[10] == pytest.approx(1.0)
    assert (tri[11:20] < tri[10] - 0.1).all()


@pytest.mark.cpu
def test_build_index_from_planted_queries_and_keys():
    P = 32
    q, k = planted_qk([0] + P_PLANTED, P, heads=4, kv_heads=2)
    idx = sp.build_index(q, k, page_size=16, sink_pages=1, end_page=P, covered=P, reps_per_span=3, window=3,
                         nms_radius=2,
                         min_score=0.0, max_span_pages=64, obs_queries=16, sm_scale=32 ** -0.5,
                         dtype=torch.float32)
    assert idx.starts.tolist() == [1] + P_PLANTED
    assert idx.ends.tolist() == P_PLANTED + [P]
    assert int(idx.num_spans) == len(P_PLANTED) + 1 and idx.reps.shape == (2, P - 1, 3, 32)  # room: P - 1 spans
    assert idx.covered == P
    # the keys-only proxy (no queries) finds them too: keys carry the same topics
    idx2 = sp.build_index(None, k, page_size=16, sink_pages=1, end_page=P, covered=P, reps_per_span=2, window=3,
                          nms_radius=2, min_score=0.0, max_span_pages=64, obs_queries=0, sm_scale=32 ** -0.5,
                          dtype=torch.float32)
    assert idx2.starts.tolist() == [1] + P_PLANTED


@pytest.mark.cpu
def test_nms_radius_and_threshold():
    s = torch.tensor([0.0, 0.9, 0.8, 0.1, 0.95, -0.2, 0.3, 0.31])
    kept = lambda r, m: sp.nms_1d(s, radius=r, min_score=m).nonzero().flatten().tolist()  # noqa: E731
    assert kept(1, 0.0) == [1, 4, 7]
    assert kept(3, 0.0) == [4]  # 0.95 suppresses 1 and 7
    assert kept(1, 0.5) == [1, 4]


@pytest.mark.cpu
def test_spans_tile_and_split():
    b = torch.zeros(41, dtype=torch.bool)
    b[[5, 30]] = True
    ids, num = sp.span_ids(b, 1, 40, max_pages=8)
    starts, ends = sp.span_bounds(ids, int(num))
    assert starts[0] == 1 and ends[-1] == 40 and torch.equal(starts[1:], ends[:-1])
    assert int((ends - starts).max()) <= 8
    assert {5, 30} <= set(starts.tolist())
    assert ids[0] == -1 and ids[40] == -1  # the sink page and pages past the end are in no span


@pytest.mark.cpu
def test_reps_by_attention_picks_the_most_attended_keys_and_pads():
    k = torch.randn(2, 48, 8)
    got = torch.rand(2, 48)
    got[0, 20], got[1, 3] = 10.0, 10.0
    ids = torch.tensor([0, 1, 1])  # span 0: page 0, span 1: pages 1-2
    reps = sp.reps_by_attention(k, got, ids, 3, 16, R=20)
    assert reps.shape == (2, 3, 20, 8)
    assert torch.equal(reps[0, 1, 0], k[0, 20]) and torch.equal(reps[1, 0, 0], k[1, 3])
    assert torch.equal(reps[0, 0, 16:], reps[0, 0, :1].expand(4, 8))  # 16 tokens, R=20: best key repeats
    assert (reps[:, 2] == 0).all()  # span id 2 has no page: padding


@pytest.mark.cpu
def test_kmeans_reps_separate_two_clusters():
    k = torch.cat([torch.full((1, 8, 4), 5.0), torch.full((1, 8, 4), -5.0)], 1) + 0.01 * torch.randn(1, 16, 4)
    reps = sp.reps_by_kmeans(k, torch.tensor([0]), 1, 16, R=2)
    assert sorted(reps[0, 0, :, 0].round().tolist()) == [-5.0, 5.0]


# -- the span-score kernel --------------------------------------------------------------------------

def _span_inputs(group, head_dim, R, num_spans, *, dtype=torch.float32, q_scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    B, Hkv = len(num_spans), 2
    NS = max(max(num_spans), 1)
    q = (torch.randn(B, Hkv * group, head_dim, generator=g) * q_scale).to(dtype)
    reps = torch.randn(B, Hkv, NS, R, head_dim, generator=g).to(dtype)
    return q.to(device), reps.to(device), torch.tensor(num_spans, dtype=torch.int32, device=device)


def check_span_scores(group, head_dim, R, num_spans, *, dtype=torch.float32, q_scale=1.0, device="cpu", tol=1e-4,
                      int8=False, **tuning):
    """int8: the reps quantized (span_ref.quantize_reps), read with their scales; the kernel quantizes q itself with
    the GPU's fast division, so a q coordinate at a rounding midpoint may land one step off the reference's: at most
    1% of the scores may be off by more than tol, none by more than two such steps."""
    from composable_kv.kernels.span_score import triton as span_tk
    q, reps, ns = _span_inputs(group, head_dim, R, num_spans, dtype=dtype, q_scale=q_scale, device=device)
    sm = head_dim ** -0.5
    scales = None
    if int8:
        reps, scales = span_ref.quantize_reps(reps)
    a = span_ref.span_scores(q.cpu(), reps.cpu(), ns.cpu(), sm, scales=None if scales is None else scales.cpu())
    b = span_tk.span_scores(q, reps, ns, sm, scales=scales, **tuning).cpu()
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b)), "finite masks differ"
    assert (a[~fin] < 0).all() and (b[~fin] < 0).all()
    if not int8:
        torch.testing.assert_close(b[fin], a[fin], rtol=tol, atol=tol * max(1.0, q_scale))
        return
    err, bound = (b[fin] - a[fin]).abs(), tol * (a[fin].abs() + max(1.0, q_scale))
    step = sm * (q.float().abs().amax() / 127) * (reps.float() * scales[..., None]).abs().amax()  # one q step
    assert (err > bound).float().mean() <= 0.01 and (err <= bound + 2 * step.cpu()).all(), (err - bound).max()


@pytest.mark.cpu
def test_span_reference_is_max_over_reps():
    q, reps, ns = _span_inputs(3, 16, 4, [5, 2])
    s = span_ref.span_scores(q, reps, ns, 0.5)
    b, hq, j = 0, 4, 3
    want = max(float(q[b, hq] @ reps[b, hq // 3, j, r]) for r in range(4)) * 0.5
    assert s[b, hq, j].item() == pytest.approx(want, rel=1e-5)
    assert torch.isinf(s[1, :, 2:]).all() and torch.isfinite(s[1, :, :2]).all()


needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="no CUDA and TRITON_INTERPRET is not set")


@pytest.mark.interpret
@needs_kernels
@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("group", [1, 2, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("R", [1, 3, 4])
def test_span_kernel_matches_reference(group, head_dim, R):
    check_span_scores(group, head_dim, R, [0, 1, 5, 37])  # ragged, incl. a request with no span


@pytest.mark.interpret
@needs_kernels
@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("group,head_dim,R,programs", [(4, 128, 4, None), (3, 64, 3, 2), (2, 16, 2, None)])
def test_span_kernel_int8_reps_match_reference(group, head_dim, R, programs):
    check_span_scores(group, head_dim, R, [0, 2, 9, 40], int8=True, programs=programs)


@pytest.mark.cpu
def test_int8_reps_round_trip_and_score_close_to_the_keys():
    """quantize_reps: error <= scale / 2 a coordinate (a zero key stays zero, scale 1); scores from int8 keys equal
    the reference on the dequantized keys and the dequantized int8 q, and sit within 2% of the score range of the
    original keys' and q's scores."""
    q, reps, ns = _span_inputs(4, 64, 4, [7, 3])
    reps[0, 0, 1, 2] = 0.0
    qv, scale = span_ref.quantize_reps(reps)
    assert qv.dtype == torch.int8 and scale.shape == reps.shape[:4] and scale[0, 0, 1, 2] == 1.0
    deq = qv.float() * scale[..., None]
    assert ((deq - reps).abs() <= scale[..., None] / 2 + 1e-7).all() and qv.abs().amax(-1).max() == 127
    got = span_ref.span_scores(q, qv, ns, 0.125, scales=scale)
    q8, q_scale = span_ref.quantize_reps(q)
    torch.testing.assert_close(got, span_ref.span_scores(q8.float() * q_scale[..., None], deq, ns, 0.125), rtol=1e-5,
                               atol=1e-5)
    exact = span_ref.span_scores(q, reps, ns, 0.125)
    fin = torch.isfinite(exact)
    assert ((got[fin] - exact[fin]).abs() <= 0.02 * exact[fin].abs().amax()).all()


@pytest.mark.cpu
def test_int8_reps_without_scales_is_a_clear_error():
    from composable_kv.kernels.span_score import triton as span_tk
    from composable_kv.kernels.window_kmeans import triton as kmeans_tk
    q, reps, ns = _span_inputs(2, 16, 2, [3])
    with pytest.raises(ValueError, match="int8 reps need fp32 scales"):
        span_tk.span_scores(q, span_ref.quantize_reps(reps)[0], ns, 0.25)
    with pytest.raises(ValueError, match="int8 reps need fp32 scales"):  # scales for keys that are not int8
        span_tk.span_scores(q, reps, ns, 0.25, scales=span_ref.quantize_reps(reps)[1])
    t = sp.SpanTable(2, 2, 16, torch.float32, "cpu", int8_reps=True)
    t.ensure(1, 4)
    with pytest.raises(ValueError, match="int8 reps need an fp32 rep_scale"):
        kmeans_tk.close_windows(torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, dtype=torch.int32),
                                torch.tensor([64], dtype=torch.int32), torch.randn(4, 2, 16, 16), t.covered,
                                t.num_spans, t.span_of_page, t.reps, 2, 16)  # no rep_scale


@pytest.mark.interpret
@needs_kernels
@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("block_s,programs,num_stages", [(16, 3, 2), (32, 1, 3), (16, 2, 1)])
def test_span_kernel_programs_loop_over_blocks(block_s, programs, num_stages):
    """Fewer programs than blocks: each loops over every programs-th block."""
    check_span_scores(4, 64, 4, [0, 3, 40, 70], block_s=block_s, programs=programs, num_stages=num_stages)


@pytest.mark.interpret
@needs_kernels
@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("q_scale", [100.0, 1000.0])
def test_span_kernel_extreme_logits(q_scale):
    check_span_scores(4, 64, 2, [3, 130], q_scale=q_scale, tol=1e-4)


@pytest.mark.interpret
@needs_kernels
def test_span_kernel_half_precision():
    check_span_scores(2, 64, 4, [9, 4], dtype=torch.float16, tol=2e-2)


@pytest.mark.cpu
def test_span_table_page_capacity_has_an_eighth_of_headroom():
    """A 32k prompt's table (2,048 pages) takes the decode's next pages without reallocating, and holds at most
    1/8 more pages than asked (doubling took it to 4,096 slots: 17 GB of reps for 32 layers at B = 16)."""
    t = sp.SpanTable(2, 4, 8, torch.bfloat16, "cpu")
    t.ensure(16, 2048)
    reps = t.reps
    assert 2048 < t.reps.shape[2] <= 2048 + 256 and t.span_of_page.shape == (16, t.reps.shape[2])
    t.ensure(16, 2049)
    t.ensure(16, 2300)
    assert t.reps is reps
    t.ensure(16, 3000)
    assert 3000 <= t.reps.shape[2] <= 3000 + 375 and t.reps.shape[0] == 16


def _span_table(N, Hkv, D, R, pages, dtype, g, device, int8=False):
    """A SpanTable of N rows filled with random values (so a write to the wrong place shows)."""
    t = sp.SpanTable(Hkv, R, D, dtype, device, int8)
    t.ensure(N, pages)
    t.reps.copy_(torch.randint(-127, 128, t.reps.shape, generator=g) if int8 else
                 torch.randn(t.reps.shape, generator=g).to(dtype))
    if int8:
        t.rep_scale.copy_(torch.rand(t.rep_scale.shape, generator=g))
    t.span_of_page.copy_(torch.randint(-1, 9, t.span_of_page.shape, generator=g))
    t.num_spans.copy_(torch.randint(0, pages - 1, (N,), generator=g))
    t.covered.copy_(torch.randint(0, 4, (N,), generator=g))
    return t


def check_close_windows(monkeypatch, B, N, Hkv, D, W, R, *, steps=5, seed=0, device="cpu", dtype=torch.float32,
                        tol=1e-5, int8=False):
    """SpanTable.close_windows with the kernels (on `device`) against its torch path (CPU) over `steps` calls:
    table rows `rows` (a permutation, not arange), windows full and not, one always a token short (its last
    page partial), one row at the span capacity (slot clamp). int8: an int8 table (its keys quantized as they
    are stored; a key may land one step off where the centroid sits at a rounding midpoint). Returns the number of
    windows closed."""
    g = torch.Generator().manual_seed(seed)
    S, P = 16, 4 + W * steps  # pages a request's page table holds: covered starts below 4, one close a step
    want = _span_table(N, Hkv, D, R, P, dtype, g, "cpu", int8)
    cap = want.reps.shape[2]
    rows = torch.randperm(N, generator=g)[:B]
    assert not torch.equal(rows, torch.arange(B))
    want.num_spans[rows[-1]] = cap - 1  # its second close writes slot cap - 1 again
    got = sp.SpanTable(Hkv, R, D, dtype, device, int8)
    got.ensure(N, P)
    for name in ("reps", "span_of_page", "num_spans", "covered") + (("rep_scale",) if int8 else ()):
        getattr(got, name).copy_(getattr(want, name))
    k_pages = torch.randn(B * P + 3, Hkv, S, D, generator=g).to(dtype)  # [pages, Hkv, S, D]
    page_table = torch.randperm(B * P + 3, generator=g)[:B * P].view(B, P).to(torch.int32)
    seq_lens = (want.covered[rows] + W) * S - 1  # [B] every window a token short
    grow = torch.randint(0, 2 * W * S, (steps, B), generator=g)
    grow[:, 0] = 0
    grow[:, -1] = W * S
    cov0, closed = want.covered.clone(), 0
    for step in range(steps):
        before = want.covered.clone()
        monkeypatch.setattr(sp, "FORCE_TRITON", False)
        want.close_windows(rows, page_table, seq_lens.to(torch.int32), k_pages, W, S)
        monkeypatch.setattr(sp, "FORCE_TRITON", True)
        got.close_windows(*[a.to(device) for a in (rows, page_table, seq_lens.to(torch.int32), k_pages)], W, S)
        closed += int((want.covered - before).sum()) // W
        for name in ("span_of_page", "num_spans", "covered"):
            assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), (step, name)
        if int8:  # the keys as stored: int8 times scale
            torch.testing.assert_close(got.rep_scale.cpu(), want.rep_scale, rtol=tol, atol=tol)
            deq = lambda t: t.reps.cpu().float() * t.rep_scale.cpu()[..., None]  # noqa: E731
            assert ((deq(got) - deq(want)).abs() <= want.rep_scale[..., None] * 1.001).all(), step
            assert (got.reps.cpu().int() - want.reps.int()).abs().float().mean() < 0.01, step
        else:
            torch.testing.assert_close(got.reps.cpu(), want.reps, rtol=tol, atol=tol)
        seq_lens += grow[step]
    assert want.covered[rows[0]] == cov0[rows[0]] and want.num_spans[rows[-1]] == cap - 1 + steps - 1
    return closed


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("B,N,Hkv,D,W,R,dtype,tol", [(4, 6, 2, 64, 2, 4, torch.float32, 1e-5),
                                                     (3, 5, 1, 128, 1, 3, torch.bfloat16, 1e-2),
                                                     (3, 4, 3, 64, 4, 5, torch.float32, 1e-5)])
def test_close_windows_kernels_equal_torch(monkeypatch, B, N, Hkv, D, W, R, dtype, tol):
    assert check_close_windows(monkeypatch, B, N, Hkv, D, W, R, seed=B + D + W + R, dtype=dtype, tol=tol) >= 6


@pytest.mark.interpret
@needs_kernels
def test_close_windows_kernels_equal_torch_int8(monkeypatch):
    assert check_close_windows(monkeypatch, 4, 6, 2, 64, 2, 4, seed=11, tol=1e-5, int8=True) >= 6


def select_inputs(B, Hkv, G, P, budget, *, seed=0, rows_in_table=None):
    """Random span_select inputs: a span table of monotone span ids (sink page 0, spans of 1-3 pages, an open
    span from `covered`), rows in shuffled order, shorter requests, ties and unscored spans, forced pages
    inside spans and a few non-candidates."""
    g = torch.Generator().manual_seed(seed)
    R = rows_in_table or B + 2
    span_of_page = torch.full((R, P + 3), -1, dtype=torch.long)  # wider than P: a table's capacity
    covered = torch.zeros(R, dtype=torch.long)
    for r in range(R):
        p, sid, cov = 1, 0, int(torch.randint(max(P // 2, 2), P + 1, (1,), generator=g))
        while p < cov:
            w = min(int(torch.randint(1, 4, (1,), generator=g)), cov - p)
            span_of_page[r, p:p + w] = sid
            p, sid = p + w, sid + 1
        covered[r] = cov
    rows = torch.randperm(R, generator=g)[:B]
    NS = P
    scores = (torch.randn(B, Hkv * G, NS, generator=g) * 2).round() / 2  # ties on purpose
    n_spans = span_of_page[rows].amax(-1) + 1
    scores[torch.arange(NS)[None, None].expand_as(scores) >= n_spans[:, None, None]] = float("-inf")
    scores[torch.rand(B, Hkv * G, NS, generator=g) < 0.1] = float("-inf")  # spans a head did not score
    forced = torch.rand(B, Hkv, P, generator=g) < 0.05
    candidates = torch.rand(B, Hkv, P, generator=g) > 0.05
    num_pages = torch.randint(max(P - 4, 1), P + 1, (B,), generator=g).to(torch.int32)
    return scores, rows, span_of_page, covered, forced, candidates, num_pages, budget


def check_span_select(B, Hkv, G, P, budget, vote, *, seed=0, sink_pages=1, device="cpu", shared_state=False,
                      levels=None, **tuning):
    """The kernel against the reference; shared_state: forced and candidates broadcast over the KV heads (stride 0,
    as SelectionState holds them before a stage narrows); levels: finite scores rounded onto that many values."""
    from composable_kv.kernels.span_select import reference as sel_ref, triton as sel_tk
    args = select_inputs(B, Hkv, G, P, budget, seed=seed)
    if levels:
        s = args[0]
        args = (torch.where(torch.isfinite(s), (s.clamp(-1, 1) * (levels - 1) / 2).round(), s),) + args[1:]
    if shared_state:
        args = args[:4] + tuple(m[:, :1].expand(B, Hkv, P) for m in args[4:6]) + args[6:]
    want = sel_ref.span_select(*args, sink_pages, vote)
    rows, num_pages = args[1], args[6]
    table_spans = torch.randint(1, P + 1, (args[2].shape[0],), generator=torch.Generator().manual_seed(seed))
    record = (table_spans.to(device), torch.zeros(B, dtype=torch.long, device=device),
              torch.full((B,), -1, dtype=torch.int32, device=device))
    got = sel_tk.span_select(*(a.to(device) if torch.is_tensor(a) else a for a in args), sink_pages, vote, record,
                             **tuning)
    for name, w, x in zip(("order", "count", "kept", "forced", "order_key"), want, got):
        assert torch.equal(w, x.cpu()), (name, w, x.cpu())
    assert torch.equal(record[1].cpu(), table_spans[rows]) and torch.equal(record[2].cpu(), num_pages)  # accounting
    return want


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("vote,B,Hkv,G,P,budget", [
    ("group", 3, 2, 4, 40, 6), ("group", 2, 1, 1, 17, 1000), ("group", 2, 3, 7, 70, 25), ("group", 2, 2, 3, 33, 0),
    ("group", 2, 2, 2, 100, 3), ("layer", 3, 2, 4, 40, 25), ("layer", 2, 1, 1, 17, 3), ("layer", 2, 3, 7, 70, 1000)])
def test_span_select_kernel_matches_reference(vote, B, Hkv, G, P, budget):
    order, count, kept, forced, _ = check_span_select(B, Hkv, G, P, budget, vote, seed=B * P + budget)
    assert (count >= forced.sum(-1)).all() and (kept.sum(-1) == count).all()


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("window", [2, 4, 8])
@pytest.mark.parametrize("vote,G,P,budget", [("group", 4, 70, 12), ("group", 1, 100, 30), ("layer", 3, 60, 9),
                                              ("group", 2, 90, 0)])
@pytest.mark.parametrize("levels", [None, 1, 3])
def test_span_select_narrow_windows(window, vote, G, P, budget, levels):
    """Windows narrower than a head's spans: bisection rounds, sorted windows, and (few score levels) windows of
    tied scores wider than the window, ranked by span id; the budget's slack is small, so its bisection runs too."""
    check_span_select(2, 2, G, P, budget, vote, seed=P + window, window=window, levels=levels)


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("vote", ["group", "layer"])
def test_span_select_state_broadcast_over_heads(vote):
    check_span_select(3, 2, 4, 50, 10, vote, seed=5, shared_state=True, window=4)


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("levels", [None, 2])
def test_span_select_int64_counts(levels):
    check_span_select(2, 2, 3, 60, 9, "group", seed=7, window=2, levels=levels, wide_counts=True)


@pytest.mark.cpu
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vote", ["group", "layer"])
def test_page_keys_order_as_span_ranks(seed, vote):
    """The reference's (votes, best, page) keys select and order pages as ranking the spans by (votes, best,
    span id) and giving their pages -rank did (tests/host_seed_reference.py), when span ids increase with page
    position."""
    from composable_kv.kernels.page_select import reference as select_ref
    from composable_kv.kernels.span_select import reference as sel_ref
    from host_seed_reference import host_span_keys
    scores, rows, table, covered, forced, candidates, num_pages, budget = select_inputs(
        3, 2, 4, 60, 12 + seed * 4, seed=seed)
    order, count, kept, forced_all, _ = sel_ref.span_select(scores, rows, table, covered, forced, candidates,
                                                            num_pages, budget, 1, vote)
    valid = torch.arange(60)[None, None] < num_pages[:, None, None].long()
    keys = host_span_keys(scores, table[rows, :60], forced_all, budget, vote).masked_fill(~valid, float("-inf"))
    want = select_ref.select_pages(keys, forced_all, candidates & valid, budget)
    assert torch.equal(order, want[0]) and torch.equal(count, want[1])
    assert (keys[kept] < 1).any() and (count < valid.sum(-1)).any()  # spans were ranked; the budget binds


# -- the stage ----------------------------------------------------------------------------------------

def ltri_policy(budget=64, terminal=None, dense_layers=(), **kw):
    stage = {"stage": "ltri", "budget_tokens": budget, "sink_tokens": 16, **kw}
    return {"name": "ltri", "page_size": 16, "dense_layers": list(dense_layers),
            "stages": [stage, terminal or {"stage": "attend"}]}


def run(pol, lens, *, group=2, head_dim=32, seed=0, num_layers=1):
    pipe = ckv.compile(pol, backend="reference")
    cache, ids, keys, values = build_cache(lens, head_dim=head_dim, summaries=pipe.required_summaries, seed=seed,
                                           num_layers=num_layers, page_size=pipe.page_size)
    q = torch.randn(len(lens), cache.num_kv_heads * group, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    pipe.plan(cache, ids)
    return pipe, cache, ids, q, keys, values


@pytest.mark.cpu
@pytest.mark.parametrize("terminal", [None, {"stage": "art", "stop": "certified", "delta": 1e-30}])
@pytest.mark.parametrize("vote", ["group", "layer"])
def test_full_budget_equals_dense(terminal, vote):
    pipe, cache, ids, q, keys, values = run(ltri_policy(1 << 20, terminal, vote=vote), [1, 17, 63, 111, 300])
    res = pipe.run(q, cache, 0)
    torch.testing.assert_close(res.out, dense_attention(q, keys, values), rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
@pytest.mark.parametrize("vote", ["group", "layer"])
def test_budget_forced_pages_and_whole_spans_first(vote):
    pipe, cache, ids, q, keys, values = run(ltri_policy(96, vote=vote, max_span_pages=3), [1, 17, 63, 111, 300])
    from composable_kv.pipeline import LayerContext
    ctx = LayerContext(q, cache, 0, pipe.current_plan, q.shape[-1] ** -0.5)
    order, count, _ = pipe.select(ctx)
    st = pipe.selectors[0]
    for b, (sid, n) in enumerate(zip(ids, [1, 17, 63, 111, 300])):
        pages = -(-n // 16)
        idx = st.span_index(cache, sid, 0)
        forced = {0, *range(idx.covered, pages)}
        for h in range(2):
            got = order[b, h, :count[b, h]].tolist()
            assert count[b, h] == max(min(pages, 6), len(forced))
            assert forced <= set(got) and got[:len(forced)] == sorted(forced)  # forced read first
            span_of = {p: s for s, (a, z) in enumerate(zip(idx.starts.tolist(), idx.ends.tolist()))
                       for p in range(a, z)}
            seq = [span_of[p] for p in got[len(forced):]]
            assert all(seq[i] == seq[i + 1] or seq[i + 1] not in seq[:i + 1] for i in range(len(seq) - 1))
        if vote == "layer":
            assert torch.equal(order[b, 0], order[b, 1])


@pytest.mark.cpu
@pytest.mark.parametrize("rep_dtype", ["cache", "int8"])
def test_needle_span_is_retrieved(rep_dtype):
    """One span's keys align with the query; with room for one span, ltri reads that span (int8 keys too)."""
    pipe = ckv.compile(ltri_policy(16 * 6, max_span_pages=4, obs_queries=0, rep_dtype=rep_dtype), backend="reference")
    lens = [640]
    cache, ids, keys, values = build_cache(lens, head_dim=32, summaries=pipe.required_summaries, seed=3)
    needle = torch.randn(32) * 4
    k = cache.k[0]
    page_ids = cache.pages(ids[0])
    k[page_ids[20], :, :] += needle  # page 20 carries the needle for both KV heads
    q = needle.repeat(1, 4, 1)
    pipe.plan(cache, ids)
    from composable_kv.pipeline import LayerContext
    order, count, _ = pipe.select(LayerContext(q, cache, 0, pipe.current_plan, 32 ** -0.5))
    assert all(20 in order[0, h, :count[0, h]].tolist() for h in range(2))


@pytest.mark.cpu
def test_decode_tokens_close_spans_and_stay_forced():
    pol = ltri_policy(64, decode_span_pages=2)
    pipe = ckv.compile(pol, backend="reference")
    cache, ids, _, _ = build_cache([100], head_dim=16, summaries=pipe.required_summaries, extra_pages=8)
    st = pipe.selectors[0]
    q = torch.randn(1, 2, 16)
    covered = []
    for step in range(70):
        cache.append(ids, [1], torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16))
        pipe.plan(cache, ids)
        pipe.run(q, cache, 0)
        covered.append(st.span_index(cache, ids[0], 0).covered)
    first = 101 // 16  # pages full at first sight
    for step, c in enumerate(covered):
        full = (101 + step) // 16
        assert c == first + 2 * ((full - first) // 2)
    idx = st.span_index(cache, ids[0], 0)
    assert idx.reps.shape[1] == idx.num_spans and torch.equal(idx.starts[1:], idx.ends[:-1])


@pytest.mark.cpu
@pytest.mark.parametrize("rep_dtype,per_key", [("cache", 32 * 4), ("int8", 32 + 4)])  # D * fp32; D int8 + a scale
def test_kv_bytes_count_rep_keys(rep_dtype, per_key):
    pipe, cache, ids, q, *_ = run(ltri_policy(64, reps_per_span=3, rep_dtype=rep_dtype), [111, 300])
    res = pipe.run(q, cache, 0)
    st = pipe.selectors[0]
    spans = torch.tensor([st.span_index(cache, s, 0).num_spans for s in ids], dtype=torch.float64)
    kv = res.pages_read.sum(-1).double() * 2 * 16 * 32 * 4
    reps = spans * 2 * 3 * per_key  # Hkv * R * per key
    torch.testing.assert_close(pipe.kv_bytes_read(res, cache, 0), kv + reps)


@pytest.mark.cpu
def test_kv_bytes_do_not_depend_on_which_layer_ran_last():
    """Each layer's representative-key bytes come from its own span count: layer 0 scores, 32 tokens
    arrive, layer 1 scores (more spans); layer 0's figure is still its own, and a step's total over both
    layers is the sum of the two."""
    pipe, cache, ids, q, *_ = run(ltri_policy(64, reps_per_span=3, decode_span_pages=2), [111, 300],
                                  num_layers=2)
    st = pipe.selectors[0]
    per_span = 3 * 32 * 4  # R * D * fp32
    pipe.run(q, cache, 0)
    pages_then = pipe.current_plan.num_pages.double()
    cache.append(ids, [32, 32], torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32))
    pipe.plan(cache, ids)
    pipe.run(q, cache, 1)
    spans = [torch.tensor([st.span_index(cache, s, layer).num_spans for s in ids], dtype=torch.float64)
             for layer in (0, 1)]
    assert (spans[1] > spans[0]).all(), "layer 1 closed the new tokens' spans, layer 0 did not"
    torch.testing.assert_close(st.summary_bytes_per_page(cache, 0), spans[0] * per_span / pages_then)
    pages_now = pipe.current_plan.num_pages.double()
    torch.testing.assert_close(st.summary_bytes_per_page(cache, 1), spans[1] * per_span / pages_now)
    both = pipe.summary_bytes(cache, 0) + pipe.summary_bytes(cache, 1)
    torch.testing.assert_close(pipe.summary_bytes(cache) * 2, both)


@pytest.mark.cpu
def test_bad_vote_is_a_clear_error():
    with pytest.raises(ckv.ConfigError, match="vote"):
        ckv.compile(ltri_policy(64, vote="all"))


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("rep_dtype", ["cache", "int8"])
def test_stage_with_triton_scorer_equals_reference(monkeypatch, rep_dtype):
    from composable_kv.pipeline import LayerContext
    pipe, cache, ids, q, *_ = run(ltri_policy(64, max_span_pages=2, rep_dtype=rep_dtype), [63, 111, 300], group=4)
    ctx = LayerContext(q, cache, 0, pipe.current_plan, 32 ** -0.5)
    a = pipe.select(ctx)
    monkeypatch.setattr(sp, "FORCE_TRITON", True)
    b = pipe.select(ctx)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- the HF path (tiny random Llama) ------------------------------------------------------------------

@pytest.mark.cpu
def test_hf_prefill_builds_spans_and_decodes():
    pytest.importorskip("transformers")
    from helpers import tiny_llama
    from composable_kv import hf
    model = tiny_llama(256)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (150, 97)]
    dense = ckv.compile({"name": "d", "page_size": 16, "stages": [{"stage": "attend"}]}, backend="reference")
    full = ckv.compile(ltri_policy(1 << 20, dense_layers=[0]), backend="reference")
    small = ckv.compile(ltri_policy(48, dense_layers=[0]), backend="reference")
    with torch.no_grad():
        want = hf.generate(model, None, prompts, policy=dense, max_new_tokens=6, stop_at_eos=False)
        got = hf.generate(model, None, prompts, policy=full, max_new_tokens=6, stop_at_eos=False)
        st = small.selectors[0]
        sess = hf.PolicySession(model, small, max_total_tokens=160, batch_size=2)
        sess.prefill(prompts)
        built = {(sid, layer): st.span_index(sess.cache, sid, layer) for sid in sess.seq_ids for layer in (0, 1, 2)}
        for _ in range(4):
            sess.decode([5, 7])
        sess.close()
    assert got.sequences == want.sequences  # at full budget: exactly dense
    for sid, n in zip((0, 1), (150, 97)):
        assert built[(sid, 0)] is None  # dense layer: nothing built
        for layer in (1, 2):
            idx = built[(sid, layer)]  # observed at prefill: spans tile the full pages after the sink
            assert idx.starts[0] == 1 and idx.ends[-1] == n // 16 == idx.covered
    assert all(s.kv_bytes_read[0] < s.dense_kv_bytes[0] for s in sess.steps)


@pytest.mark.cpu
def test_int8_table_holds_quantized_keys_of_the_same_spans():
    """rep_dtype int8: the same spans as the cache-dtype table, the keys stored as int8 (half a bf16 table's bytes,
    a quarter of fp32's) whose dequantized values are the k-means keys within half a scale step."""
    keep = {}
    for rep_dtype in ("cache", "int8"):
        pipe, cache, ids, q, *_ = run(ltri_policy(64, rep_dtype=rep_dtype), [111, 300])
        pipe.run(q, cache, 0)
        table = cache.stage_state(pipe.selectors[0]).tables[0]
        keep[rep_dtype] = (table, [pipe.selectors[0].span_index(cache, s, 0) for s in ids])
    (t16, idx16), (t8, idx8) = keep["cache"], keep["int8"]
    assert t8.reps.dtype == torch.int8 and t16.rep_scale is None and t8.rep_scale.shape == t8.reps.shape[:4]
    for a, b in zip(idx16, idx8):
        assert torch.equal(a.span_of_page, b.span_of_page) and int(a.num_spans) == int(b.num_spans)
        step = a.reps.abs().amax(-1, keepdim=True) / 127
        assert ((b.reps - a.reps).abs() <= step / 2 + 1e-6).all()
