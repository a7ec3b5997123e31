"""attention_predictor and ltri on the device: equal to their host implementation (tests/host_seed_reference.py)
piece by piece and end to end, on the HF device decode path too, with no host sync in a decode step."""
import os

import pytest
import torch

import composable_kv as ckv
from composable_kv.kernels.span_score import reference as span_ref
from composable_kv.pipeline import LayerContext
from composable_kv.policies.ltri import spans as sp

import host_seed_reference as host
from helpers import build_cache, no_host_sync

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]


# -- ltri's pieces against the host code ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [1, 2, 5])
def test_parallel_nms_equals_greedy(seed, radius):
    g = torch.Generator().manual_seed(seed)
    P = 90
    s = torch.randn(P, generator=g)
    s[torch.randint(0, P, (8,), generator=g)] = float("-inf")
    s[10:20] = torch.linspace(1.0, 0.1, 10)  # a monotone run: one kept peak per round
    s[40:44] = 0.5  # ties: lower position first
    for level in (-0.5, 0.0, 0.3):
        got = sp.nms_1d(s, radius, torch.tensor(level)).nonzero().flatten()
        assert torch.equal(got, host.host_nms_1d(s, radius, level)), (level, got)


@pytest.mark.parametrize("seed", range(6))
def test_span_ids_equal_host_cuts_and_splits(seed):
    g = torch.Generator().manual_seed(seed)
    P = int(torch.randint(5, 60, (1,), generator=g))
    start = int(torch.randint(0, 3, (1,), generator=g))
    max_pages = int(torch.randint(1, 9, (1,), generator=g))
    marks = torch.rand(P, generator=g) < 0.2
    ids, num = sp.span_ids(marks, start, P, max_pages)
    starts, ends = host.host_spans_from_boundaries(marks.nonzero().flatten(), start, P, max_pages)
    a, z = sp.span_bounds(ids, int(num))
    assert int(num) == len(starts) and torch.equal(a, starts) and torch.equal(z, ends)
    assert (ids[:start] == -1).all()


def _build_both(q, k, **kw):
    new = sp.build_index(q, k, covered=kw["end_page"], **kw)
    old = host.host_build_index(q, k, **kw)
    return new, old


@pytest.mark.parametrize("with_queries", [True, False])
@pytest.mark.parametrize("T,sink,max_span", [(16 * 40 + 5, 1, 3), (16 * 23, 2, 8), (16 * 3, 1, 8), (20, 4, 8)])
def test_build_index_equals_host(with_queries, T, sink, max_span):
    g = torch.Generator().manual_seed(T)
    topics = torch.randn(6, 16, generator=g) * 2
    which = torch.randint(0, 6, (T // 37 + 1,), generator=g).repeat_interleave(37)[:T]
    k = topics[which][None].repeat(2, 1, 1) + 0.5 * torch.randn(2, T, 16, generator=g)
    q = topics[which][None].repeat(4, 1, 1) + 0.5 * torch.randn(4, T, 16, generator=g)
    kw = dict(page_size=16, sink_pages=sink, end_page=T // 16, reps_per_span=3, window=3, nms_radius=2,
              min_score=0.02, max_span_pages=max_span, obs_queries=8 if with_queries else 0, sm_scale=0.25,
              dtype=torch.float32)
    new, old = _build_both(q if with_queries else None, k, **kw)
    n = int(new.num_spans)
    assert n == old.num_spans and torch.equal(new.starts, old.starts) and torch.equal(new.ends, old.ends)
    torch.testing.assert_close(new.reps[:, :n], old.reps, rtol=1e-5, atol=1e-5)


# -- the stages end to end against the host implementation --------------------------------------------

def _ltri_pol(**kw):
    st = {"stage": "ltri", "budget_tokens": 80, "sink_tokens": 16, "max_span_pages": 3, "decode_span_pages": 2, **kw}
    return {"name": "ltri", "page_size": 16, "stages": [st, {"stage": "art", "stop": "certified", "delta": 0.05,
                                                             "chunk_pages": 1}]}


def _ap_pol(**kw):
    st = {"stage": "attention_predictor", "budget_tokens": 64, "sink_tokens": 16, "recent_tokens": 16,
          "history_steps": 8, "calibrate_every": 3, **kw}
    return {"name": "ap", "page_size": 16, "dense_layers": [0], "stages": [st, {"stage": "attend"}]}


def run_steps(pipe, steps, *, lens, churn_at=None, layers=2, group=2, seed=1):
    """Decode `steps` random steps; at step `churn_at` request 0 finishes and a 70-token one arrives.
    Returns per step and layer (order, count, out, pages_read)."""
    cache, ids, _, _ = build_cache(lens, num_layers=layers, head_dim=32, extra_pages=40,
                                   summaries=pipe.required_summaries)
    g = torch.Generator().manual_seed(seed)
    Hkv, D = cache.num_kv_heads, cache.head_dim
    out = []
    for step in range(steps):
        if step == churn_at:
            cache.free(ids[0])
            sid = cache.add_sequence()
            cache.append([sid], [70], torch.randn(layers, 70, Hkv, D, generator=g),
                         torch.randn(layers, 70, Hkv, D, generator=g))
            ids = [ids[1], sid] + ids[2:]
        slots = cache.reserve(ids, [1] * len(ids))
        for layer in range(layers):
            cache.write(layer, slots, torch.randn(len(ids), Hkv, D, generator=g), torch.randn(len(ids), Hkv, D, generator=g))
        plan = pipe.plan(cache, ids)
        q = torch.randn(len(ids), Hkv * group, D, generator=g) * 2
        for layer in range(layers):
            order, count, _ = pipe.select(LayerContext(q, cache, layer, plan, D ** -0.5))  # (selection is idempotent)
            res = pipe.run(q, cache, layer)
            out.append((order, count, res.out, res.pages_read))
    return out


def assert_same_steps(a, b):
    for i, ((oa, ca, xa, pa), (ob, cb, xb, pb)) in enumerate(zip(a, b)):
        assert torch.equal(pa, pb), (i, pa, pb)
        assert torch.equal(ca, cb), i
        for bb in range(ca.shape[0]):
            for h in range(ca.shape[1]):
                n = int(ca[bb, h])
                assert oa[bb, h, :n].tolist() == ob[bb, h, :n].tolist(), (i, bb, h)
        torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vote,kernels", [("group", False), ("layer", False), ("group", True)])
def test_ltri_stage_equals_host_over_decode_steps(vote, kernels, monkeypatch):
    """Sequences first met at decode (index from the cache's keys), spans closed by decode tokens,
    a finished request replaced mid-run. kernels: ltri's Triton kernels (span scores, window k-means) under
    TRITON_INTERPRET, as on the GPU."""
    if kernels:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("TRITON_INTERPRET is not set (tests/conftest.py sets it on a machine without CUDA)")
        monkeypatch.setattr(sp, "FORCE_TRITON", True)
    pipe = ckv.compile(_ltri_pol(vote=vote), backend="reference")
    # decode spans (2 pages of 16) close at steps 26 and 33; the interpreted kernels take ~3 s a step
    steps = 34 if kernels else 40
    got = run_steps(pipe, steps, lens=[100, 230, 47], churn_at=17)
    want = run_steps(host.host_pipeline(pipe), steps, lens=[100, 230, 47], churn_at=17)
    assert_same_steps(got, want)


@pytest.fixture
def reference_cnn(monkeypatch):
    """attention_predictor's CNN in torch (composable_kv.kernels.backend_for(cpu) without TRITON_INTERPRET):
    the interpreted kernel takes seconds a step, and the interpreter copies tensors to the host, which the
    no-host-sync guard would flag (on CUDA the kernel is one device launch)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.usefixtures("reference_cnn")
@pytest.mark.parametrize("kw", [{}, {"per_kv_head": False, "run_every": 2}, {"calibrate_first": False}])
def test_attention_predictor_stage_equals_host_over_decode_steps(kw):
    pipe = ckv.compile(_ap_pol(**kw), backend="reference")
    got = run_steps(pipe, 9, lens=[100, 200, 37], churn_at=4)
    want = run_steps(host.host_pipeline(pipe), 9, lens=[100, 200, 37], churn_at=4)
    assert_same_steps(got, want)
    assert any((p < 7).any() for *_, p in got)  # some steps read less than every page


@pytest.mark.interpret
@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_attention_predictor_fused_cnn_equals_host_over_decode_steps():
    """The stage on the fused Triton CNN (rows off their run_every turn skipped in the kernel) decodes as
    the host code, which ran the torch CNN on the due rows only."""
    pipe = ckv.compile(_ap_pol(run_every=2, history_steps=4), backend="reference")
    assert "fused Triton CNN" in pipe.selectors[0].describe("cpu")
    got = run_steps(pipe, 5, lens=[100, 37], churn_at=3)
    want = run_steps(host.host_pipeline(pipe), 5, lens=[100, 37], churn_at=3)
    assert_same_steps(got, want)


# -- the HF device decode path ------------------------------------------------------------------------

def test_no_host_sync_guard_catches_syncs():
    x = torch.arange(4)
    with no_host_sync():
        for bad in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.any()), lambda: x[x > 1],
                    lambda: x.nonzero()):
            with pytest.raises(AssertionError, match="host sync"):
                bad()
        assert torch.equal(x[torch.tensor([1, 2])], torch.tensor([1, 2]))  # an index tensor is fine
    assert x.sum().item() == 6


def guard_stage(stage, monkeypatch, calls):
    """Run the stage's per-step hooks under no_host_sync (the decode kernels are other code)."""
    for name in ("plan_forced", "apply", "observe_page_mass"):
        orig = getattr(stage, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            with no_host_sync():
                return _orig(*a, **k)
        monkeypatch.setattr(stage, name, wrapped)


STACKS = {
    "ltri": {"name": "ltri", "page_size": 16, "dense_layers": [0], "stages": [
        {"stage": "ltri", "budget_tokens": 48, "sink_tokens": 16, "max_span_pages": 2, "decode_span_pages": 1},
        {"stage": "art", "stop": "certified", "delta": 0.05, "chunk_pages": 1}]},
    "attention_predictor": {"name": "ap", "page_size": 16, "dense_layers": [0], "stages": [
        {"stage": "attention_predictor", "budget_tokens": 48, "sink_tokens": 16, "recent_tokens": 16,
         "history_steps": 8, "calibrate_every": 3}, {"stage": "attend"}]},
}


@pytest.fixture(scope="module")
def tiny_model():
    pytest.importorskip("transformers")
    from helpers import tiny_llama
    return tiny_llama(256)


def _generate(model, pipe, path, steps=10):
    from composable_kv import hf
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (130, 77, 77)]
    return hf.generate(model, None, prompts, policy=pipe, max_new_tokens=steps, stop_at_eos=False, decode_path=path)


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_hf_device_path_equals_the_host_implementation(tiny_model, stack, monkeypatch):
    """The device step (the graph's ops, eager on CPU) decodes exactly as the old host code on the host
    path: same tokens, same pages and bytes per step; and the stage's hooks never sync with the host."""
    if stack == "attention_predictor":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch CNN: see the reference_cnn fixture
    pipe = ckv.compile(STACKS[stack], backend="reference")
    calls = []
    guard_stage(pipe.selectors[0], monkeypatch, calls)
    dev = _generate(tiny_model, pipe, "auto")
    assert dev.decode_path == "device"  # graph-safe: auto picks the device step (the graph on CUDA)
    assert {"apply", "plan_forced"} <= set(calls)
    ref = _generate(tiny_model, host.host_pipeline(pipe), "host")
    assert ref.decode_path == "host"
    assert dev.sequences == ref.sequences
    assert [s.kv_bytes_read for s in dev.steps] == [s.kv_bytes_read for s in ref.steps]
    assert any(r < d for s in dev.steps for r, d in zip(s.kv_bytes_read, s.dense_kv_bytes))


def test_span_kernel_reads_table_rows():
    """span_scores(rows=...) on tables (reps sliced along NS, span counts) equals the reference on the gathered rows."""
    from composable_kv.kernels.span_score import triton as span_tk
    g = torch.Generator().manual_seed(0)
    table = torch.randn(5, 2, 40, 3, 64, generator=g)
    rows, ns = torch.tensor([3, 0, 4]), torch.tensor([5, 7, 1, 3, 25])  # ns: the table's span counts
    q = torch.randn(3, 8, 64, generator=g)
    want = span_ref.span_scores(q, table[rows][:, :, :30], ns[rows], 0.125)
    assert torch.isfinite(want[0, :, :3]).all() and torch.isinf(want[0, :, 3:]).all()
    torch.testing.assert_close(span_ref.span_scores(q, table[:, :, :30], ns, 0.125, rows=rows), want)
    if not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    got = span_tk.span_scores(q, table[:, :, :30], ns, 0.125, rows=rows)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)
