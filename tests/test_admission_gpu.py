"""The write-gated cache on the GPU: prefill + one-token steps on CUDA (moves, page finalization), then
the fused Triton read path == the reference path over an identical CPU cache, bf16, GQA 4, head_dim 128;
and a tiny model decoding through write_gate from one CUDA graph a step, on the fused decode layers and on
the modules: same tokens, kept tokens and read counts as the eager device and host paths, and no host sync
inside a step."""
import pytest
import torch

import composable_kv as ckv
from composable_kv import hf
from composable_kv.policies.write_gate import GateMLP
from composable_kv.policies.write_gate.admission import GatedPipeline
from helpers import assert_replays_without_sync

pytestmark = pytest.mark.gpu

STACKS = {
    "attend": [{"stage": "attend"}],
    "quest_art": [{"stage": "quest", "budget_tokens": 512}, {"stage": "art", "stop": "certified", "delta": 0.01}],
    "quest_attend": [{"stage": "quest", "budget_tokens": 256}, {"stage": "attend"}],
}


def _fill(cache, lens, steps, k, v, g):
    rids = [cache.add_sequence() for _ in lens]
    slots = cache.reserve(rids, list(lens))
    rows = torch.cat([torch.arange(n) + i * (max(lens) + steps) for i, n in enumerate(lens)])
    cache.write(0, slots, k[rows].to(cache.device), v[rows].to(cache.device), g=g[rows].to(cache.device))
    for t in range(steps):
        rows = torch.tensor([n + t + i * (max(lens) + steps) for i, n in enumerate(lens)])
        cache.write(0, cache.reserve(rids, [1] * len(lens)), k[rows].to(cache.device), v[rows].to(cache.device),
                    g=g[rows].to(cache.device))
    return rids


def check_gated(stack, admit, device, lens=(100, 1000, 3001), steps=40, H=2, G=4, D=128, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    n = len(lens) * (max(lens) + steps)
    k = torch.randn(n, H, D, generator=gen).to(dtype)
    v = torch.randn(n, H, D, generator=gen).to(dtype)
    g = (torch.rand(n, H, generator=gen) < admit).float()
    q = torch.randn(len(lens), H * G, D, generator=gen).to(dtype)
    pol = {"name": "wg", "page_size": 16, "stages": [{"stage": "write_gate", "threshold": 0.5}] + STACKS[stack]}
    tri = GatedPipeline(ckv.compile(pol, backend="triton"))
    ref = GatedPipeline(ckv.compile(pol, backend="reference"))
    pages = len(lens) * H * (-(-(max(lens) + steps) // 16) + 1)
    dev = tri.make_cache(1, H, D, pages, dtype=dtype, device=device)
    cpu = ref.make_cache(1, H, D, pages, dtype=dtype, device="cpu")
    rd, rc = _fill(dev, lens, steps, k, v, g), _fill(cpu, lens, steps, k, v, g)
    assert dev.stats() == cpu.stats()
    for a, b in zip(rd, rc):
        for h in range(H):
            assert dev.kept_positions(a, 0, h) == cpu.kept_positions(b, 0, h)
            assert dev.triple_pages(a, 0, h) == cpu.triple_pages(b, 0, h)
            ka, va = dev.triple_kv(a, 0, h)
            kb, vb = cpu.triple_kv(b, 0, h)
            assert torch.equal(ka.cpu(), kb) and torch.equal(va.cpu(), vb)
    used = torch.tensor(sorted(p for r in rc for h in range(H) for p in cpu.triple_pages(r, 0, h)))
    if cpu.pool.key_min is not None:  # unused pages hold garbage summaries
        assert torch.equal(dev.pool.key_min[0].cpu()[used], cpu.pool.key_min[0][used])
    tri.plan(dev, rd)
    ref.plan(cpu, rc)
    a, b = tri.run(q.to(device), dev, 0), ref.run(q, cpu, 0)
    assert torch.equal(a.pages_read.cpu(), b.pages_read)
    torch.testing.assert_close(a.out.float().cpu(), b.out.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("admit", [0.1, 0.6])
def test_gated_fused_gpu_equals_reference(stack, admit):
    check_gated(stack, admit, "cuda")


def _tiny(dtype):
    from helpers import tiny_llama
    return tiny_llama(1024).to("cuda", dtype)


def _gate_file(tmp_path):
    torch.manual_seed(5)
    gate = GateMLP(3, 2, 16, hidden=8)
    with torch.no_grad():
        gate.w2.mul_(4.0)  # admits part of the tokens at threshold 0.5
    gate.save(tmp_path / "gate.pt", {})
    return str(tmp_path / "gate.pt")


def _gated_policy(tmp_path, stack):
    return ckv.compile({"name": "wg", "page_size": 16, "dense_layers": [0], "stages": [
        {"stage": "write_gate", "threshold": 0.5, "window_tokens": 64, "weights": _gate_file(tmp_path)}]
        + STACKS[stack]})


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in (200, 333, 517)]


@pytest.mark.parametrize("stack", ["attend", "quest_art"])
def test_graph_path_equals_eager_paths_fp32(tmp_path, stack):
    """Graph, device and host paths, each on the fused decode layers and on the modules: the same tokens,
    bytes read, kept tokens and counts (fp32)."""
    model = _tiny(torch.float32)
    pipe = _gated_policy(tmp_path, stack)
    out, kept = {}, {}
    for layers in ("fused", "modules"):
        for path in ("graph", "device", "host"):
            s = hf.PolicySession(model, pipe, max_total_tokens=600, batch_size=3, decode_path=path, layers=layers)
            logits = s.prefill(_prompts())
            toks = []
            for _ in range(40):  # 40 steps past a 64-token window: tokens leave, are admitted or dropped
                toks.append(logits.argmax(-1))
                logits = s.decode(toks[-1])
            assert s.decode_path == path and s.graph_captured == (path == "graph") and s.layers == layers
            out[layers, path] = (torch.stack(toks).tolist(), [st.kv_bytes_read for st in s.steps], s.cache.stats())
            kept[layers, path] = [s.cache.kept_positions(r, layer, h) for r in s.seq_ids for layer in range(3)
                                  for h in range(2)]
            s.close()
    first = ("fused", "graph")
    for key in out:
        assert out[key] == out[first], key
        assert kept[key] == kept[first], key
    assert 0 < out[first][2]["admitted"] < out[first][2]["evicted"]


@pytest.mark.parametrize("layers", ["fused", "modules"])
def test_a_gated_step_is_one_graph_replay_with_no_sync(tmp_path, layers):
    model = _tiny(torch.bfloat16)
    s = hf.PolicySession(model, _gated_policy(tmp_path, "quest_art"), max_total_tokens=600, batch_size=3,
                         layers=layers)
    assert s.decode_path == "graph" and s.layers == layers
    assert_replays_without_sync(s, _prompts())  # the first step runs eagerly, then replays
