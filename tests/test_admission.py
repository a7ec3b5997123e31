"""Write-gated admission: ring window and admitted pages per (layer, request, KV head), freeing,
exact attention over the kept tokens, forced window pages under Quest, and validation."""
import math

import pytest
import torch

import composable_kv as ckv
from composable_kv.policies.write_gate.admission import GatedKVCache, GatedPipeline, unrope, rotate_half
from composable_kv.errors import ConfigError

pytestmark = pytest.mark.cpu


def _oracle(length, window, admit):
    """Kept positions: the last `window` positions, plus every older one whose gate admitted it."""
    start = max(0, length - window)
    return set(range(start, length)) | {j for j in range(start) if admit[j]}


def _fill(cache, lens, steps, *, seed=0, admit_p=0.4):
    """Prefill each request with lens[i] tokens, then `steps` one-token steps; g random with P(admit)=admit_p.
    Returns (req ids, K, V, G) with K/V [B][L, T, H, D] and G [B][L, T, H] of every token written."""
    g = torch.Generator().manual_seed(seed)
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    rids = [cache.add_sequence() for _ in lens]
    K = [torch.randn(L, n + steps, H, D, generator=g) for n in lens]
    V = [torch.randn(L, n + steps, H, D, generator=g) for n in lens]
    G = [torch.rand(L, n + steps, H, generator=g) * (cache.threshold / (1 - admit_p)) for n in lens]

    def write(idx):  # idx[b] = token indices of request b written now
        slots = cache.reserve(rids, [len(i) for i in idx])
        for layer in range(L):
            k = torch.cat([K[b][layer, i] for b, i in enumerate(idx)]).to(cache.dtype)
            v = torch.cat([V[b][layer, i] for b, i in enumerate(idx)]).to(cache.dtype)
            gg = torch.cat([G[b][layer, i] for b, i in enumerate(idx)])
            cache.write(layer, slots, k, v, g=gg)

    write([list(range(n)) for n in lens])
    for t in range(steps):
        write([[n + t] for n in lens])
    return rids, K, V, G


def _cache(L=2, H=2, D=8, S=4, W=6, pages=400, threshold=0.5, summaries=("key_minmax", "value_norm")):
    return GatedKVCache(L, H, D, pages, S, torch.float32, "cpu", frozenset(summaries), window_tokens=W,
                        threshold=threshold)


@pytest.mark.parametrize("lens,steps", [((3, 11), 9), ((1, 6, 17), 0), ((4,), 23), ((13, 2), 1)])
def test_ring_window_and_admitted_pages(lens, steps):
    cache = _cache()
    rids, K, V, G = _fill(cache, lens, steps, seed=len(lens) + steps)
    S, W = cache.page_size, cache.window_tokens
    for b, rid in enumerate(rids):
        n = lens[b] + steps
        assert cache.seq_len(rid) == n
        for layer in range(cache.num_layers):
            for h in range(cache.num_kv_heads):
                kept = cache.kept_positions(rid, layer, h)
                want = _oracle(n, W, (G[b][layer, :, h] > cache.threshold).tolist())
                assert sorted(kept) == sorted(want) and len(kept) == len(set(kept))
                row = cache._row[rid]
                n_global, n_kept = int(cache.n_global[layer, row, h]), int(cache.kept[layer, row, h])
                # the sequence is contiguous: global prefix, then the ring window; pages = ceil(kept / S)
                assert n_kept == len(kept) and len(cache.triple_pages(rid, layer, h)) == -(-len(kept) // S)
                assert n_global == len(kept) - min(W, n)
                assert sorted(kept[n_global:]) == list(range(max(0, n - W), n))
                k_pool, v_pool = cache.triple_kv(rid, layer, h)
                torch.testing.assert_close(k_pool, K[b][layer, kept, h], rtol=0, atol=0)
                torch.testing.assert_close(v_pool, V[b][layer, kept, h], rtol=0, atol=0)
                # full global pages carry exact summaries
                pages = cache.triple_pages(rid, layer, h)
                for p in range(n_global // S):
                    rows = K[b][layer, kept[p * S:(p + 1) * S], h]
                    torch.testing.assert_close(cache.pool.key_min[0][pages[p], 0], rows.amin(0), rtol=0, atol=0)
                    torch.testing.assert_close(cache.pool.key_max[0][pages[p], 0], rows.amax(0), rtol=0, atol=0)
                # every page's box contains its keys (overwritten window slots keep the bound sound)
                for p, page in enumerate(pages):
                    rows = k_pool[p * S:(p + 1) * S]
                    assert (cache.pool.key_min[0][page, 0] <= rows.amin(0)).all()
                    assert (cache.pool.key_max[0][page, 0] >= rows.amax(0)).all()
    st = cache.stats()
    assert st["evicted"] == sum(max(0, n + steps - W) for n in lens) * cache.num_layers * cache.num_kv_heads
    assert st["pages_used"] == sum(len(cache.triple_pages(r, layer, h)) for r in rids
                                   for layer in range(cache.num_layers) for h in range(cache.num_kv_heads))
    assert st["admitted"] == sum(int(cache.n_global[:, cache._row[r]].sum()) for r in rids)
    for rid in rids:
        cache.free(rid)
    assert cache.pool.num_free_pages == cache.pool.num_pages - 1 and cache.pages_used() == 0  # the trash page


def test_dense_layers_keep_every_token_and_gate_thresholds():
    cache = GatedKVCache(2, 1, 4, 64, 4, torch.float32, "cpu", window_tokens=2, threshold=0.5, gated_layers=[1])
    rid, = _fill(cache, [9], 3, admit_p=0.3)[0]
    assert sorted(cache.kept_positions(rid, 0, 0)) == list(range(12))
    assert len(cache.kept_positions(rid, 1, 0)) < 12
    with pytest.raises(ValueError, match="no gate"):
        cache.write(1, cache.reserve([rid], [1]), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    with pytest.raises(NotImplementedError, match="one prefill"):
        cache.reserve([rid], [2])


def test_unrope_inverts_rope():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 8, generator=g)
    theta = torch.randn(5, 4, generator=g)
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    post = x * cos[:, None] + rotate_half(x) * sin[:, None]  # transformers' apply_rotary_pos_emb
    torch.testing.assert_close(unrope(post, cos, sin), x)


def _policy(stages, **top):
    return ckv.compile({"name": "wg", "page_size": 4, **top,
                        "stages": [{"stage": "write_gate", "window_tokens": 6, "threshold": 0.5}] + stages},
                       backend="reference")


def _run(gp, cache, rids, layer, q):
    gp.plan(cache, rids)
    return gp.run(q, cache, layer)


def _attention(q, k, v):
    """q [G, D], k/v [T, D] -> [G, D] fp32."""
    s = (q.float() @ k.float().T) * q.shape[-1] ** -0.5
    return s.softmax(-1) @ v.float()


@pytest.mark.parametrize("stack", [[{"stage": "attend"}], [{"stage": "art", "stop": "stability"}]])
def test_attention_is_exact_over_kept_tokens(stack):
    gp = GatedPipeline(_policy(stack))
    cache = gp.make_cache(2, 2, 8, 400, dtype=torch.float32, device="cpu")
    rids, K, V, G = _fill(cache, (5, 14), 11, seed=3)
    q = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(9))
    for layer in range(2):
        res = _run(gp, cache, rids, layer, q)
        assert res.out.shape == (2, 6, 8) and res.pages_read.shape == (2, 2)
        for b, rid in enumerate(rids):
            for h in range(2):
                kept = cache.kept_positions(rid, layer, h)
                ref = _attention(q[b, 3 * h:3 * h + 3], K[b][layer, kept, h], V[b][layer, kept, h])
                torch.testing.assert_close(res.out[b, 3 * h:3 * h + 3].float(), ref, rtol=1e-5, atol=1e-5)
        assert res.pages_read.tolist() == [[len(cache.triple_pages(r, layer, h)) for h in range(2)] for r in rids]


def test_quest_reads_the_forced_window_and_selects_global_pages():
    # budget <= the window: only the forced pages (those covering the window tail) and nothing else
    gp = GatedPipeline(_policy([{"stage": "quest", "budget_tokens": 4}, {"stage": "attend"}]))
    assert [s.name for s in gp.sparse.config.stages] == ["sink_window", "quest", "attend"]
    cache = gp.make_cache(1, 2, 8, 400, dtype=torch.float32, device="cpu")
    rids, K, V, G = _fill(cache, (21, 30), 5, seed=4, admit_p=0.6)
    q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    res = _run(gp, cache, rids, 0, q)
    S = cache.page_size
    for b, rid in enumerate(rids):
        for h in range(2):
            kept = cache.kept_positions(rid, 0, h)
            tail = kept[(int(cache.n_global[0, cache._row[rid], h]) // S) * S:]  # the pages holding the window
            ref = _attention(q[b, 2 * h:2 * h + 2], K[b][0, tail, h], V[b][0, tail, h])
            torch.testing.assert_close(res.out[b, 2 * h:2 * h + 2].float(), ref, rtol=1e-5, atol=1e-5)
    # a budget above every kept token: exact over window + global
    gp = GatedPipeline(_policy([{"stage": "quest", "budget_tokens": 4096}, {"stage": "attend"}]))
    res = _run(gp, cache, rids, 0, q)
    for b, rid in enumerate(rids):
        kept = cache.kept_positions(rid, 0, 1)
        ref = _attention(q[b, 2:4], K[b][0, kept, 1], V[b][0, kept, 1])
        torch.testing.assert_close(res.out[b, 2:4].float(), ref, rtol=1e-5, atol=1e-5)


def test_kv_bytes_count_head_pages_and_summaries():
    gp = GatedPipeline(_policy([{"stage": "quest", "budget_tokens": 8}, {"stage": "attend"}]))
    cache = gp.make_cache(1, 2, 8, 400, dtype=torch.float32, device="cpu")
    rids, *_ = _fill(cache, (21,), 2, seed=5)
    res = _run(gp, cache, rids, 0, torch.randn(1, 2, 8))
    pages = [len(cache.triple_pages(r, 0, h)) for r in rids for h in range(2)]
    want = res.pages_read.sum() * 2 * 4 * 8 * 4 + sum(pages) * 2 * 8 * 4  # K/V pages + key min/max per page
    assert float(gp.kv_bytes_read(res, cache, 0)[0]) == float(want)


def test_config_admission_must_lead_and_plain_cache_refused():
    with pytest.raises(ConfigError, match=r"stages\[1\].*must be the first stage"):
        ckv.compile({"stages": [{"stage": "quest"}, {"stage": "write_gate"}, {"stage": "attend"}]})
    with pytest.raises(ConfigError, match=r"stages\[1\].*only admission stage"):
        ckv.compile({"stages": [{"stage": "write_gate"}, {"stage": "write_gate"}, {"stage": "attend"}]})
    with pytest.raises(ConfigError, match=r"threshold.*out of range"):
        ckv.compile({"stages": [{"stage": "write_gate", "threshold": 1.5}, {"stage": "attend"}]})
    pipe = ckv.compile({"stages": [{"stage": "write_gate"}, {"stage": "attend"}]})
    plain = ckv.PagedKVCache(1, 1, 8, 4)
    with pytest.raises(ckv.TensorContractError, match="GatedKVCache"):
        pipe.plan(plain, [plain.add_sequence()])
    with pytest.raises(ckv.TensorContractError, match="GatedKVCache"):
        GatedPipeline(pipe).plan(plain, [0])


def test_shipped_config_validates():
    pipe = ckv.compile("configs/write_gate_quest_art.yaml")
    assert pipe.admission is not None and pipe.admission.threshold == 0.1
    assert math.isclose(pipe.admission.window_tokens, 256)


@pytest.mark.interpret
@pytest.mark.parametrize("stack", [
    [{"stage": "quest", "budget_tokens": 12}, {"stage": "art", "stop": "certified", "delta": 0.01}],
    [{"stage": "attend"}],
])
def test_fused_triton_equals_reference_on_the_gated_cache(stack):
    from conftest import INTERPRET
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    from composable_kv import fused
    ref = GatedPipeline(_policy(stack, dense_layers=[0]))
    tri = GatedPipeline(ckv.compile({"name": "wg", "page_size": 4, "dense_layers": [0], "stages": [
        {"stage": "write_gate", "window_tokens": 6, "threshold": 0.5}] + stack}, backend="triton"))
    assert fused.spec(tri.sparse).fused
    cache = ref.make_cache(2, 2, 16, 400, dtype=torch.float32, device="cpu")
    rids, *_ = _fill(cache, (9, 37), 6, seed=7)
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
    for layer in range(2):
        a, b = _run(ref, cache, rids, layer, q), _run(tri, cache, rids, layer, q)
        assert torch.equal(a.pages_read, b.pages_read)
        torch.testing.assert_close(a.out, b.out, rtol=2e-4, atol=2e-4)
