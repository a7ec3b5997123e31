"""The write-gated cache on the GPU: prefill + one-token steps on CUDA (moves, page finalization), then
the fused Triton read path == the reference path over an identical CPU cache, bf16, GQA 4, head_dim 128."""
import pytest
import torch

import composable_kv as ckv
from composable_kv.policies.write_gate.admission import GatedPipeline

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
    assert torch.equal(dev.pool.k[0].cpu(), cpu.pool.k[0])
    used = torch.tensor(sorted(p for pages in cpu.pool._pages.values() for p in pages))
    assert used.tolist() == sorted(p for pages in dev.pool._pages.values() for p in pages)
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
