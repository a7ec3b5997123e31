"""The paged cache under thousands of random operations (a plain seeded loop; hypothesis covers short
sequences in test_cache.py). Ops: admit, prefill chunk, batched decode step, finish (free), a
reservation too large for the pool. After every op: every live request's K/V equal what was appended,
the page tables partition the pool (no page shared, free list disjoint from used pages), and every
page summary equals a recomputation from the stored tokens. A failed reservation leaves the cache
bit-identical.
"""
import copy
import random

import pytest
import torch

import composable_kv as ckv
from composable_kv.kernels.key_shadow.reference import quantize_pages

pytestmark = pytest.mark.cpu
H, D, S, LAYERS = 2, 4, 4, 2
SUMMARIES = {"key_minmax", "value_norm", "key_shadow_int8", "key_shadow_int4"}


def snapshot(c):
    """Everything the cache holds, bit-exact (raw bytes: uninitialised summaries may hold NaN)."""
    tensors = {name: [t.clone().view(torch.uint8) for t in getattr(c, name)]
               for name in ("k", "v", "key_min", "key_max", "value_norm") if getattr(c, name) is not None}
    return copy.deepcopy((c._free, c._pages, c._len, c._next_id)), tensors


def same_snapshot(a, b):
    return a[0] == b[0] and all(torch.equal(x, y) for name in a[1] for x, y in zip(a[1][name], b[1][name]))


def check_tables(c):
    used = [p for s in c.sequences() for p in c.pages(s)]
    assert len(used) == len(set(used)), "a page is shared by two requests"
    free = c._free
    assert len(free) == len(set(free)), "a page is twice in the free list"
    assert not set(used) & set(free), "a used page is in the free list"
    assert sorted(used + free) == list(range(c.num_pages)), "pages lost or invented"
    for s in c.sequences():
        assert len(c.pages(s)) == -(-c.seq_len(s) // S)


def check_contents(c, truth):
    for s, (ks, vs) in truth.items():
        n = sum(x.shape[1] for x in ks)
        assert c.seq_len(s) == n
        if not n:
            continue
        k_all, v_all = torch.cat(ks, 1), torch.cat(vs, 1)  # [L, n, H, D]
        for layer in range(LAYERS):
            gk, gv = c.gather(layer, s)
            assert torch.equal(gk, k_all[layer]) and torch.equal(gv, v_all[layer]), (s, layer)


def check_summaries(c):
    """Recompute key min/max and max ||v|| of every used page from the stored tokens."""
    tok = torch.zeros(c.num_pages, S, dtype=torch.bool)  # valid slots of each used page
    for s in c.sequences():
        for i, p in enumerate(c.pages(s)):
            tok[p, :min(S, c.seq_len(s) - i * S)] = True
    used = tok.any(-1)
    m = tok[:, None, :, None]  # [pages, 1, S, 1]
    for layer in range(LAYERS):
        k, v = c.k[layer].float(), c.v[layer].float()
        kmin = torch.where(m, k, torch.inf).amin(2)
        kmax = torch.where(m, k, -torch.inf).amax(2)
        vn = torch.where(tok[:, None], v.norm(dim=-1), 0.0).amax(-1)
        assert torch.equal(c.key_min[layer][used].float(), kmin[used]), layer
        assert torch.equal(c.key_max[layer][used].float(), kmax[used]), layer
        assert torch.equal(c.value_norm[layer][used], vn[used]), layer
        for bits in c.shadow_bits:  # low-bit key copy: re-quantized from the page's stored keys and min/max
            codes, step = quantize_pages(c.k[layer][used], c.key_min[layer][used], c.key_max[layer][used],
                                         bits, c.dtype)
            assert torch.equal(c.shadow_step[bits][layer][used], step), (layer, bits)
            valid = tok[used][:, None, :, None].expand_as(codes)  # the written slots only
            assert torch.equal(c.shadow_codes[bits][layer][used][valid], codes[valid]), (layer, bits)


def rand_kv(rng, n, dtype):
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    return (torch.randn(LAYERS, n, H, D, generator=g).to(dtype),
            torch.randn(LAYERS, n, H, D, generator=g).to(dtype))


@pytest.mark.parametrize("dtype,num_ops", [(torch.float32, 3000), (torch.bfloat16, 1000)])
def test_cache_churn(dtype, num_ops):
    rng = random.Random(1234 + num_ops)
    c = ckv.PagedKVCache(LAYERS, H, D, 48, page_size=S, dtype=dtype, summaries=SUMMARIES)
    truth: dict[int, tuple[list, list]] = {}
    counts = dict.fromkeys(["admit", "prefill", "decode", "finish", "full"], 0)
    for _ in range(num_ops):
        op = rng.choices(["admit", "prefill", "decode", "finish", "full"], [2, 3, 6, 2, 1])[0]
        live = sorted(truth)
        if op == "admit" or not live:
            truth[c.add_sequence()] = ([], [])
            op = "admit"
        elif op == "prefill":
            sid, n = rng.choice(live), rng.randint(1, 3 * S + 1)
            k, v = rand_kv(rng, n, dtype)
            try:
                c.append([sid], [n], k, v)
                truth[sid][0].append(k)
                truth[sid][1].append(v)
            except ckv.CacheFullError:
                op = "full"
        elif op == "decode":  # one token for a random subset of the live requests, in one reservation
            batch = rng.sample(live, rng.randint(1, len(live)))
            k, v = rand_kv(rng, len(batch), dtype)
            try:
                c.append(batch, [1] * len(batch), k, v)
                for i, sid in enumerate(batch):
                    truth[sid][0].append(k[:, i:i + 1])
                    truth[sid][1].append(v[:, i:i + 1])
            except ckv.CacheFullError:
                op = "full"
        elif op == "finish":
            sid = rng.choice(live)
            c.free(sid)
            del truth[sid]
        if op == "full":  # a reservation past the pool: clear error, nothing changes
            before = snapshot(c)
            sid = rng.choice(live)
            n = (c.num_free_pages + 1) * S
            with pytest.raises(ckv.CacheFullError, match="out of KV pages.*Nothing was changed"):
                c.append([sid], [n], *rand_kv(rng, n, dtype))
            assert same_snapshot(before, snapshot(c))
        counts[op] += 1
        check_tables(c)
        check_contents(c, truth)
        check_summaries(c)
    assert min(counts.values()) > num_ops // 50, counts  # every kind of op ran many times
