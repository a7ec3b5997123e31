"""AttentionPredictor: history ring buffer, the stage end to end (reference and interpreted Triton),
batches where requests finish and arrive, a tiny HF model, and a training smoke test."""
import math
import os
from pathlib import Path

import pytest
import torch

import composable_kv as ckv
from composable_kv.kernels.predictor_cnn import reference as cnn_ref
from composable_kv.policies.attention_predictor import train as T
from composable_kv.policies.attention_predictor.predictor import (PageHistory, PredictorCNN, load_weights,
                                                                 prefill_page_mass, save_weights)
from composable_kv.traces import Trace

from helpers import build_cache

ROOT = Path(__file__).resolve().parent.parent
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.fixture(autouse=True)
def reference_cnn_unless_interpret(request, monkeypatch):
    """The stage picks its CNN by composable_kv.kernels.backend_for: the fused Triton kernel under
    TRITON_INTERPRET=1 (seconds a step on the CPU), else the torch reference. Tests not marked
    `interpret` take the reference; the kernel itself: tests/test_predictor_cnn_kernel.py."""
    if request.node.get_closest_marker("interpret") is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_weights(PredictorCNN(), tmp_path_factory.mktemp("ap") / "w.pt"))


def policy(weights, terminal=None, **kw):
    st = {"stage": "attention_predictor", "budget_tokens": 64, "sink_tokens": 16, "recent_tokens": 16,
          "history_steps": 8, "calibrate_every": 3, "weights": weights}
    st.update(kw)
    return {"name": "ap", "page_size": 16, "dense_layers": [0],
            "stages": [st, terminal or {"stage": "attend"}]}


def decode_steps(pipe, cache, ids, steps, *, layers=2, seed=1, group=2, on_step=None):
    g = torch.Generator().manual_seed(seed)
    Hkv, D = cache.num_kv_heads, cache.head_dim
    results = []
    for step in range(steps):
        if on_step is not None:
            ids = on_step(step, ids)
        slots = cache.reserve(ids, [1] * len(ids))
        for layer in range(layers):
            cache.write(layer, slots, torch.randn(len(ids), Hkv, D, generator=g),
                        torch.randn(len(ids), Hkv, D, generator=g))
        pipe.plan(cache, ids)
        q = torch.randn(len(ids), Hkv * group, D, generator=g) * 2
        results.append((list(ids), [pipe.run(q, cache, layer) for layer in range(layers)]))
    return results


def history_of(pipe, cache, layer):
    (stage,) = pipe.selectors
    return cache.stage_state(stage).history[layer]


def rows_of(pipe, cache):
    (stage,) = pipe.selectors
    return cache.stage_state(stage).rows


# -- the ring buffer ----------------------------------------------------------------------------

@pytest.mark.cpu
def test_history_ring_buffer_order_wrap_growth():
    h = PageHistory(heads=2, kv_heads=2, steps=3, device="cpu")
    h.ensure(2, 3)
    rows = torch.tensor([1, 0])
    assert h.window(rows, 3).abs().sum() == 0  # a new row is all zeros
    for step in range(5):  # wrap: 5 pushes into 3 slots
        P = 3 if step < 3 else 5  # the page axis grows mid-way
        h.ensure(2, P)
        h.push(rows, torch.full((2, 2, P), math.log(step + 1)), torch.zeros(2, 2))  # mass step + 1
    w = h.window(rows, 5)  # [B, Hh, H, P], oldest first
    assert w.shape == (2, 2, 3, 5)
    assert w[0, 0, :, 0].tolist() == [3.0, 4.0, 5.0]
    assert w[0, 0, 0, 3:].tolist() == [0.0, 0.0]  # step 3 had 3 pages: no mass beyond
    assert w[0, 0, 1, 3:].tolist() == [4.0, 4.0]
    assert h.steps[rows].tolist() == [5, 5]
    h.ensure(6, 5)  # more rows: the old ones keep their history, the new ones start clean
    assert torch.equal(h.window(rows, 5), w) and h.window(torch.tensor([5]), 5).abs().sum() == 0
    assert torch.isinf(h.scores[5]).all() and h.steps[5] == 0


def check_push(B, R, Hh, group, H, P, cap, *, device="cpu", seed=0):
    """kernels/page_history: the Triton push against the torch reference, twice in a row (the slot moves)."""
    from composable_kv.kernels.page_history import reference as ref, triton as tk
    g = torch.Generator().manual_seed(seed)
    hist = torch.rand(R, Hh, H, cap, generator=g)
    ptr = torch.randint(0, H, (R,), generator=g)
    steps = torch.randint(0, 50, (R,), generator=g)
    rows = torch.randperm(R, generator=g)[:B]
    want = [t.clone() for t in (hist, ptr, steps)]
    got = [t.clone().to(device) for t in (hist, ptr, steps)]
    for _ in range(2):  # log masses with pages not read (-inf) and a head that read nothing (lse -inf)
        unread = torch.rand(B, Hh * group, P, generator=g) < 0.3
        page_lse = torch.randn(B, Hh * group, P, generator=g).masked_fill(unread, float("-inf"))
        lse = torch.logsumexp(page_lse, -1) + torch.rand(B, Hh * group, generator=g)
        page_lse[0, -1], lse[0, -1] = float("-inf"), float("-inf")
        ref.push(*want, rows, page_lse, lse, group)
        tk.push(*got, rows.to(device), page_lse.to(device), lse.to(device), group)
    assert torch.isfinite(want[0]).all()
    for name, w, x in zip(("hist", "ptr", "steps"), want, got):
        torch.testing.assert_close(x.cpu(), w, rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (tests/conftest.py) or CUDA")
@pytest.mark.interpret
@pytest.mark.parametrize("B,R,Hh,group,H,P,cap", [(3, 5, 2, 4, 8, 20, 40), (2, 2, 6, 1, 3, 33, 33),
                                                   (1, 4, 3, 3, 5, 1, 17)])
def test_history_push_kernel_equals_reference(B, R, Hh, group, H, P, cap):
    check_push(B, R, Hh, group, H, P, cap, seed=B + P)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (tests/conftest.py) or CUDA")
@pytest.mark.interpret
@pytest.mark.parametrize("calibrate_every,calibrate_first,run_every", [(5, True, 1), (3, False, 2), (1, True, 4)])
def test_history_clock_kernel_equals_reference(calibrate_every, calibrate_first, run_every):
    check_clock(calibrate_every, calibrate_first, run_every)


def check_clock(calibrate_every, calibrate_first, run_every, *, B=5, R=9, device="cpu"):
    from composable_kv.kernels.page_history import reference as ref, triton as tk
    g = torch.Generator().manual_seed(calibrate_every + run_every)
    steps = torch.randint(0, 12, (R,), generator=g)
    steps[:3] = torch.tensor([0, 1, 1])  # an unseeded first step, a seeded one, an unseeded second
    seeded = torch.rand(R, generator=g) < 0.5
    seeded[1:3] = torch.tensor([True, False])
    scores = torch.randn(R, 2, 7, generator=g)
    scores[torch.rand(R, generator=g) < 0.3, 0, 0] = float("-inf")  # never scored
    rows = torch.cat([torch.arange(3), torch.randperm(R - 3, generator=g)[:B - 3] + 3])
    want = ref.clock(steps, seeded, scores, rows, calibrate_every, calibrate_first, run_every)
    got = tk.clock(*(t.to(device) for t in (steps, seeded, scores, rows)), calibrate_every, calibrate_first, run_every)
    for name, w, x in zip(("calibrate", "due"), want, got):
        assert torch.equal(w, x.cpu()), name
    return want


@pytest.mark.cpu
def test_rows_follow_the_cache_batch_and_are_reused():
    from composable_kv.seq_rows import SequenceRows
    rows = SequenceRows()
    r, fresh = rows.lookup([10, 11], "cpu")
    assert r.tolist() == [0, 1] and fresh == [0, 1]
    again, fresh = rows.lookup([10, 11], "cpu")
    assert again is r and fresh == []  # the same batch: the same tensor (a captured graph keeps it)
    rows.release(10)
    r2, fresh = rows.lookup([11, 12], "cpu")
    assert r2.tolist() == [1, 0] and fresh == [0] and rows.capacity == 2  # the freed row is reused


@pytest.mark.cpu
def test_freed_sequence_row_is_reset_for_the_next(weights):
    pipe = ckv.compile(policy(weights), backend="reference")
    cache, ids, _, _ = build_cache([100, 150], num_layers=2, head_dim=32, extra_pages=40,
                                   summaries=pipe.required_summaries)
    decode_steps(pipe, cache, ids, 2)
    hist, rows = history_of(pipe, cache, 1), rows_of(pipe, cache)
    old = rows.row_of[ids[0]]
    assert hist.steps[old] == 2 and hist.hist[old].abs().sum() > 0
    cache.free(ids[0])  # the cache tells the stage state: the row goes back
    assert ids[0] not in rows.row_of
    sid = cache.add_sequence()
    cache.append([sid], [40], torch.randn(2, 40, 2, 32), torch.randn(2, 40, 2, 32))
    decode_steps(pipe, cache, [ids[1], sid], 1)
    assert rows.row_of[sid] == old and hist.steps[old] == 1  # reused, reset, one step recorded
    assert hist.steps[rows.row_of[ids[1]]] == 3


# -- the stage ----------------------------------------------------------------------------------

@pytest.mark.cpu
def test_stage_calibrates_then_keeps_the_budget(weights):
    pipe = ckv.compile(policy(weights), backend="reference")
    cache, ids, _, _ = build_cache([100, 200, 37], num_layers=2, head_dim=32, extra_pages=8,
                                   summaries=pipe.required_summaries)
    res = decode_steps(pipe, cache, ids, 7)
    for step, (_, outs) in enumerate(res):
        pages = outs[1].pages_read  # [B, Hkv] on the predictor layer
        n = torch.tensor([-(-(L + step + 1) // 16) for L in (100, 200, 37)])
        if step % 3 == 0:  # dense calibration (the first step included)
            assert torch.equal(pages, n[:, None].expand_as(pages).int()), (step, pages)
        else:  # forced sink/recent + best others up to 4 pages (forced pages are kept past it)
            assert (pages <= torch.clamp(n, max=4)[:, None]).all() and (pages >= 1).all(), (step, pages)
        assert torch.equal(outs[0].pages_read, n[:, None].expand_as(pages).int())  # dense layer 0
    hist = history_of(pipe, cache, 1)
    rows = torch.tensor([rows_of(pipe, cache).row_of[s] for s in ids])
    last = hist.window(rows, 16)[:, :, -1]  # [B, Hkv, P]: the masses of the last step
    torch.testing.assert_close(last.sum(-1), torch.ones(3, 2))
    assert (hist.window(rows, 16)[:, :, :-7] == 0).all()  # H=8, 7 steps: the oldest slot is empty


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (tests/conftest.py) or CUDA")
@pytest.mark.interpret
@pytest.mark.parametrize("num_splits", [1, 2])
def test_stage_triton_equals_reference_stacked_with_art(weights, num_splits, monkeypatch):
    """The reference pipeline (torch CNN) against the Triton one (fused CNN kernel, Triton decode)."""
    art = {"stage": "art", "stop": "certified", "delta": 0.05, "chunk_pages": 1}
    out = []
    for backend in ("reference", "triton"):
        if backend == "reference" and not torch.cuda.is_available():
            monkeypatch.delenv("TRITON_INTERPRET")  # backend_for(cpu): the stage's torch CNN
        else:
            monkeypatch.undo()
        pipe = ckv.compile(policy(weights, art), backend=backend)
        (stage,) = pipe.selectors
        assert ("Triton" in stage.describe("cpu")) == (backend == "triton")
        cache, ids, _, _ = build_cache([60, 110], num_layers=2, head_dim=64, extra_pages=8,
                                       summaries=pipe.required_summaries)
        orig = pipe.plan
        pipe.plan = lambda c, i, num_splits=num_splits: orig(c, i, num_splits=num_splits)
        out.append(decode_steps(pipe, cache, ids, 4, group=4))
    for (_, a), (_, b) in zip(*out):
        for ra, rb in zip(a, b):
            assert torch.equal(ra.pages_read, rb.pages_read)
            torch.testing.assert_close(ra.out, rb.out, rtol=2e-4, atol=2e-4)


@pytest.mark.cpu
def test_batch_churn_new_sequence_calibrates(weights):
    pipe = ckv.compile(policy(weights, calibrate_every=4), backend="reference")
    cache, ids, _, _ = build_cache([100, 150], num_layers=2, head_dim=32, extra_pages=40,
                                   summaries=pipe.required_summaries)
    g = torch.Generator().manual_seed(5)

    def churn(step, ids):
        if step == 2:  # request 0 finishes, a fresh 120-token request arrives
            cache.free(ids[0])
            sid = cache.add_sequence()
            cache.append([sid], [120], torch.randn(2, 120, 2, 32, generator=g), torch.randn(2, 120, 2, 32, generator=g))
            return [ids[1], sid]
        return ids

    res = decode_steps(pipe, cache, ids, 4, on_step=churn)
    ids2, outs = res[2]
    n_new = -(-121 // 16)
    assert outs[1].pages_read[1].tolist() == [n_new, n_new]  # the newcomer's first step is dense
    assert outs[1].pages_read[0].max() <= 4  # the old request is mid-cycle
    rows = rows_of(pipe, cache)
    assert set(rows.row_of) == set(ids2)  # the finished request's row was freed (and reused)
    assert len(rows.row_of) + len(rows.free) == rows.capacity == 2


@pytest.mark.cpu
def test_per_query_head_and_run_every(weights, monkeypatch):
    calls = []
    orig = cnn_ref.predictor_scores
    monkeypatch.setattr(cnn_ref, "predictor_scores", lambda *a: calls.append((a[1].shape, a[6])) or orig(*a))
    pipe = ckv.compile(policy(weights, per_kv_head=False, run_every=2), backend="reference")
    (stage,) = pipe.selectors
    assert "torch reference CNN" in stage.describe("cpu") and "run_every 2" in stage.describe("cpu")
    assert f"\nattention_predictor: {stage.describe('cpu')}" in pipe.describe("cpu")  # the policy's describe says it
    cache, ids, _, _ = build_cache([130, 70], num_layers=2, head_dim=32, extra_pages=4,
                                   summaries=pipe.required_summaries)
    decode_steps(pipe, cache, ids, 6, group=3)
    assert len(calls) == 6 and all(rows == (2,) for rows, _ in calls)  # one batched call per step
    assert [due.tolist() for _, due in calls] == [[True, True], [False, False]] * 3  # the clock: odd steps reuse
    assert history_of(pipe, cache, 1).heads == 6  # B x 6 query-head rows


@pytest.mark.cpu
def test_missing_weights_error(tmp_path):
    pipe = ckv.compile(policy(str(tmp_path / "nope.pt")), backend="reference")
    cache, ids, _, _ = build_cache([40], num_layers=2, head_dim=32, summaries=pipe.required_summaries)
    with pytest.raises(FileNotFoundError, match="ckv train-predictor"):
        decode_steps(pipe, cache, ids, 1)


@pytest.mark.cpu
def test_config_validates_and_errors():
    cfg = ckv.load_policy(str(ROOT / "configs" / "attention_predictor_art.yaml"))
    assert [s.name for s in cfg.stages] == ["attention_predictor", "art"]
    with pytest.raises(ckv.ConfigError, match="history_step"):
        ckv.load_policy({"stages": [{"stage": "attention_predictor", "history_step": 3}, {"stage": "attend"}]})
    with pytest.raises(ckv.ConfigError, match="calibrate_every"):
        ckv.load_policy({"stages": [{"stage": "attention_predictor", "calibrate_every": 0}, {"stage": "attend"}]})


@pytest.mark.cpu
def test_tiny_hf_model_decodes_with_the_predictor(weights):
    pytest.importorskip("transformers")
    from helpers import tiny_llama
    from composable_kv import hf
    model = tiny_llama(256)
    pipe = ckv.compile(policy(weights, budget_tokens=48), backend="reference")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (90, 130)]
    out = hf.generate(model, None, prompts, policy=pipe, max_new_tokens=8, stop_at_eos=False)
    assert [len(s) for s in out.sequences] == [8, 8]
    frac = out.kv_read_fraction
    assert all(0 < f < 1 for f in frac), frac  # the non-calibration steps read less than dense



def pooled_prefill_by_hand(q, k, page_size, scale, last):
    """One softmax per (query head, query), keys up to the query's position, summed per page."""
    Hq, T, _ = q.shape
    G, h, P = Hq // k.shape[0], min(last, T), -(-T // page_size)
    out = torch.zeros(Hq, h, P, dtype=torch.float64)
    for hq in range(Hq):
        for i, t in enumerate(range(T - h, T)):
            logits = [float(q[hq, t].double() @ k[hq // G, j].double()) * scale for j in range(t + 1)]
            p = torch.tensor(logits, dtype=torch.float64).softmax(0)
            for j in range(t + 1):
                out[hq, i, j // page_size] += p[j]
    return out


@pytest.mark.cpu
@pytest.mark.parametrize("T,last,group", [(21, 5, 2), (7, 16, 1), (33, 8, 4)])
def test_prefill_page_mass_equals_a_hand_reference(T, last, group):
    g = torch.Generator().manual_seed(T)
    q, k = torch.randn(2 * group, T, 8, generator=g) * 3, torch.randn(2, T, 8, generator=g)
    got = prefill_page_mass(q, k, 4, 0.4, last)  # [Hq, h, P]
    assert got.shape == (2 * group, min(last, T), -(-T // 4))
    torch.testing.assert_close(got.double(), pooled_prefill_by_hand(q, k, 4, 0.4, last), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        prefill_page_mass(torch.randn(3, T, 8), k, 4, 0.4, last)


@pytest.mark.cpu
@pytest.mark.parametrize("calibrate_first", [False, True])
def test_tiny_hf_model_history_starts_from_the_prefill(weights, calibrate_first):
    """The first decode step predicts from the prefill's pooled attention (no forced dense step
    unless calibrate_first);
    decode steps N-1, 2N-1, ... are the calibrations (the prefill is step 0)."""
    pytest.importorskip("transformers")
    from helpers import tiny_llama
    from composable_kv import hf
    model = tiny_llama(256)
    pipe = ckv.compile(policy(weights, budget_tokens=48, calibrate_first=calibrate_first), backend="reference")
    (stage,) = pipe.selectors
    seen = {}
    orig = stage.observe_prefill

    def spy(cache, seq_ids, layer, query, key, valid, sm_scale):
        seen[layer] = (list(seq_ids), query.clone(), key.clone(), None if valid is None else valid.clone(), sm_scale)
        return orig(cache, seq_ids, layer, query, key, valid, sm_scale)

    stage.observe_prefill = spy
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (130, 77)]  # padded batch
    session = hf.PolicySession(model, pipe, max_total_tokens=140, batch_size=2)
    logits = session.prefill(prompts)
    assert sorted(seen) == [1, 2]  # the dense layer 0 is not observed
    for step in range(3):
        logits = session.decode(logits.argmax(-1).tolist())
        if step == 0:
            for layer, (sids, query, key, valid, scale) in seen.items():
                hist = history_of(pipe, session.cache, layer)
                row_of = rows_of(pipe, session.cache).row_of
                for b, sid in enumerate(sids):
                    q, k = query[b][:, valid[b]], key[b][:, valid[b]]
                    ref = pooled_prefill_by_hand(q, k, 16, scale, 8)  # [Hq=4, 8, P]
                    ref = ref.view(2, 2, *ref.shape[1:]).mean(1)  # per KV head: the group's mean
                    w = hist.window(torch.tensor([row_of[sid]]), ref.shape[-1] + 1)[0]  # [2, 8, P+1]
                    # H=8 slots: the decode step overwrote the oldest prefill row
                    torch.testing.assert_close(w[:, :7, :-1].double(), ref[:, 1:], rtol=1e-4, atol=1e-5)
                    assert (w[:, :7, -1] == 0).all()
                    torch.testing.assert_close(w[:, 7].sum(-1), torch.ones(2))  # the decode's own masses
                    assert hist.steps[row_of[sid]] == 2  # the prefill + one decode step
    dense = [sum(-(-(n + s + 1) // 16) for n in (130, 77)) * 2 * 3 for s in range(3)]
    pages = [sum(st.pages_read) for st in session.steps]
    assert (pages[0] == dense[0]) == calibrate_first  # no forced dense first step unless asked
    assert pages[1] < dense[1]
    assert pages[2] == dense[2]  # calibrate_every=3: decode step 2 (the prefill was step 0)

# -- training -------------------------------------------------------------------------------------

@pytest.mark.cpu
def test_page_masses_and_quest_bound_on_a_synthetic_trace():
    tr = Trace.synthetic(layers=1, kv_heads=2, group=2, tokens=70, head_dim=16, num_queries=6)
    sm = 16 ** -0.5
    mass = T.page_masses(tr.q[0], tr.k[0], sm, 64)
    quest = T.quest_page_bound(tr.q[0], tr.k[0], sm, 64)
    for i in range(6):
        pos = 64 + i
        k = tr.k[0, :, :pos + 1].float()  # [Hkv, n, D]
        logits = torch.einsum("hgd,htd->hgt", tr.q[0, i].float().view(2, 2, 16), k) * sm
        w = logits.softmax(-1).mean(1)  # [Hkv, n]
        want = torch.nn.functional.pad(w, (0, 80 - pos - 1)).view(2, 5, 16).sum(-1)
        torch.testing.assert_close(mass[i], want)
        page_max = torch.nn.functional.pad(logits.amax(1), (0, 80 - pos - 1), value=-1e9).view(2, 5, 16).amax(-1)
        n = pos // 16 + 1
        assert (quest[i, :, :n] >= page_max[:, :n] - 1e-4).all()  # Quest's box bound is an upper bound
        assert torch.isinf(quest[i, :, n:]).all()


@pytest.mark.cpu
def test_training_smoke(tmp_path):
    tr = Trace.synthetic(layers=2, kv_heads=2, group=2, tokens=160, head_dim=16, num_queries=40)
    sm = 16 ** -0.5
    data = {"mass": torch.stack([T.page_masses(tr.q[i], tr.k[i], sm, 120) for i in range(2)]),
            "quest": torch.stack([T.quest_page_bound(tr.q[i], tr.k[i], sm, 120) for i in range(2)]),
            "first_pos": 120}
    x, y, m = T.make_samples(data["mass"], 120, history=8, crop_pages=6, budget_pages=3, calibrate_every=3,
                             sink_pages=1, recent_pages=1, num_samples=64)
    assert x.shape == (64, 8, 6) and not torch.isnan(x).any() and (x >= 0).all()
    model = T.train(x, y, m, epochs=1, quiet=True, c1=4, c2=8)
    path = save_weights(model, tmp_path / "w.pt", {"smoke": True})
    again = load_weights(path)
    torch.testing.assert_close(again(x[:4]), model(x[:4]))
    rows = T.recall_table(again, data, budgets=[48], history=8, calibrate_every=3, sink_pages=1, recent_pages=1)
    by = {r["method"]: r for r in rows}
    assert by["oracle"]["page_recall"] == pytest.approx(1.0)
    assert by["oracle"]["mass_recall"] >= max(by["quest"]["mass_recall"], by["predictor"]["mass_recall"]) - 1e-6
    assert 0 < by["predictor"]["mass_recall"] <= 1 and by["predictor"]["steps"] == 40 - 14


@pytest.mark.cpu
def test_train_predictor_command_is_registered():
    from composable_kv.cli import build_parser
    args = build_parser().parse_args(["train-predictor", "--out", "x.pt", "--samples", "10"])
    assert args.samples == 10 and args.func.__name__ == "_cmd_train_predictor"
