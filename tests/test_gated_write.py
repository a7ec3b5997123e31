"""kernels/gated_write: the Triton decode write of the write-gated cache == its torch reference.

Two gated caches built alike, one writing through the reference and one through the kernel, take the same
prefill (torch, both) and then the same one-token steps; after every step their whole state must be equal:
kept lengths, global counts, ring windows, slot positions, K/V of every reserved page, key min/max (exact),
value norms (fp32, to 1e-5) and key shadows. The grid covers windows not yet full, drops, admissions with
and without a swap, page finalization, dense (admit-all) layers, bf16, a head_dim that is not a power of two,
a ring longer than one scan block, and the gate MLP run inside the kernel. Interpreter on the CPU; the
larger grid (CUDA kernel vs CPU reference) is GPU-marked.
"""
import pytest
import torch

import composable_kv as ckv
from composable_kv.kernels.gated_write import reference as ref_ops
from composable_kv.policies.write_gate import GateMLP
from composable_kv.policies.write_gate.admission import GatedPipeline
from composable_kv.policies.write_gate.gated_cache import GatedKVCache, GatedSlots


def _rope(D: int):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))

    def rope(positions):  # [T] -> cos, sin [T, D] fp32, on the positions' device
        f = positions.float()[:, None] * inv.to(positions.device)[None]
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()
    return rope


def _cache(backend, device, *, L, H, D, S, W, dtype, summaries, gate=None, pages=None):
    return GatedKVCache(L, H, D, pages, S, dtype, device, frozenset(summaries), window_tokens=W, threshold=0.5,
                        gate=gate, rope=_rope(D) if gate is not None else None,
                        gated_layers=range(1, L) if L > 1 else [0],  # layer 0 admits every token when L > 1
                        validate=False, write_backend=backend)


def _events(cache, layer, rids, positions, admit_new):
    """What the next step does per triple (from the oracle's ring step on copies of the state)."""
    rows = cache.batch(rids).rows
    st = ref_ops.ring_step(cache.kept[layer, rows], cache.n_global[layer, rows], cache.ring_slot[layer, rows],
                           cache.ring_admit[layer, rows], positions, admit_new, cache.page_size)
    full = (positions >= cache.window_tokens)[:, None].expand_as(st.swap)
    admitted = st.n_global > st.g0
    return {"not_full": int((~full).sum()), "drop": int((full & ~admitted).sum()), "swap": int(st.swap.sum()),
            "admit_in_place": int((admitted & ~st.swap).sum()), "finalize": int(st.finalize.sum())}


def assert_same_state(a: GatedKVCache, b: GatedKVCache) -> None:
    """Every tensor the write touches, equal (b moved to a's device); the trash page and unreserved pages aside."""
    for name in ("kept", "n_global", "ring_slot", "ring_admit", "pages"):
        assert torch.equal(getattr(a, name), getattr(b, name).to(a.device)), name
    trash = a.trash_slot // a.page_size
    live = torch.zeros(a.pool.num_pages, dtype=torch.bool, device=a.device)
    live[a.pages.flatten().long()] = True
    live[trash] = False
    slots = live.repeat_interleave(a.page_size)
    assert torch.equal(a.slot_pos[slots], b.slot_pos.to(a.device)[slots]), "slot_pos"

    def same(x, y, name, exact=True):
        x, y = x[live], y.to(a.device)[live]
        if exact:
            assert torch.equal(x, y), f"{name}: max |diff| {(x.float() - y.float()).abs().max()}"
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=0, msg=name)
    same(a.pool.k[0], b.pool.k[0], "K")
    same(a.pool.v[0], b.pool.v[0], "V")
    if a.pool.key_min is not None:
        same(a.pool.key_min[0], b.pool.key_min[0], "key_min")
        same(a.pool.key_max[0], b.pool.key_max[0], "key_max")
    if a.pool.value_norm is not None:
        same(a.pool.value_norm[0], b.pool.value_norm[0], "value_norm", exact=False)
    for bits in a.pool.shadow_bits:
        same(a.pool.shadow_codes[bits][0], b.pool.shadow_codes[bits][0], f"shadow codes int{bits}")
        same(a.pool.shadow_step[bits][0], b.pool.shadow_step[bits][0], f"shadow step int{bits}")


def run_pair(lens, steps, admit_p, *, L=2, H=2, D=8, S=4, W=6, dtype=torch.float32,
             summaries=("key_minmax", "value_norm"), mlp=False, devices=("cpu", "cpu"), seed=0):
    """Reference cache on devices[0], kernel cache on devices[1]; same prefill then `steps` one-token steps
    (g given: admit with probability admit_p; or mlp: a GateMLP that the kernel runs). Compares after every
    step and returns the events the steps went through (summed over layers, requests, heads)."""
    gen = torch.Generator().manual_seed(seed)
    n_tok = max(lens) + steps
    pages = len(lens) * L * H * (-(-n_tok // S)) + 1
    gate = None
    if mlp:
        torch.manual_seed(seed)
        gate = GateMLP(L, H, D, hidden=8)
        with torch.no_grad():
            gate.w2.mul_(4.0)
            gate.mu.normal_(0, 0.1)
            gate.sigma.uniform_(0.5, 2.0)
    ref = _cache("reference", devices[0], L=L, H=H, D=D, S=S, W=W, dtype=dtype, summaries=summaries,
                 gate=None if gate is None else gate.to(devices[0]), pages=pages)
    tri = _cache("triton", devices[1], L=L, H=H, D=D, S=S, W=W, dtype=dtype, summaries=summaries,
                 gate=None if gate is None else GateMLP(L, H, D, hidden=8).to(devices[1]), pages=pages)
    if gate is not None:
        tri.gate.load_state_dict(gate.state_dict())
    K = torch.randn(len(lens), n_tok, L, H, D, generator=gen).to(dtype)
    V = torch.randn(len(lens), n_tok, L, H, D, generator=gen).to(dtype)
    G = (torch.rand(len(lens), n_tok, L, H, generator=gen) < admit_p).float()
    rids = {}
    for c in (ref, tri):
        rids[c] = [c.add_sequence() for _ in lens]
        slots = c.reserve(rids[c], list(lens))
        for layer in range(L):
            cat = lambda X: torch.cat([X[b, :n, layer] for b, n in enumerate(lens)]).to(c.device)  # noqa: E731
            c.write(layer, slots, cat(K), cat(V), g=cat(G))  # the prefill: torch on both
    assert_same_state(ref, tri)
    events = dict.fromkeys(["not_full", "drop", "swap", "admit_in_place", "finalize"], 0)
    B = len(lens)
    for t in range(steps):
        idx = torch.tensor([n + t for n in lens])
        for c in (ref, tri):
            slots = c.reserve(rids[c], [1] * B)
            for layer in range(L):
                k, v = K[torch.arange(B), idx, layer].to(c.device), V[torch.arange(B), idx, layer].to(c.device)
                gated = layer in c.gated_layers
                g = None if mlp else G[torch.arange(B), idx, layer].to(c.device)
                if c is ref:
                    if not gated:
                        admit = torch.ones(B, H, dtype=torch.bool)
                    elif mlp:
                        gv = ref_ops.gate_values(k, *ref.rope(slots.positions), gate.layer_weights(layer))
                        assert (gv - 0.5).abs().min() > 1e-5, "a gate value at the threshold: pick another seed"
                        admit = gv > 0.5
                    else:
                        admit = g > 0.5
                    for key, n in _events(ref, layer, rids[ref], slots.positions, admit).items():
                        events[key] += n
                c.write(layer, slots, k, v, g=g)
        assert_same_state(ref, tri)
    return events


GRID = [  # lens, steps, admit_p, params, events the case must reach
    ((3, 11, 7), 12, 0.5, {}, {"not_full", "drop", "swap", "admit_in_place", "finalize"}),
    ((2, 9), 10, 0.9, dict(H=3, D=16, S=2, W=5), {"swap", "finalize"}),
    ((12, 4), 10, 0.3, dict(H=1, D=6, S=8, W=9, dtype=torch.bfloat16), {"not_full", "drop", "swap", "finalize"}),
    ((9,), 12, 0.6, dict(summaries=("key_minmax", "key_shadow_int8", "value_norm"), W=4),
     {"drop", "swap", "finalize"}),
    ((5, 6), 8, 1.0, dict(W=1, S=2), {"admit_in_place", "finalize"}),
    ((5, 6), 8, 0.0, dict(W=3, summaries=()), {"drop"}),
    ((600,), 6, 0.5, dict(L=1, H=1, D=4, S=16, W=590), {"swap"}),  # the ring scan takes two blocks of 512
]


@pytest.mark.interpret
@pytest.mark.parametrize("lens,steps,admit_p,params,must", GRID, ids=[f"case{i}" for i in range(len(GRID))])
def test_kernel_equals_reference(lens, steps, admit_p, params, must):
    from conftest import INTERPRET
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU kernel run)")
    events = run_pair(lens, steps, admit_p, **params)
    missing = {e for e in must if events[e] == 0}
    assert not missing, f"the case never reached {missing}: {events}"


@pytest.mark.interpret
def test_gate_mlp_in_the_kernel_equals_reference():
    """The gate run inside the kernel (undo RoPE, standardize, MLP, sigmoid) decides like the torch gate."""
    from conftest import INTERPRET
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    events = run_pair((10, 4, 7), 10, 0.5, D=8, W=5, mlp=True, seed=3)
    assert events["swap"] > 0 and events["drop"] > 0 and events["finalize"] > 0


@pytest.mark.interpret
def test_gate_values_and_touched_pages_equal():
    """One step through the two ops directly: g (fp32, to 1e-6) and the pages each reports written."""
    from conftest import INTERPRET
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    from composable_kv.kernels.gated_write import triton as tri_ops
    torch.manual_seed(0)
    H, D, S, W = 2, 8, 4, 5
    caches = [_cache(b, "cpu", L=2, H=H, D=D, S=S, W=W, dtype=torch.float32, summaries=("key_minmax",),
                     gate=GateMLP(2, H, D, hidden=8), pages=200) for b in ("reference", "triton")]
    caches[1].gate.load_state_dict(caches[0].gate.state_dict())
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(2, 28, H, D, generator=gen)
    pre_g = torch.rand(28, H, generator=gen)
    for c in caches:
        rids = [c.add_sequence() for _ in range(3)]
        c.write(1, c.reserve(rids, [13, 6, 9]), pre[0], pre[1], g=pre_g)
    k = torch.randn(3, H, D, generator=gen)
    v = torch.randn(3, H, D, generator=gen)
    pos = torch.tensor([13, 6, 9])
    out = []
    for c, ops in zip(caches, (ref_ops, tri_ops)):
        batch = c.batch(c.sequences())
        cos, sin = c.rope(pos)
        g_out = torch.full((3, H), -1.0)
        touched = ops.gated_write(k, v, pos, batch.rows, batch.tables[1], c.kept[1], c.n_global[1], c.ring_slot[1],
                                  c.ring_admit[1], c.slot_pos, c.pool.k[0], c.pool.v[0], *c.pool.summary_tensors(0),
                                  trash_page=c.trash_slot // S, threshold=0.5, gate=c.gate.layer_weights(1),
                                  cos=cos, sin=sin, g_out=g_out)
        out.append((g_out, touched))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-6)
    assert (out[0][0] >= 0).all()
    assert torch.equal(out[1][1], out[0][1])
    assert_same_state(*caches)


def test_backend_choice_is_named():
    pol = {"name": "wg", "page_size": 4, "stages": [{"stage": "write_gate", "window_tokens": 6}, {"stage": "attend"}]}
    for backend, words in (("triton", "one Triton kernel a layer"), ("reference", "torch reference")):
        gp = GatedPipeline(ckv.compile(pol, backend=backend))
        cache = gp.make_cache(1, 1, 8, 16, dtype=torch.float32, device="cpu")
        assert cache.write_backend == backend
        assert words in cache.write_path and words in cache.fused_write
        assert words.split()[-1] in gp.describe("cpu")
    with pytest.raises(ValueError, match="write_backend"):
        GatedKVCache(1, 1, 8, 16, write_backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("admit_p", [0.1, 0.6])
@pytest.mark.parametrize("mlp", [False, True])
def test_kernel_equals_reference_gpu(admit_p, mlp):
    """CUDA kernel vs the CPU reference, Llama-8B-like heads: B=16, H=8, D=128, W=64, pages of 16, bf16, 48 steps."""
    lens = tuple(40 + 23 * i for i in range(16))
    events = run_pair(lens, 48, admit_p, L=2, H=8, D=128, S=16, W=64, dtype=torch.bfloat16, mlp=mlp,
                      devices=("cpu", "cuda"), seed=7)
    assert events["swap"] > 0 and events["finalize"] > 0 and events["drop"] > 0
