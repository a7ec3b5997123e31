"""Paged KV cache: FlashInfer tables, summaries, and the allocator under churn."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import composable_kv as ckv

pytestmark = pytest.mark.cpu
H, D, S = 2, 8, 4


def new_cache(num_pages=12, layers=2):
    return ckv.PagedKVCache(layers, H, D, num_pages, page_size=S, dtype=torch.float32,
                            summaries={"key_minmax", "value_norm"})


def test_flashinfer_tables():
    c = new_cache()
    a, b = c.add_sequence(), c.add_sequence()
    c.append([a, b], [5, 8], torch.randn(2, 13, H, D), torch.randn(2, 13, H, D))
    indptr, indices, last = c.page_table([a, b])
    assert indptr.tolist() == [0, 2, 4]
    assert sorted(indices.tolist()) == [0, 1, 2, 3]
    assert last.tolist() == [1, 4]
    table, lens = c.padded_page_table([b, a])
    assert lens.tolist() == [8, 5] and table.shape == (2, 2)


def test_prefill_then_decode_round_trip_and_summaries():
    c = new_cache()
    a = c.add_sequence()
    k, v = torch.randn(2, 6, H, D), torch.randn(2, 6, H, D)
    c.append([a], [6], k, v)
    k2, v2 = torch.randn(2, 1, H, D), torch.randn(2, 1, H, D)
    c.append([a], [1], k2, v2)
    for layer in range(2):
        gk, gv = c.gather(layer, a)
        torch.testing.assert_close(gk, torch.cat([k[layer], k2[layer]]))
        torch.testing.assert_close(gv, torch.cat([v[layer], v2[layer]]))
    check_summaries(c, a)


def check_summaries(c, sid):
    for layer in range(c.num_layers):
        k, v = c.gather(layer, sid)
        for i, page in enumerate(c.pages(sid)):
            kk, vv = k[i * S:(i + 1) * S], v[i * S:(i + 1) * S]
            torch.testing.assert_close(c.key_min[layer][page], kk.amin(0))
            torch.testing.assert_close(c.key_max[layer][page], kk.amax(0))
            torch.testing.assert_close(c.value_norm[layer][page], vv.norm(dim=-1).amax(0))


def test_out_of_pages_is_clear_and_changes_nothing():
    c = new_cache(num_pages=3)
    a = c.add_sequence()
    c.append([a], [9], torch.randn(2, 9, H, D), torch.randn(2, 9, H, D))
    before = (c.num_free_pages, c.seq_len(a), c.pages(a), [t.clone() for t in c.k])
    b = c.add_sequence()
    with pytest.raises(ckv.CacheFullError, match="needs 2 new pages but 0 of 3 are free"):
        c.reserve([a, b], [4, 1])
    assert (c.num_free_pages, c.seq_len(a), c.pages(a)) == before[:3]
    assert c.seq_len(b) == 0 and all(torch.equal(x, y) for x, y in zip(c.k, before[3]))


@pytest.mark.parametrize("bad,match", [
    (lambda c, s: c.write(0, s, torch.randn(3, H, D + 1), torch.randn(3, H, D + 1)), r"expected shape \[T, Hkv, D\]"),
    (lambda c, s: c.write(0, s, torch.randn(3, H, D).double(), torch.randn(3, H, D).double()), "dtype"),
    (lambda c, s: c.write(7, s, torch.randn(3, H, D), torch.randn(3, H, D)), "layer must be in"),
    (lambda c, s: c.reserve([99], [1]), "sequence 99 is not in the cache"),
    (lambda c, s: c.reserve([0], [-1]), "counts must be ints >= 0"),
])
def test_bad_writes_are_refused(bad, match):
    c = new_cache()
    sid = c.add_sequence()
    slots = c.reserve([sid], [3])
    with pytest.raises((ckv.TensorContractError, KeyError, ValueError), match=match):
        bad(c, slots)


ops = st.lists(st.tuples(st.sampled_from(["admit", "append", "decode", "free"]),
                         st.integers(0, 7), st.integers(1, 11)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_allocator_churn(seq):
    c = new_cache(num_pages=10, layers=1)
    truth: dict[int, tuple[list, list]] = {}
    for op, pick, n in seq:
        live = sorted(truth)
        if op == "admit" or not live:
            truth[c.add_sequence()] = ([], [])
            continue
        sid = live[pick % len(live)]
        if op == "free":
            c.free(sid)
            del truth[sid]
            continue
        n = 1 if op == "decode" else n
        k, v = torch.randn(1, n, H, D), torch.randn(1, n, H, D)
        free_before = c.num_free_pages
        try:
            c.append([sid], [n], k, v)
        except ckv.CacheFullError:
            assert c.num_free_pages == free_before
        else:
            truth[sid][0].append(k[0])
            truth[sid][1].append(v[0])
        # invariants: contents, disjoint pages, pool accounting, summaries
        used = [p for s in truth for p in c.pages(s)]
        assert len(used) == len(set(used)) and len(used) + c.num_free_pages == c.num_pages
        for s, (ks, vs) in truth.items():
            assert c.seq_len(s) == sum(x.shape[0] for x in ks)
            assert len(c.pages(s)) == -(-c.seq_len(s) // S)
            if ks:
                gk, gv = c.gather(0, s)
                torch.testing.assert_close(gk, torch.cat(ks))
                torch.testing.assert_close(gv, torch.cat(vs))
                check_summaries(c, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rebuild_summaries_equals_the_appends(dtype):
    """Every registered summary rebuilt from the pages equals what the appends kept (partial pages too)."""
    from composable_kv import summaries as summ
    c = ckv.PagedKVCache(2, H, D, 16, page_size=S, dtype=dtype, summaries=set(summ.SUMMARIES))
    a, b = c.add_sequence(), c.add_sequence()
    g = torch.Generator().manual_seed(0)
    c.append([a, b], [7, 10], torch.randn(2, 17, H, D, generator=g).to(dtype), torch.randn(2, 17, H, D, generator=g).to(dtype))
    c.append([a, b], [1, 3], torch.randn(2, 4, H, D, generator=g).to(dtype), torch.randn(2, 4, H, D, generator=g).to(dtype))
    names = ["key_min", "key_max", "value_norm"]
    want = {n: [t.clone() for t in getattr(c, n)] for n in names}
    want_shadow = {bits: [t.clone() for t in c.shadow_codes[bits]] for bits in c.shadow_bits}
    for n in names:
        for t in getattr(c, n):
            t.fill_(7.0)
    for bits in c.shadow_bits:
        for t in c.shadow_codes[bits]:
            t.zero_()
    for layer in range(2):
        c.rebuild_summaries(layer, chunk=2)
    used = c.pages(a) + c.pages(b)
    for n in names:
        for got, ref in zip(getattr(c, n), want[n]):
            assert torch.equal(got[used], ref[used]), n
    for bits in c.shadow_bits:
        for got, ref in zip(c.shadow_codes[bits], want_shadow[bits]):
            assert torch.equal(got[used], ref[used])


def test_summaries_are_resolved_with_their_dependencies():
    c = ckv.PagedKVCache(1, H, D, 4, page_size=S, summaries={"key_shadow_int4"})
    assert c.summaries == {"key_shadow_int4", "key_minmax"} and c.value_norm is None
    with pytest.raises(ValueError, match="unknown summaries \\['box'\\]; known: \\['key_minmax'"):
        ckv.PagedKVCache(1, H, D, 4, page_size=S, summaries={"box"})
    with pytest.raises(ValueError, match="head_dim must be even"):
        ckv.PagedKVCache(1, H, 7, 4, page_size=S, summaries={"key_shadow_int4"})


def test_stage_state_lives_with_the_cache_and_forgets_freed_sequences():
    from composable_kv.stages import StageState

    class Rows(StageState):
        def __init__(self):
            self.freed = []

        def free_sequence(self, seq_id):
            self.freed.append(seq_id)

    class Stage:
        def new_state(self, cache):
            return Rows()

    c, stage = new_cache(), Stage()
    a, b = c.add_sequence(), c.add_sequence()
    state = c.stage_state(stage)
    assert c.stage_state(stage) is state  # made once per (cache, stage)
    c.free(a)
    assert state.freed == [a]
    assert new_cache().stage_state(stage) is not state  # another cache, another state
