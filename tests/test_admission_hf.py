"""Write-gated admission end to end on a tiny Llama: the gate's training target, the trainer, and
decoding through hf.generate / teacher forcing with a write_gate policy."""
import pytest
import torch

pytest.importorskip("transformers")
from helpers import no_host_sync, tiny_llama  # noqa: E402

import composable_kv as ckv  # noqa: E402
from composable_kv import hf  # noqa: E402
from composable_kv.policies.write_gate import train as gate_train  # noqa: E402
from composable_kv.policies.write_gate import GateMLP  # noqa: E402

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(256)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in (70, 45)]


def test_capture_target_matches_eager_attention(tiny, tokens):
    W, F = 8, 10
    data = gate_train.capture(tiny, tokens[:1], window=W, min_future=F, tau_mass=0.05)
    T = len(tokens[0])
    n = T - W - F
    assert data.x.shape == (3, 2, n, 32) and data.y.shape == (3, 2, n)
    tiny.set_attn_implementation("eager")
    try:
        out = tiny(torch.tensor(tokens[:1]), output_attentions=True, use_cache=False)
    finally:
        tiny.set_attn_implementation("sdpa")
    for layer, att in enumerate(out.attentions):  # [1, Hq, T, T]
        a = att[0].view(2, 2, T, T).amax(1)  # max over each KV head's query group
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        m = a.masked_fill(i - j < W, 0).amax(1)[:, :n]  # [H, n]
        torch.testing.assert_close(data.m[layer], m, rtol=1e-4, atol=1e-6)
    # features: post-RoPE half is the cache's key, pre-RoPE half is the k_proj output
    h = tiny.model.embed_tokens(torch.tensor(tokens[:1]))
    k_pre = tiny.model.layers[0].self_attn.k_proj(tiny.model.layers[0].input_layernorm(h))[0].view(T, 2, 16)
    torch.testing.assert_close(data.x[0, :, :, :16], k_pre[:n].transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_trainer_learns_a_key_rule_and_weights_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 400, 16, generator=g)
    y = x[..., 3] + 0.5 * x[..., 9] > 0.4  # a rule the gate can read off the key
    data = gate_train.GateData(x, y, y.float())
    gate = GateMLP(2, 3, 8, hidden=16)
    losses = gate_train.train(gate, data, steps=150, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    ev = gate_train.evaluate_gate(gate, data, threshold=0.5)
    assert ev["recall"] > 0.9 and abs(ev["admitted"] - ev["positive"]) < 0.1
    gate.save(tmp_path / "g.pt", {"note": "test"})
    back = GateMLP.load(tmp_path / "g.pt", num_layers=2, num_kv_heads=3, head_dim=8)
    k = torch.randn(5, 3, 8)
    torch.testing.assert_close(back(1, k, k), gate(1, k, k))
    with pytest.raises(ValueError, match="train them for this model"):
        GateMLP.load(tmp_path / "g.pt", num_layers=3, num_kv_heads=3, head_dim=8)
    with pytest.raises(FileNotFoundError, match="ckv train-gate"):
        GateMLP.load(tmp_path / "none.pt", num_layers=2, num_kv_heads=3, head_dim=8)


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_retrieval_windows_put_a_labelled_fact_and_its_question_in_each_window():
    text = "".join(f"Sentence number {i} of a plain essay. " for i in range(400))
    length, labelled = 300, 180
    windows = gate_train.retrieval_windows(_CharTokenizer(), text, 4, length, labelled, seed=3)
    assert len(windows) == 4
    for ids, span in windows:
        s = "".join(map(chr, ids))
        fact = s[span[0]:span[-1] + 1]
        assert len(ids) == length and span == list(range(span[0], span[-1] + 1)) and span[-1] < labelled
        assert any(ch.isdigit() for ch in fact) and " the " in fact and s.endswith(".") and fact.split()[-1].rstrip(".") in s[-12:]
        assert "special magic number" not in s  # unlike the evaluation's needle
    with pytest.raises(ValueError, match="raise --seq-len"):
        gate_train.retrieval_windows(_CharTokenizer(), text, 1, 120, 20)


def test_loss_weight_makes_the_gate_keep_rare_weighted_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 2000, 8, generator=g)
    rare = x[0, 0, :, 2] > 2.0  # ~2% of tokens
    y = (x[..., 2] > 2.0) & (x[..., 5] > -1.0)
    recall = {}
    for weight in (1.0, 30.0):
        w = torch.where(rare, weight, 1.0)
        torch.manual_seed(0)
        gate = GateMLP(1, 2, 4, hidden=8)
        gate_train.train(gate, gate_train.GateData(x, y, y.float(), w), steps=60, lr=1e-2)
        recall[weight] = gate_train.needle_admitted(gate, gate_train.GateData(x, y, y.float()), rare & y[0, 0], 0.5)
    assert recall[30.0] > recall[1.0] + 0.2


def _gate_file(tmp_path, bias: float):
    gate = GateMLP(3, 2, 16, hidden=8)
    with torch.no_grad():
        gate.b2.fill_(bias)
    path = tmp_path / f"gate{bias}.pt"
    gate.save(path, {})
    return str(path)


def _policy(weights, threshold, stack, dense_layers=()):
    return ckv.compile({"name": "wg", "page_size": 8, "dense_layers": list(dense_layers), "stages": [
        {"stage": "write_gate", "threshold": threshold, "window_tokens": 16, "weights": weights}] + stack},
        backend="reference")


def test_admit_all_decodes_like_dense(tiny, tokens, tmp_path):
    dense = ckv.compile({"name": "d", "page_size": 8, "stages": [{"stage": "attend"}]}, backend="reference")
    gated = _policy(_gate_file(tmp_path, 20.0), 0.1, [{"stage": "attend"}])
    a = hf.generate(tiny, None, tokens, policy=dense, max_new_tokens=12, stop_at_eos=False)
    b = hf.generate(tiny, None, tokens, policy=gated, max_new_tokens=12, stop_at_eos=False)
    assert a.sequences == b.sequences
    ctx, cont = tokens[0][:50], tokens[0][50:]
    la, _ = hf.teacher_forced_logits(tiny, ctx, cont, dense)
    lb, _ = hf.teacher_forced_logits(tiny, ctx, cont, gated)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def test_gate_drops_tokens_and_stacks_with_quest_art(tiny, tokens, tmp_path):
    weights = _gate_file(tmp_path, -20.0)  # g ~ 0: nothing leaves the window into the global pages
    stack = [{"stage": "quest", "budget_tokens": 32}, {"stage": "art", "stop": "certified", "delta": 0.01}]
    session = hf.PolicySession(tiny, _policy(weights, 0.1, stack, dense_layers=[0]), max_total_tokens=90,
                               batch_size=2)
    try:
        session.prefill(tokens)
        for _ in range(5):
            logits = session.decode([3, 4])
        assert torch.isfinite(logits).all()
        cache = session.cache
        for rid, n in zip(session.seq_ids, (75, 50)):
            assert cache.seq_len(rid) == n
            assert sorted(cache.kept_positions(rid, 0, 1)) == list(range(n))  # dense layer: every token
            for layer in (1, 2):
                assert sorted(cache.kept_positions(rid, layer, 0)) == list(range(n - 16, n))
        st = cache.stats()
        assert st["admitted"] == 0 and st["evicted"] == 2 * 2 * ((75 - 16) + (50 - 16))
        assert st["pages_used"] < st["dense_pages"]
        assert all(s.pages_read[0] > 0 for s in session.steps)
    finally:
        session.close()
    assert session.cache.pages_used() == 0


def test_missing_weights_name_the_command(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckv train-gate"):
        hf.PolicySession(tiny, _policy(str(tmp_path / "nope.pt"), 0.1, [{"stage": "attend"}]), max_total_tokens=32,
                         batch_size=1)


def _random_gate_file(tmp_path):
    """Random gate weights that admit part of the tokens (about half at threshold 0.5 on the tiny model)."""
    torch.manual_seed(5)
    gate = GateMLP(3, 2, 16, hidden=8)
    with torch.no_grad():
        gate.w2.mul_(4.0)
    path = tmp_path / "random_gate.pt"
    gate.save(path, {})
    return str(path)


DEVICE_STACKS = {
    "attend": ([], [{"stage": "attend"}]),
    "quest_art": ([0], [{"stage": "quest", "budget_tokens": 32}, {"stage": "art", "stop": "certified", "delta": 0.01}]),
}


def _session_run(model, policy, prompts, feed, path):
    s = hf.PolicySession(model, policy, max_total_tokens=110, batch_size=len(prompts), decode_path=path)
    try:
        assert s.decode_path == path and f"decode path: {path}" in s.describe()
        logits = [s.prefill(prompts)]
        for t in range(feed.shape[0]):
            logits.append(s.decode(feed[t]))
        kept = {(b, layer, h): s.cache.kept_positions(rid, layer, h) for b, rid in enumerate(s.seq_ids)
                for layer in range(3) for h in range(2)}
        return torch.stack(logits), kept, s.steps, s.cache.stats()
    finally:
        s.close()


@pytest.mark.parametrize("stack", sorted(DEVICE_STACKS))
def test_device_path_equals_host_path(tiny, tmp_path, stack):
    """The device-planned step (what the CUDA graph captures) keeps the same tokens and gives the same logits
    and read statistics as per-step host planning."""
    dense, stages = DEVICE_STACKS[stack]
    policy = _policy(_random_gate_file(tmp_path), 0.5, stages, dense_layers=dense)
    assert policy.graph_safe and policy.host_synced_stages == []
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (70, 33)]
    feed = torch.randint(1, 96, (24, 2), generator=g)
    host = _session_run(tiny, policy, prompts, feed, "host")
    dev = _session_run(tiny, policy, prompts, feed, "device")
    torch.testing.assert_close(dev[0], host[0], rtol=1e-5, atol=1e-5)
    assert dev[1] == host[1] and dev[2] == host[2] and dev[3] == host[3]
    st = dev[3]
    assert 0 < st["admitted"] < st["evicted"]  # the gate admits some tokens and drops others
    if stack != "attend":
        assert any(r < d for x in dev[2] for r, d in zip(x.kv_bytes_read, x.dense_kv_bytes))


@pytest.mark.interpret
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("path", ["host", "device"])
def test_fused_layers_equal_modules(tmp_path, family, path):
    """A write_gate session on the fused decode layers (rotary op, then the gated cache's write) gives the
    modules' logits and greedy tokens, keeps the same tokens and reads the same pages and bytes (fp32)."""
    from tiny_families import tiny_family
    model = tiny_family(family, window=1024)  # windows wider than the session: the policy reads every layer
    dense, stages = DEVICE_STACKS["quest_art"]
    policy = _policy(_random_gate_file(tmp_path), 0.5, stages, dense_layers=dense)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (40, 23)]
    runs = {}
    for layers in ("fused", "modules"):
        s = hf.PolicySession(model, policy, max_total_tokens=60, batch_size=2, decode_path=path, layers=layers)
        try:
            assert s.layers == layers and f"decode layers: {layers}" in s.describe()
            logits = s.prefill(prompts)
            rows = []
            for _ in range(10):  # the 16-token window is full from the first step: tokens leave every step
                logits = s.decode(logits.argmax(-1))
                rows.append(logits)
            kept = [s.cache.kept_positions(rid, layer, h) for rid in s.seq_ids for layer in range(3) for h in range(2)]
            runs[layers] = (torch.stack(rows), kept, s.steps, s.cache.stats())
        finally:
            s.close()
    fused, mods = runs["fused"], runs["modules"]
    torch.testing.assert_close(fused[0], mods[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(fused[0].argmax(-1), mods[0].argmax(-1))
    assert fused[1] == mods[1] and fused[2] == mods[2] and fused[3] == mods[3]
    assert 0 < fused[3]["admitted"] < fused[3]["evicted"]


def test_auto_path_is_device_on_cpu(tiny, tmp_path):
    policy = _policy(_random_gate_file(tmp_path), 0.5, [{"stage": "attend"}])
    s = hf.PolicySession(tiny, policy, max_total_tokens=64, batch_size=1)
    assert s.decode_path == "device" and "graph-safe" in s.describe()
    s.close()


@pytest.mark.interpret
@pytest.mark.parametrize("layers", ["modules", "fused"])
def test_device_decode_does_not_sync_with_the_host(tiny, tmp_path, monkeypatch, layers):
    """The device path with the Triton kernels (the interpreter on the CPU): 8 decode steps read nothing back
    (the window of 16 is full from the first step, so tokens leave, are admitted or dropped, pages finalize),
    through transformers' modules or the fused decode layers."""
    from conftest import INTERPRET
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (the reference decode is not the device path's kernel)")
    monkeypatch.setenv("CKV_VALIDATE", "0")  # NaN checks read values (they are on for CPU tensors by default)
    dense, stages = DEVICE_STACKS["quest_art"]
    policy = ckv.compile({"name": "wg", "page_size": 8, "dense_layers": dense, "stages": [
        {"stage": "write_gate", "threshold": 0.5, "window_tokens": 16, "weights": _random_gate_file(tmp_path)}]
        + stages}, backend="triton")
    s = hf.PolicySession(tiny, policy, max_total_tokens=90, batch_size=2, decode_path="device", layers=layers)
    try:
        assert s.layers == layers
        g = torch.Generator().manual_seed(2)
        logits = s.prefill([torch.randint(1, 96, (n,), generator=g).tolist() for n in (40, 23)])
        with no_host_sync():
            for _ in range(8):
                logits = s.decode(logits.argmax(-1))
        with no_host_sync(), pytest.raises(AssertionError, match="host sync"):  # the guard can fail
            s.cache.stats()
        assert s.cache.stats()["admitted"] > 0 and torch.isfinite(logits).all()
    finally:
        s.close()


@pytest.mark.interpret
def test_gated_write_kernel_session_equals_reference(tiny, tmp_path):
    """A session whose policy runs on Triton writes through the one-kernel gated write (gate MLP inside, the
    model's RoPE undone) and keeps exactly what the reference write keeps: same greedy tokens, kept positions
    of every (request, layer, KV head), stats; logits within the read kernels' tolerance (fp32)."""
    from conftest import INTERPRET
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    dense, stages = DEVICE_STACKS["quest_art"]
    weights = _random_gate_file(tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (40, 23)]
    runs = {}
    for backend, words in (("triton", "one Triton kernel a layer"), ("reference", "torch reference")):
        policy = ckv.compile({"name": "wg", "page_size": 8, "dense_layers": dense, "stages": [
            {"stage": "write_gate", "threshold": 0.5, "window_tokens": 16, "weights": weights}] + stages},
            backend=backend)
        s = hf.PolicySession(tiny, policy, max_total_tokens=60, batch_size=2, decode_path="device", layers="fused")
        try:
            assert s.cache.write_backend == backend and words in s.describe()
            logits = s.prefill(prompts)
            rows = []
            for _ in range(6):
                logits = s.decode(logits.argmax(-1))
                rows.append(logits)
            kept = [s.cache.kept_positions(rid, layer, h) for rid in s.seq_ids for layer in range(3) for h in range(2)]
            runs[backend] = (torch.stack(rows), kept, s.cache.stats())
        finally:
            s.close()
    tri, ref = runs["triton"], runs["reference"]
    assert torch.equal(tri[0].argmax(-1), ref[0].argmax(-1))
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-4, atol=1e-4)
    assert tri[1] == ref[1] and tri[2] == ref[2]
    assert 0 < tri[2]["admitted"] < tri[2]["evicted"]
