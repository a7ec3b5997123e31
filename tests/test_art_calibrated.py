"""ART's calibrated stop (a heuristic, not certified): the Triton decode against the reference, the fused
pipeline against the generic one, and its relation to the certified stop.

Under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it when CUDA is absent); the gpu-marked grid runs
compiled on the GPU.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

import composable_kv as ckv  # noqa: E402
from composable_kv.kernels.page_score import reference as score_ref  # noqa: E402
from composable_kv.kernels.page_select import reference as select_ref  # noqa: E402
from composable_kv.kernels.page_select import triton as select_tk  # noqa: E402
from composable_kv.kernels.paged_decode import reference as decode_ref  # noqa: E402
from composable_kv.kernels.paged_decode import triton as decode_tk  # noqa: E402
from composable_kv.stages import StopKind, StopRule  # noqa: E402
from kernel_checks import check_pipeline, close, make  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [1, 17, 63, 111, 300]


def inputs(lens, group, head_dim, budget, num_splits, *, q_scale=1.0, seed=0, slack=0.0, device="cpu"):
    """Quest-ordered page lists with the box bound (plus `slack` nats), its strided tail and its terms."""
    cache, q, table, seq_lens = make(lens, group=group, head_dim=head_dim, device=device, q_scale=q_scale, seed=seed)
    S = cache.page_size
    num_pages = (seq_lens.cpu() + S - 1) // S
    sm = head_dim ** -0.5
    bound = score_ref.quest_scores(q.cpu(), cache.key_min[0].cpu(), cache.key_max[0].cpu(), table.cpu(),
                                   num_pages, sm) + slack  # [B, Hkv, P]
    P = table.shape[1]
    valid = (torch.arange(P)[None, None] < num_pages[:, None, None]).expand_as(bound)
    forced = valid & (torch.arange(P)[None, None] == (num_pages - 1)[:, None, None])
    order, count = select_ref.select_pages(bound, forced, valid, budget)
    in_order = bound.gather(-1, order.long().clamp(min=0))
    tok = select_ref.page_token_counts(order, seq_lens.cpu(), S)
    tail = select_ref.strided_tail_lse(in_order, tok, count, num_splits)
    terms = select_ref.tail_terms(in_order, tok, count)
    return cache, q, table, seq_lens, order, count, tail, terms, sm


def ref_decode(c, rule, num_splits):
    cache, q, table, seq_lens, order, count, tail, terms, sm = c
    return decode_ref.paged_decode(q.cpu(), cache.k[0].cpu(), cache.v[0].cpu(), table.cpu(), seq_lens.cpu(), order,
                                   count, sm_scale=sm, rule=rule, tail_lse=tail, bound_terms=terms,
                                   num_splits=num_splits)


def check_kernel(lens, group, head_dim, chunk, delta, num_splits, budget=None, *, q_scale=1.0, device=DEV, tol=2e-4,
                 calibrate="all"):
    c = inputs(lens, group, head_dim, budget, num_splits, q_scale=q_scale, device=device)
    cache, q, table, seq_lens, order, count, tail, terms, sm = c
    rule = StopRule("calibrated", chunk, delta=delta, calibrate=calibrate)
    r1 = ref_decode(c, rule, num_splits)
    r2 = decode_tk.paged_decode(q, cache.k[0], cache.v[0], table, seq_lens, order.to(device), count.to(device),
                                sm_scale=sm, rule=rule, tail_lse=tail.to(device), bound_terms=terms.to(device),
                                num_splits=num_splits)
    assert torch.equal(r1.pages_read, r2.pages_read.cpu()), (r1.pages_read, r2.pages_read)
    close(r1.out, r2.out, tol)
    assert r1.tau_bound is None and r2.tau_bound is None  # no certificate to report
    # the list's physical pages given (score_select's phys_out): the same pages read, the same output
    phys = table.cpu().gather(1, order.long().clamp(min=0).flatten(1)).view_as(order).to(torch.int32)
    r3 = decode_tk.paged_decode(q, cache.k[0], cache.v[0], table, seq_lens, order.to(device), count.to(device),
                                sm_scale=sm, rule=rule, tail_lse=tail.to(device), bound_terms=terms.to(device),
                                num_splits=num_splits, phys=phys.to(device))
    assert torch.equal(r2.pages_read, r3.pages_read) and torch.equal(r2.out, r3.out)
    return r1


@pytest.mark.interpret
@pytest.mark.parametrize("chunk,delta", [(1, 0.1), (4, 0.3)])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (8, 128)])
def test_calibrated_decode_kernel_matches_reference(chunk, delta, num_splits, group, head_dim):
    check_kernel(LENS, group, head_dim, chunk, delta, num_splits)


@pytest.mark.interpret
@pytest.mark.parametrize("chunk,delta", [(1, 0.1), (4, 0.3)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_calibrated_recent_decode_kernel_matches_reference(chunk, delta, num_splits):
    check_kernel(LENS, 3, 64, chunk, delta, num_splits, calibrate="recent")


@pytest.mark.interpret
@pytest.mark.parametrize("chunk,delta", [(1, 0.1), (2, 0.3), (4, 0.5)])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("q_scale", [1.0, 4.0])
def test_calibrated_once_decode_kernel_matches_reference(chunk, delta, num_splits, q_scale):
    r = check_kernel(LENS, 3, 64, chunk, delta, num_splits, q_scale=q_scale, calibrate="once")
    if (chunk, q_scale) == (1, 4.0):  # peaked attention: the bounds' stop point leaves pages unread
        assert int(r.pages_read.sum()) < sum(-(-n // 16) for n in LENS) * 2


def test_calibrated_once_stops_where_the_bound_estimate_first_allows():
    """once_stop_slot against a hand count: one split of 8 slots, chunk 2, every page's U + log n = 0, so
    T_e = log(8 - e); the first chunk's mass Z_1 = 2 and slack c = log 0.5."""
    from composable_kv.kernels.paged_decode.reference import once_stop_slot
    n, C = 8, 2
    terms = torch.zeros(1, 1, 1, n)
    tail = torch.logcumsumexp(terms.flip(-1), -1).flip(-1)
    pos = torch.arange(n).view(1, 1, 1, n)
    m, l = torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    calib = torch.full((1, 1, 1, 1), math.log(0.5))
    for delta in (0.2, 0.4, 0.55, 0.7):
        thr = math.log(delta / (1 - delta))
        # the first e in {2, 4, 6} with 0.5 * (8 - e) / 2 <= delta / (1 - delta)
        want = next((e for e in (2, 4, 6) if math.log(0.5 * (n - e) / 2) <= thr + 1e-6), n)
        assert int(once_stop_slot(m, l, calib, tail, pos, C, thr)) == want, delta


@pytest.mark.interpret
@pytest.mark.parametrize("q_scale", [30.0, 1000.0])
def test_calibrated_decode_extreme_logits(q_scale):
    check_kernel(LENS, 2, 64, 1, 0.2, 3, budget=5, q_scale=q_scale, tol=1e-3)


@pytest.mark.interpret
def test_score_select_writes_the_tail_terms():
    cache, q, table, seq_lens = make([1, 17, 63, 300], group=2, head_dim=64, device=DEV)
    forced = torch.zeros_like(table, dtype=torch.bool)
    n_pages = (seq_lens + cache.page_size - 1) // cache.page_size
    forced[torch.arange(4), (n_pages - 1).long()] = True
    terms = torch.empty(*table.shape[:1], cache.num_kv_heads, table.shape[1], dtype=torch.float32, device=DEV)
    kw = dict(num_kv_heads=cache.num_kv_heads, page_size=cache.page_size, sm_scale=64 ** -0.5, score=1, select=True,
              budget_pages=7, forced_only=False, certified=True, num_splits=2, max_kept=7)
    order, count, tail = select_tk.score_select(q, cache.key_min[0], cache.key_max[0], table, seq_lens, forced,
                                                terms_out=terms, **kw)
    bound = score_ref.quest_scores(q.cpu(), cache.key_min[0].cpu(), cache.key_max[0].cpu(), table.cpu(),
                                   n_pages.cpu(), 64 ** -0.5)
    in_order = bound.gather(-1, order.long().cpu().clamp(min=0))
    tok = select_ref.page_token_counts(order.cpu(), seq_lens.cpu(), cache.page_size)
    close(select_ref.tail_terms(in_order, tok, count.cpu()), terms, 1e-4)
    with pytest.raises(ValueError, match="terms_out"):
        select_tk.score_select(q, cache.key_min[0], cache.key_max[0], table, seq_lens, forced,
                               terms_out=terms[:, :1].contiguous(), **kw)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("delta", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_calibrated_stops_no_later_than_certified(seed, delta, num_splits):
    """c = max over read pages of log mass - (U + log n) <= 0 (clamped against rounding), so at the same delta
    and chunk the calibrated estimate never exceeds the certificate: per (request, KV head) it reads no more."""
    c = inputs(LENS, 3, 64, None, num_splits, seed=seed, q_scale=[1.0, 4.0, 30.0][seed % 3])
    cert = ref_decode(c, StopRule("certified", 1, delta=delta), num_splits)
    cal = ref_decode(c, StopRule("calibrated", 1, delta=delta), num_splits)
    assert bool((cal.pages_read <= cert.pages_read).all()), (cal.pages_read, cert.pages_read)
    # the last chunk's slack is at most the max over every chunk read: `recent` stops no later than `all`
    recent = ref_decode(c, StopRule("calibrated", 1, delta=delta, calibrate="recent"), num_splits)
    assert bool((recent.pages_read <= cal.pages_read).all()), (recent.pages_read, cal.pages_read)


def test_calibrated_absorbs_a_loose_bound():
    """With every bound 12 nats above the box bound, the certified stop reads every page, while the calibrated
    stop (the slack is learned from the pages read) stops early: the same decisions as without the slack."""
    rule_cert, rule_cal = StopRule("certified", 1, delta=0.2), StopRule("calibrated", 1, delta=0.2)
    loose = inputs(LENS, 2, 64, None, 1, q_scale=4.0, slack=12.0)
    tight = inputs(LENS, 2, 64, None, 1, q_scale=4.0)
    assert torch.equal(ref_decode(loose, rule_cert, 1).pages_read, loose[5])  # reads every kept page
    cal = ref_decode(loose, rule_cal, 1).pages_read
    assert int(cal.sum()) < int(loose[5].sum())
    assert torch.equal(cal, ref_decode(tight, rule_cal, 1).pages_read)


def test_stop_rule_refuses_an_unknown_calibration():
    with pytest.raises(ValueError, match="calibrate: expected 'all', 'recent' or 'once'"):
        StopRule("calibrated", 4, delta=0.1, calibrate="ONCE")


def test_calibrated_needs_its_bound_terms():
    c = inputs([40], 2, 64, None, 1)
    cache, q, table, seq_lens, order, count, tail, terms, sm = c
    with pytest.raises(ValueError, match="bound_terms"):
        decode_ref.paged_decode(q, cache.k[0], cache.v[0], table, seq_lens, order, count, sm_scale=sm,
                                rule=StopRule("calibrated", 1, delta=0.1), tail_lse=tail)


def _pol(*stages, dense_layers=(0,)):
    return {"name": "t", "page_size": 16, "dense_layers": list(dense_layers), "stages": list(stages)}


CAL = {"stage": "art", "stop": "calibrated", "delta": 0.3, "chunk_pages": 1}
STACKS = {
    "quest_art_calibrated": [{"stage": "quest", "budget_tokens": 96}, CAL],
    "sw_quest_art_calibrated": [{"stage": "sink_window", "sink_tokens": 16, "window_tokens": 32},
                                {"stage": "quest", "budget_tokens": 96}, dict(CAL, chunk_pages=2)],
    "art_calibrated_box_all": [dict(CAL, delta=0.2)],
    "quest_art_calibrated_recent": [{"stage": "quest", "budget_tokens": 96}, dict(CAL, calibrate="recent",
                                                                                 chunk_pages=2)],
    "quest_art_calibrated_once": [{"stage": "quest", "budget_tokens": 96}, dict(CAL, calibrate="once",
                                                                               chunk_pages=2)],
    "art_calibrated_once_box_all": [dict(CAL, delta=0.3, calibrate="once", chunk_pages=2)],
    "quest_shadow8_art_calibrated_generic": [{"stage": "quest", "budget_tokens": 160},
                                             {"stage": "key_shadow", "bits": 8, "budget_tokens": 64}, CAL],
}


@pytest.mark.interpret
@pytest.mark.parametrize("name", STACKS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_calibrated_fused_equals_generic(name, num_splits):
    check_pipeline(_pol(*STACKS[name]), [1, 17, 63, 111, 333], group=4, head_dim=64, num_layers=2,
                   num_splits=num_splits, device=DEV)


def test_calibrated_is_declared_not_certified(capsys):
    assert not StopKind.CALIBRATED.certified and StopKind.CERTIFIED.certified
    assert StopKind.CALIBRATED.uses_bounds
    fused = ckv.compile(_pol(*STACKS["quest_art_calibrated"]), backend="triton").describe("cuda")
    assert "NOT certified" in fused and "score_select" in fused
    generic = ckv.compile(_pol(*STACKS["quest_shadow8_art_calibrated_generic"]), backend="triton").describe("cuda")
    assert "generic" in generic and "calibrated stop after a key shadow" in generic
    reference = ckv.compile(_pol(*STACKS["quest_art_calibrated"]), backend="reference").describe("cpu")
    assert "art: calibrated stop (heuristic, NOT certified" in reference  # on every path, not only the fused one
    certified = ckv.compile(_pol({"stage": "quest", "budget_tokens": 64}, {"stage": "art"}), backend="reference")
    assert "art: certified stop (sound" in certified.describe("cpu")
    from composable_kv import cli
    cli.main(["stages"])
    out = capsys.readouterr().out
    art = out[out.index("art  [terminal]"):].split("\n    order")[0]
    assert "calibrated (heuristic, NOT certified" in art and "'calibrated'" in art


@pytest.mark.gpu
@pytest.mark.parametrize("chunk,delta", [(1, 0.05), (4, 0.1), (8, 0.2)])
@pytest.mark.parametrize("num_splits", [1, 4, 8])
@pytest.mark.parametrize("group,head_dim", [(4, 64), (7, 128), (8, 128)])
@pytest.mark.parametrize("budget", [None, 64])
@pytest.mark.parametrize("calibrate", ["all", "once"])
def test_calibrated_decode_kernel_gpu_grid(chunk, delta, num_splits, group, head_dim, budget, calibrate):
    check_kernel([1, 17, 300, 1000, 4000, 8191], group, head_dim, chunk, delta, num_splits, budget, device="cuda",
                 calibrate=calibrate)


def test_diagnosis_runs_the_calibrated_rules():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import art_diagnosis
    cal = [(name, rule, bound) for name, rule, bound, _ in art_diagnosis.rules()
           if rule is not None and rule.kind is StopKind.CALIBRATED]
    assert {b for _, _, b in cal} == {"box", "shadow8"}
    assert len(cal) == (len(art_diagnosis.CALIB_DELTAS) + len(art_diagnosis.CALIB_RECENT_DELTAS)
                        + len(art_diagnosis.CALIB_ONCE_DELTAS) + len(art_diagnosis.CHUNK16_DELTAS) + 1)
    assert sum(r.calibrate == "recent" for _, r, _ in cal) == len(art_diagnosis.CALIB_RECENT_DELTAS)
    assert sum(r.calibrate == "once" for _, r, _ in cal) == len(art_diagnosis.CALIB_ONCE_DELTAS)
    assert art_diagnosis.wanted("calib-box 0.05", "cert,calib") and not art_diagnosis.wanted("oracle 0.05", "calib")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
def test_order_within_splits_reference(num_splits):
    """Split s lists exactly its pages p = s (mod S), best-first, at positions s, s+S, ...; S = 1 is the global
    order of select_pages."""
    g = torch.Generator().manual_seed(num_splits)
    key = torch.randn(3, 2, 23, generator=g).round(decimals=1)  # ties on purpose
    num_pages = torch.tensor([23, 9, 1])
    order, count = select_ref.order_within_splits(key, num_pages, num_splits)
    assert count.tolist() == [[23, 23], [9, 9], [1, 1]]
    for b in range(3):
        for h in range(2):
            n = int(num_pages[b])
            assert sorted(order[b, h, :n].tolist()) == list(range(n)) and (order[b, h, n:] == -1).all()
            for s in range(num_splits):
                mine = order[b, h, s:n:num_splits].tolist()
                assert all(p % num_splits == s for p in mine)
                want = sorted(range(s, n, num_splits), key=lambda p: (-key[b, h, p].item(), p))
                assert mine == want
    if num_splits == 1:
        valid = torch.arange(23)[None, None] < num_pages[:, None, None]
        glob, _ = select_ref.select_pages(key.masked_fill(~valid, float("-inf")), valid & False, valid.expand(3, 2, 23),
                                          None)
        assert torch.equal(order, glob)


@pytest.mark.interpret
@pytest.mark.parametrize("score", [1, 2])
@pytest.mark.parametrize("num_splits", [1, 3, 5])
@pytest.mark.parametrize("last_first", [False, True])
def test_score_select_within_splits_matches_reference(score, num_splits, last_first):
    cache, q, table, seq_lens = make([1, 17, 63, 300], group=2, head_dim=64, device=DEV)
    n_pages = (seq_lens + cache.page_size - 1) // cache.page_size
    sm = 64 ** -0.5
    B, Hkv, P = len(seq_lens), cache.num_kv_heads, table.shape[1]
    terms = torch.empty(B, Hkv, P, dtype=torch.float32, device=DEV)
    a, b = (cache.key_min[0], cache.key_max[0]) if score == 1 else (cache.k[0], cache.k[0])
    phys = torch.empty(B, Hkv, P, dtype=torch.int32, device=DEV)
    order, count, tail = select_tk.score_select(
        q, a, b, table, seq_lens, torch.zeros_like(table, dtype=torch.bool), num_kv_heads=Hkv,
        page_size=cache.page_size, sm_scale=sm, score=score, select=False, budget_pages=0, forced_only=False,
        certified=True, num_splits=num_splits, max_kept=1, terms_out=terms, last_first=last_first,
        within_splits=True, block_s=16, phys_out=phys)
    if score == 1:
        bound = score_ref.quest_scores(q.cpu(), a.cpu(), b.cpu(), table.cpu(), n_pages.cpu(), sm)
    else:
        bound = score_ref.exact_page_max_scores(q.cpu(), a.cpu(), table.cpu(), seq_lens.cpu(), sm)
    key = bound
    if last_first:
        last = torch.arange(P)[None] == (n_pages.cpu() - 1)[:, None]
        key = bound.masked_fill(last[:, None], float("inf"))
    want, want_count = select_ref.order_within_splits(key, n_pages.cpu(), num_splits)
    assert torch.equal(order.cpu(), want) and torch.equal(count.cpu(), want_count)
    want_phys = table.cpu().gather(1, want.long().clamp(min=0).flatten(1)).view_as(want)
    assert torch.equal(phys.cpu(), torch.where(want >= 0, want_phys, -1).to(torch.int32))
    in_order = bound.gather(-1, want.long().clamp(min=0))
    tok = select_ref.page_token_counts(want, seq_lens.cpu(), cache.page_size)
    close(select_ref.strided_tail_lse(in_order, tok, want_count, num_splits), tail, 1e-4)
    close(select_ref.tail_terms(in_order, tok, want_count), terms, 1e-4)


def test_calibrate_recent_is_for_the_calibrated_stop_only():
    with pytest.raises(ValueError, match="calibrate: 'recent' applies to the calibrated stop only"):
        ckv.compile(_pol({"stage": "art", "stop": "certified", "calibrate": "recent"}))
    pipe = ckv.compile(_pol(*STACKS["quest_art_calibrated_recent"]))
    assert pipe.stop_rule.calibrate == "recent" and "slack of the last chunk read" in pipe.describe("cpu")
    with pytest.raises(ValueError, match="calibrate: 'once' applies to the calibrated stop only"):
        ckv.compile(_pol({"stage": "art", "stop": "certified", "calibrate": "once"}))
    with pytest.raises(ValueError, match="calibrate: 'once' reads on without checks"):
        ckv.compile(_pol({"stage": "art", "stop": "calibrated", "calibrate": "once", "accumulate": "bf16"}))
    pipe = ckv.compile(_pol(*STACKS["quest_art_calibrated_once"]))
    assert pipe.stop_rule.calibrate == "once" and "stop point then set from the bounds" in pipe.describe("cpu")


@pytest.mark.parametrize("recent", [False, True])
def test_calibrated_uses_the_certificate_until_a_full_page_is_read(recent):
    """chunk 1, the request's partial last page first: after it no full page has calibrated, so the estimate is
    the certificate's and a split does not stop where the certified stop would not."""
    c = inputs([40, 300], 2, 64, None, 1, q_scale=4.0)
    cache, q, table, seq_lens, order, count, tail, terms, sm = c
    S = cache.page_size
    n_pages = (seq_lens.cpu() + S - 1) // S
    last = torch.arange(order.shape[-1])[None] == (n_pages - 1)[:, None]
    bound = score_ref.quest_scores(q.cpu(), cache.key_min[0].cpu(), cache.key_max[0].cpu(), table.cpu(), n_pages, sm)
    key = bound.masked_fill(last[:, None], float("inf"))  # the calibrated stop's read order
    order, count = select_ref.order_within_splits(key, n_pages, 1)
    in_order = bound.gather(-1, order.long().clamp(min=0))
    tok = select_ref.page_token_counts(order, seq_lens.cpu(), S)
    c = (cache, q, table, seq_lens, order, count, select_ref.strided_tail_lse(in_order, tok, count, 1),
         select_ref.tail_terms(in_order, tok, count), sm)
    cal = ref_decode(c, StopRule("calibrated", 1, delta=0.2, calibrate="recent" if recent else "all"), 1).pages_read
    cert = ref_decode(c, StopRule("certified", 1, delta=0.2), 1).pages_read
    assert bool((cal >= torch.minimum(cert, torch.full_like(cert, 2))).all()), (cal, cert)


@pytest.mark.interpret
@pytest.mark.parametrize("rule", [StopRule("certified", 2, delta=0.3), StopRule("calibrated", 2, delta=0.2),
                                  StopRule("calibrated", 4, delta=0.2, calibrate="recent"),
                                  StopRule("calibrated", 2, delta=0.05, calibrate="once")],
                         ids=["certified", "calibrated", "recent", "once"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_orders_its_own_pages_as_score_select_would(rule, num_splits):
    check_order_in_decode(rule, num_splits, [1, 17, 63, 300], 2, 64, DEV)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", [StopRule("certified", 8, delta=0.3), StopRule("calibrated", 16, delta=0.2),
                                  StopRule("calibrated", 16, delta=0.05, calibrate="once")],
                         ids=["certified", "calibrated", "once"])
@pytest.mark.parametrize("num_splits", [1, 4, 9])
@pytest.mark.parametrize("group,head_dim,dtype", [(7, 64, torch.bfloat16), (4, 128, torch.float32)])
def test_decode_orders_its_own_pages_gpu(rule, num_splits, group, head_dim, dtype):
    check_order_in_decode(rule, num_splits, [1, 17, 300, 1000, 4000, 8191], group, head_dim, "cuda", dtype)


def check_order_in_decode(rule, num_splits, lens, group, head_dim, device, dtype=torch.float32):
    """launch_decode(order_from=...) (one launch) against score_select(within_splits) + launch_decode (two)."""
    cache, q, table, seq_lens = make(lens, group=group, head_dim=head_dim, device=device, q_scale=3.0, dtype=dtype)
    B, Hkv, P, sm = len(seq_lens), cache.num_kv_heads, table.shape[1], head_dim ** -0.5
    kmin, kmax = cache.key_min[0], cache.key_max[0]
    cal = rule.kind is StopKind.CALIBRATED
    terms = torch.empty(B, Hkv, P, dtype=torch.float32, device=device) if cal else None
    phys = torch.empty(B, Hkv, P, dtype=torch.int32, device=device)
    order, count, tail = select_tk.score_select(
        q, kmin, kmax, table, seq_lens, torch.zeros_like(table, dtype=torch.bool), num_kv_heads=Hkv,
        page_size=cache.page_size, sm_scale=sm, score=1, select=False, budget_pages=0, forced_only=False,
        certified=True, num_splits=num_splits, max_kept=1, terms_out=terms, last_first=cal, within_splits=True,
        phys_out=phys)
    two = decode_tk.launch_decode(q, cache.k[0], cache.v[0], table, seq_lens, order, count, sm_scale=sm, rule=rule,
                                  tail_lse=tail, bound_terms=terms, num_splits=num_splits, phys=phys)
    one = decode_tk.launch_decode(q, cache.k[0], cache.v[0], table, seq_lens, None, None, sm_scale=sm, rule=rule,
                                  num_splits=num_splits, order_from=(kmin, kmax))
    assert torch.equal(two[1], one[1]) and torch.equal(two[0], one[0])
    if rule.kind is StopKind.CERTIFIED:
        assert torch.equal(two[2], one[2])
    if cal and num_splits == 1:  # the calibrated stops fire on these peaked logits: the comparison covers a stop
        assert int(one[1].sum()) < int((seq_lens.cpu() + 15).div(16, rounding_mode="floor").sum()) * Hkv


def test_order_from_refuses_what_it_replaces():
    cache, q, table, seq_lens = make([40, 300], group=2, head_dim=64)
    kmin, kmax = cache.key_min[0], cache.key_max[0]
    with pytest.raises(ValueError, match="order_from: for the certified and calibrated stops"):
        decode_tk.launch_decode(q, cache.k[0], cache.v[0], table, seq_lens, None, None, sm_scale=0.125,
                                rule=StopRule("stability", 2), order_from=(kmin, kmax))
    n = (seq_lens + 15) // 16
    count = n[:, None].expand(len(seq_lens), cache.num_kv_heads).to(torch.int32)  # a caller's own count
    with pytest.raises(ValueError, match="order_from: for the certified and calibrated stops"):
        decode_tk.launch_decode(q, cache.k[0], cache.v[0], table, seq_lens, None, count, sm_scale=0.125,
                                rule=StopRule("certified", 2, delta=0.1), order_from=(kmin, kmax))


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["art_calibrated_box_all", "art_calibrated_once_box_all"])
def test_pipeline_ordering_in_the_decode_equals_generic(name, monkeypatch):
    """fused.run_layer's one-launch dense + ART (taken where tuning.py records it faster) against the generic
    path: the same pages and outputs as the two-launch form that test_calibrated_fused_equals_generic checks."""
    calls = []
    real = decode_tk.launch_decode

    def spy(*args, **kwargs):
        calls.append(kwargs.get("order_from") is not None)
        return real(*args, **kwargs)
    monkeypatch.setattr(decode_tk, "order_in_decode", lambda q, k_cache, num_splits: True)
    monkeypatch.setattr(decode_tk, "launch_decode", spy)
    check_pipeline(_pol(*STACKS[name]), [1, 17, 63, 111, 333], group=4, head_dim=64, num_layers=2, num_splits=3,
                   device=DEV)
    assert any(calls)
