"""SnapKV selector: prefill votes vs a loop reference, selection and budget, stacking with art, the Triton
decode path, hf generate."""
import os

import pytest
import torch

import composable_kv as ckv
from composable_kv.kernels.page_select import reference as select_ref
from composable_kv.policies.snapkv import _Votes, page_votes

from helpers import build_cache, dense_attention, tiny_llama
from kernel_checks import _cpu_cache

INF = float("inf")
cpu = pytest.mark.cpu


def votes_loop(q, k, page_size, sm_scale, window, pooling):
    """Token by token: SnapKV's vote of token t = sum over the last W queries i >= t of softmax_i(t)."""
    Hq, T, _ = q.shape
    Hkv = k.shape[0]
    G, W = Hq // Hkv, min(window, T)
    vote = torch.zeros(Hq, T)
    for h in range(Hq):
        for i in range(T - W, T):
            s = torch.tensor([float(q[h, i] @ k[h // G, t]) * sm_scale for t in range(i + 1)])
            vote[h, : i + 1] += s.softmax(0)
    vote = vote.view(Hkv, G, T).mean(1)
    P = -(-T // page_size)
    out = torch.empty(Hkv, P)
    for p in range(P):
        tok = vote[:, p * page_size:(p + 1) * page_size]
        out[:, p] = tok.sum(-1) / page_size if pooling == "avg" else tok.amax(-1)
        if (p + 1) * page_size > T - W:
            out[:, p] = INF
    return out


@cpu
@pytest.mark.parametrize("T,window,group,pooling", [(75, 8, 1, "avg"), (111, 32, 3, "max"), (40, 64, 2, "avg"),
                                                    (64, 16, 3, "avg")])
def test_page_votes_equal_loop_reference(T, window, group, pooling):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2 * group, T, 8, generator=g)
    k = torch.randn(2, T, 8, generator=g)
    got = page_votes(q, k, 16, 0.4, window, pooling)
    want = votes_loop(q, k, 16, 0.4, window, pooling)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)], rtol=1e-5, atol=1e-6)


def policy(budget, *terminal, window=8, dense_layers=()):
    return {"name": "s", "page_size": 16, "dense_layers": list(dense_layers),
            "stages": [{"stage": "snapkv", "budget_tokens": budget, "window": window},
                       *(terminal or [{"stage": "attend"}])]}


def observed_cache(pipe, lens, *, decode_tokens=0, group=2, head_dim=16, seed=0, k_scale=1.0, device="cpu"):
    """A cache whose prompts (lens) were observed by the snapkv stage, then `decode_tokens` appended."""
    cache, ids, keys, values = build_cache(lens, head_dim=head_dim, seed=seed, summaries=pipe.required_summaries,
                                           extra_pages=8, k_scale=k_scale, device=device)
    g = torch.Generator().manual_seed(seed + 5)
    Hq = cache.num_kv_heads * group
    snap = pipe.selectors[0]
    qs = []
    for sid, k, n in zip(ids, keys, lens):
        q = torch.randn(1, Hq, n, head_dim, generator=g)
        snap.observe_prefill(cache, [sid], 0, q, k[0].transpose(0, 1)[None], None, None)
        qs.append(q[0])
    for _ in range(decode_tokens):
        kk, vv = (torch.randn(1, len(lens), 2, head_dim, generator=g) for _ in range(2))  # [layers, B, Hkv, D]
        cache.append(ids, [1] * len(lens), kk.to(device), vv.to(device))
        for b in range(len(lens)):
            keys[b] = torch.cat([keys[b], kk[:, b:b + 1]], 1)
            values[b] = torch.cat([values[b], vv[:, b:b + 1]], 1)
    return cache, ids, keys, values, qs


@cpu
def test_selection_keeps_window_top_votes_and_every_later_page():
    lens, budget, W = [300, 170], 96, 8  # budget 6 pages: window page(s) + the best-voted others
    pipe = ckv.compile(policy(budget, window=W), backend="reference")
    cache, ids, keys, _, qs = observed_cache(pipe, lens, decode_tokens=40)
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(9))
    plan = pipe.plan(cache, ids)
    ctx = ckv.pipeline.LayerContext(q, cache, 0, plan, 16 ** -0.5)
    order, count, _ = pipe.select(ctx)
    for b, n in enumerate(lens):
        votes = page_votes(qs[b], keys[b][0, :n].transpose(0, 1), 16, 16 ** -0.5, W, "avg")  # [Hkv, P_prompt]
        n_prompt, n_all = -(-n // 16), -(-(n + 40) // 16)
        for h in range(2):
            kept = set(order[b, h, :count[b, h]].tolist())
            after = set(range(n_prompt, n_all))  # written after the prefill: always kept, not charged
            window = {p for p in range(n_prompt) if torch.isinf(votes[h, p])}
            free = budget // 16 - len(window)
            best = votes[h].masked_fill(torch.isinf(votes[h]), -INF).topk(free).indices.tolist()
            assert kept == after | window | set(best), (b, h)
            # ART's order: the +inf pages first (position order), then by vote
            listed = order[b, h, :count[b, h]].tolist()
            assert listed[:len(window | after)] == sorted(window | after)
            assert listed[len(window | after):] == best


@cpu
def test_full_budget_equals_dense_and_art_stacks():
    lens = [300, 170, 40]
    for terminal in ([{"stage": "attend"}], [{"stage": "art", "stop": "certified", "delta": 1e-30}],
                     [{"stage": "art", "stop": "stability", "scale_tol": 0.0, "direction_tol": 0.0}]):
        pipe = ckv.compile(policy(1 << 20, *terminal), backend="reference")
        cache, ids, keys, values, _ = observed_cache(pipe, lens, decode_tokens=3)
        q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))
        pipe.plan(cache, ids)
        res = pipe.run(q, cache, 0)
        torch.testing.assert_close(res.out, dense_attention(q, keys, values), rtol=1e-5, atol=1e-5)


@cpu
def test_snapkv_art_certified_bound_holds_and_reads_less():
    lens = [400, 333]
    pipe = ckv.compile(policy(128, {"stage": "art", "stop": "certified", "delta": 0.3, "chunk_pages": 1}),
                       backend="reference")
    full = ckv.compile(policy(128), backend="reference")
    # nearly flat attention (small keys): the box bound is tight enough for the stop to fire
    cache, ids, keys, values, _ = observed_cache(pipe, lens, decode_tokens=2, k_scale=0.02)
    cache.adopt_stage_state(full.selectors[0], pipe.selectors[0].votes(cache))  # same votes for the reference
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(3)) * 4
    pipe.plan(cache, ids)
    full.plan(cache, ids)
    a, b = pipe.run(q, cache, 0), full.run(q, cache, 0)
    assert (a.pages_read <= b.pages_read).all() and (a.pages_read < b.pages_read).any()
    assert (a.tau_bound <= 0.3 + 1e-6).all()
    err = (a.out - b.out).norm(dim=-1)  # [B, Hq] against attend over snapkv's pages
    vmax = torch.stack([values[i][0].norm(dim=-1).amax() for i in range(2)])[:, None]
    assert (err <= a.tau_bound * (vmax + a.out.norm(dim=-1)) + 1e-5).all()


@cpu
def test_unobserved_sequence_reads_every_page_and_finished_pages_are_reset():
    pipe = ckv.compile(policy(32), backend="reference")
    cache, ids, *_ = observed_cache(pipe, [200])
    st = pipe.selectors[0].votes(cache)
    pages = cache.pages(ids[0])
    assert st.prompt[pages].all() and torch.isfinite(st.scores[0][pages[0]]).all()
    cache.free(ids[0])  # its pages go back to the pool and a new, unobserved sequence takes them
    sid = cache.add_sequence()
    g = torch.Generator().manual_seed(4)
    cache.append([sid], [200], torch.randn(1, 200, 2, 16, generator=g), torch.randn(1, 200, 2, 16, generator=g))
    assert set(cache.pages(sid)) & set(pages)
    pipe.plan(cache, [sid])
    res = pipe.run(torch.randn(1, 4, 16, generator=g), cache, 0)
    assert res.pages_read.tolist() == [[13, 13]]
    assert not st.prompt[pages].any() and torch.isinf(st.scores[0][pages]).all()


@cpu
def test_partial_prefill_is_refused():
    pipe = ckv.compile(policy(32), backend="reference")
    cache, ids, keys, _ = build_cache([50], head_dim=16)
    with pytest.raises(ValueError, match="observe the whole prompt"):
        pipe.selectors[0].observe_prefill(cache, ids, 0, torch.randn(1, 4, 20, 16),
                                          keys[0][0, :20].transpose(0, 1)[None], None, None)


@cpu
def test_generate_through_hf():
    from composable_kv import hf
    model = tiny_llama(256)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (150, 97)]
    dense = ckv.compile({"name": "d", "page_size": 16, "stages": [{"stage": "attend"}]}, backend="reference")
    with torch.no_grad():
        want = hf.generate(model, None, prompts, policy=dense, max_new_tokens=6, stop_at_eos=False)
        got = hf.generate(model, None, prompts, policy=ckv.compile(policy(1 << 20, dense_layers=[0]),
                                                                    backend="reference"),
                          max_new_tokens=6, stop_at_eos=False)
        small = [hf.generate(model, None, prompts, max_new_tokens=6, stop_at_eos=False, decode_path=path,
                             policy=ckv.compile(policy(48, {"stage": "art", "stop": "stability"}, dense_layers=[0]),
                                                backend="reference"))
                 for path in ("device", "host")]
    assert got.sequences == want.sequences  # at full budget: exactly dense
    assert small[0].sequences == small[1].sequences  # device-planned step == host-planned step
    assert small[0].kv_read_fraction[0] < 0.75 * got.kv_read_fraction[0]


@pytest.mark.interpret
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="no CUDA and TRITON_INTERPRET unset (tests/conftest.py sets it)")
@pytest.mark.parametrize("terminal", [
    {"stage": "art", "stop": "stability", "scale_tol": 1e-2, "patience": 1, "chunk_pages": 1, "accumulate": "bf16"},
    {"stage": "art", "stop": "certified", "delta": 0.3, "chunk_pages": 1}])
def test_triton_path_equals_reference(terminal):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = ckv.compile(policy(64, terminal), backend="reference")
    tri = ckv.compile(policy(64, terminal), backend="triton")
    cache, ids, *_ = observed_cache(tri, [150, 97], decode_tokens=2, k_scale=0.3, device=dev)
    rc = _cpu_cache(cache) if dev != "cpu" else cache
    votes, src = _Votes(rc), tri.selectors[0].votes(cache)
    votes.scores, votes.prompt = [s.cpu() for s in src.scores], src.prompt.cpu()
    rc.adopt_stage_state(ref.selectors[0], votes)
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(6)) * 3
    ref.plan(rc, ids)
    tri.plan(cache, ids, num_splits=1)
    a, b = ref.run(q, rc, 0), tri.run(q.to(dev), cache, 0)
    assert "generic" in tri.describe("cuda")
    assert torch.equal(a.pages_read, b.pages_read.cpu())
    torch.testing.assert_close(b.out.cpu(), a.out, rtol=2 ** -7, atol=1e-4)
