"""The vLLM backend's adapter (composable_kv/integrations/vllm/adapter.py, policy.py) on CPU, no vLLM needed.

The same K/V go into our PagedKVCache and into a tensor laid out as vLLM's TRITON_ATTN cache (logical
[num_blocks, Hkv, block_size, 2D], physically NHD), written the way vLLM writes it: by slot_mapping, in
chunked-prefill and decode steps, with padded slots, over blocks a previous sequence left dirty, in a
shuffled block order. Then the side-buffer summaries must equal the cache's, and the adapter's decode
(plan from vLLM's block table and seq_lens) must equal our pipeline's on our cache.
"""
import pytest
import torch

import composable_kv as ckv
from composable_kv.config import load_policy
from composable_kv.errors import ConfigError
from composable_kv.integrations.vllm import adapter, policy as serving
from conftest import INTERPRET

S, HKV, G, D, L = 16, 2, 2, 32, 2

POLICIES = {
    "dense": {"stages": [{"stage": "attend"}]},
    "quest": {"dense_layers": [0], "stages": [{"stage": "quest", "budget_tokens": 32}, {"stage": "attend"}]},
    "quest_art": {"dense_layers": [0], "stages": [{"stage": "quest", "budget_tokens": 96},
                                                  {"stage": "art", "stop": "stability", "chunk_pages": 1,
                                                   "patience": 1, "scale_tol": 0.05, "direction_tol": 0.05}]},
    "sink_window_quest_shadow_art": {"stages": [
        {"stage": "sink_window", "sink_tokens": 16, "window_tokens": 16},
        {"stage": "quest", "budget_tokens": 128}, {"stage": "key_shadow", "bits": 8, "budget_tokens": 96},
        {"stage": "art", "stop": "certified", "delta": 0.3, "chunk_pages": 1}]},
}


def vllm_kv_cache(num_blocks, dtype):
    """Zeros in TRITON_ATTN's layout: logical [num_blocks, Hkv, S, 2D] over NHD memory [num_blocks, S, Hkv, 2D]."""
    return torch.zeros(num_blocks, S, HKV, 2 * D, dtype=dtype).permute(0, 2, 1, 3)


def store_kv(kv_cache, key, value, slot_mapping):
    """What vLLM's reshape_and_cache does: token t goes to block slot // S, offset slot % S; slot -1 is skipped."""
    real = slot_mapping >= 0
    slot = slot_mapping[real]
    kv_cache[slot // S, :, slot % S, :D] = key[real]
    kv_cache[slot // S, :, slot % S, D:] = value[real]


class Engine:
    """Our PagedKVCache and a vLLM-layout cache fed the same tokens step by step."""

    def __init__(self, pipe, lens, dtype, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype, self.pipe = dtype, pipe
        pages = sum(-(-(n + 4) // S) for n in lens)
        self.ours = ckv.PagedKVCache(L, HKV, D, pages, page_size=S, dtype=dtype, summaries=pipe.required_summaries)
        self.num_blocks = pages + 6  # block 0 is vLLM's null block
        self.kv = [vllm_kv_cache(self.num_blocks, dtype) for _ in range(L)]
        self.theirs = adapter.VllmPagedCache(num_layers=L, num_kv_heads=HKV, head_dim=D, num_blocks=self.num_blocks,
                                             page_size=S, dtype=dtype, device="cpu", summaries=pipe.required_summaries)
        for layer in range(L):
            self.theirs.bind(layer, self.kv[layer])
        perm = torch.randperm(self.num_blocks - 1, generator=self.g) + 1
        self.free = perm.tolist()
        self.seqs = [self.ours.add_sequence() for _ in lens]
        self.blocks = {s: [] for s in self.seqs}
        self.lens = {s: 0 for s in self.seqs}
        self._dirty_every_block()

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.dtype)

    def _dirty_every_block(self):
        """A previous sequence filled every block (keys 5x larger): its summaries must not survive a reuse."""
        slots = torch.arange(S, self.num_blocks * S)
        for layer in range(L):
            k, v = self.rand(len(slots), HKV, D) * 5, self.rand(len(slots), HKV, D)
            store_kv(self.kv[layer], k, v, slots)
            self.theirs.write(layer, slots, k, v)

    def step(self, counts, pad=3):
        """Append counts[i] tokens to sequence i in both caches; the vLLM batch ends with `pad` padded slots."""
        ids = [s for s, n in zip(self.seqs, counts) if n]
        ns = [n for n in counts if n]
        slot_list = []
        for s, n in zip(ids, ns):
            for pos in range(self.lens[s], self.lens[s] + n):
                if pos // S == len(self.blocks[s]):
                    self.blocks[s].append(self.free.pop())
                slot_list.append(self.blocks[s][pos // S] * S + pos % S)
            self.lens[s] += n
        slot_mapping = torch.tensor(slot_list + [-1] * pad)
        T = sum(ns)
        k, v = self.rand(L, T + pad, HKV, D), self.rand(L, T + pad, HKV, D)
        self.ours.append(ids, ns, k[:, :T].contiguous(), v[:, :T].contiguous())
        for layer in range(L):
            store_kv(self.kv[layer], k[layer], v[layer], slot_mapping)
            self.theirs.write(layer, slot_mapping, k[layer], v[layer])

    def block_table(self, padded_rows=0):
        width = max(len(b) for b in self.blocks.values()) + 2  # vLLM's table is wider than any request
        table = torch.zeros(len(self.seqs) + padded_rows, width, dtype=torch.int32)
        for i, s in enumerate(self.seqs):
            table[i, :len(self.blocks[s])] = torch.tensor(self.blocks[s], dtype=torch.int32)
        lens = torch.tensor([self.lens[s] for s in self.seqs] + [0] * padded_rows, dtype=torch.int32)
        return table, lens


def grow(engine, lens):
    """Chunked prefill (first chunk 20 tokens, so chunks end mid-page), then one token per step."""
    engine.step([min(20, n) for n in lens])
    engine.step([max(0, n - 20) for n in lens])


def test_split_kv_cache_views_vllm_memory():
    kv = vllm_kv_cache(5, torch.float32)
    kv.copy_(torch.randn(kv.shape))
    k, v = adapter.split_kv_cache(kv, D)
    assert k.shape == v.shape == (5, HKV, S, D) and k.stride() == v.stride()
    assert k.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(k[3, 1, 7], kv.permute(0, 2, 1, 3)[3, 7, 1, :D])
    with pytest.raises(ckv.TensorContractError, match="2 \\* 64"):
        adapter.split_kv_cache(kv, 64)


def test_slots_from_mapping():
    slots, fresh = adapter.slots_from_mapping(torch.tensor([33, 48, 49, -1, 0]), 16, trash_page=9)
    assert slots.page_ids.tolist() == [2, 3, 3, 9, 0]
    assert slots.offsets.tolist() == [1, 0, 1, 0, 0]
    assert slots.touched_pages.tolist() == [2, 3, 3, 0, 0]
    assert fresh.tolist() == [9, 3, 9, 9, 0]


@pytest.mark.parametrize("name", ["quest", "sink_window_quest_shadow_art"])
def test_side_buffers_equal_our_summaries(name):
    pipe = ckv.compile(POLICIES[name], backend="reference")
    lens = [37, 70, 5]
    eng = Engine(pipe, lens, torch.float32)
    grow(eng, lens)
    for _ in range(3):
        eng.step([1, 1, 1])
    names = ["key_min", "key_max"]
    for layer in range(L):
        for s in eng.seqs:
            ours_pages, blocks = eng.ours.pages(s), eng.blocks[s]
            for attr in names:
                assert torch.equal(getattr(eng.ours, attr)[layer][ours_pages],
                                   getattr(eng.theirs, attr)[layer][blocks]), (attr, layer, s)
            written = (torch.arange(len(blocks) * S) < eng.lens[s]).view(len(blocks), 1, S, 1)
            for bits in eng.ours.shadow_bits:  # codes of slots not written yet hold whatever the block held
                assert torch.equal(eng.ours.shadow_step[bits][layer][ours_pages],
                                   eng.theirs.shadow_step[bits][layer][blocks]), (layer, s)
                assert torch.equal(eng.ours.shadow_codes[bits][layer][ours_pages] * written,
                                   eng.theirs.shadow_codes[bits][layer][blocks] * written), (layer, s)


def _decode_both(name, dtype, backend, padded_rows=0, steps=2):
    ref_pipe = ckv.compile(POLICIES[name], backend="reference")
    pipe = ckv.compile(POLICIES[name], backend=backend)
    lens = [37, 150, 5]
    eng = Engine(ref_pipe, lens, dtype, seed=1)
    grow(eng, lens)
    for _ in range(steps):
        eng.step([1, 1, 1])
    table, seq_lens = eng.block_table(padded_rows)
    B = len(lens)
    q = eng.rand(B + padded_rows, HKV * G, D) * 8  # peaked attention, so that ART's stops fire
    ref_pipe.plan(eng.ours, eng.seqs)
    plan = adapter.plan_decode(pipe, eng.theirs, table, seq_lens)
    out = []
    for layer in range(L):
        want = ref_pipe.run(q[:B], eng.ours, layer, sm_scale=D ** -0.5)
        got = adapter.decode(pipe, eng.theirs, plan, q, layer, sm_scale=D ** -0.5)
        out.append((want, got))
    return out, B


@pytest.mark.parametrize("name", list(POLICIES))
def test_decode_reference_on_vllm_layout_equals_pipeline(name):
    """Same math (reference backend) on vLLM's memory through the adapter: bit-equal outputs, same pages."""
    results, B = _decode_both(name, torch.float32, "reference")
    for want, got in results:
        assert torch.equal(got.out, want.out)
        assert torch.equal(got.pages_read, want.pages_read)


@pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["dense", "quest", "quest_art", "sink_window_quest_shadow_art"])
def test_decode_triton_on_vllm_layout_equals_reference(name, dtype):
    """The fused Triton path on vLLM's strided cache (NHD memory, K|V interleaved) against the reference
    pipeline on our cache; a padded request (seq_len 0, null blocks) reads nothing."""
    results, B = _decode_both(name, dtype, "triton", padded_rows=1)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    for layer, (want, got) in enumerate(results):
        torch.testing.assert_close(got.out[:B].float(), want.out.float(), atol=tol, rtol=tol)
        assert torch.equal(got.pages_read[:B], want.pages_read), layer
        assert got.pages_read[B:].sum() == 0


def test_policy_refusals_name_the_stage():
    for stage, why in [("ltri", "prefill"), ("snapkv", "prefill"),
                       ("attention_predictor", "(syncs with the host|prefill)")]:
        cfg = load_policy({"stages": [{"stage": stage}, {"stage": "attend"}]})
        with pytest.raises(serving.ServingPolicyError, match=f"stage '{stage}' .*{why}"):
            serving.check_servable(cfg)
    with pytest.raises(serving.ServingPolicyError, match="admission stage 'write_gate'"):
        serving.load_serving_policy("configs/write_gate_quest_art.yaml")
    with pytest.raises(serving.ServingPolicyError, match="page_size >= 16"):
        serving.load_serving_policy({"page_size": 8, "stages": [{"stage": "attend"}]})
    for shipped in ("dense", "quest", "quest_art", "configs/sink_window_quest_shadow_art.yaml"):
        assert serving.load_serving_policy(shipped).graph_safe


def test_policy_from_env(monkeypatch):
    monkeypatch.delenv(serving.ENV, raising=False)
    with pytest.raises(serving.ServingPolicyError, match="CKV_POLICY is not set"):
        serving.serving_pipeline()
    monkeypatch.setenv(serving.ENV, "configs/quest_art.yaml")
    assert serving.serving_pipeline().name == "quest-art"
    monkeypatch.setenv(serving.ENV, "configs/no_such_policy.yaml")
    with pytest.raises(ConfigError, match="no shipped config"):
        serving.serving_pipeline()


def test_check_model():
    pipe = serving.load_serving_policy("quest_art")  # dense_layers [0, 1], page_size 16
    serving.check_model(pipe, num_layers=24, block_size=16)
    with pytest.raises(serving.ServingPolicyError, match="dense_layers \\[1\\] are past the model's 1 layers"):
        serving.check_model(pipe, num_layers=1, block_size=16)
    with pytest.raises(serving.ServingPolicyError, match="block_size=16"):
        serving.check_model(pipe, num_layers=24, block_size=32)
    # vLLM copies partially hit prefix blocks of hybrid models (copy-on-write) without the write hook
    with pytest.raises(serving.ServingPolicyError, match="hybrid model .*another backend"):
        serving.check_model(pipe, num_layers=24, block_size=16, hybrid=True)


def test_combination_problem():
    """The reason the CUSTOM backend adds to vLLM's validate_configuration (supports_combination)."""
    pipe = serving.load_serving_policy({"page_size": 32, "stages": [{"stage": "attend"}]})
    ok = dict(dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None)
    assert serving.combination_problem(pipe, **ok) is None
    for bs in (32, 64, 128):  # a multiple: vLLM splits its blocks into kernel blocks of page_size
        assert serving.combination_problem(pipe, **(ok | {"block_size": bs})) is None
    assert serving.combination_problem(pipe, **(ok | {"kv_cache_dtype": "bfloat16"})) is None
    assert serving.combination_problem(pipe, **(ok | {"kv_cache_dtype": None})) is None
    why = serving.combination_problem(pipe, **(ok | {"block_size": 16}))
    assert "--block-size 16 is not a multiple of the policy's page_size 32: pass --block-size 32" in why
    why = serving.combination_problem(pipe, **(ok | {"kv_cache_dtype": "float16", "block_size": 48}))
    assert "--kv-cache-dtype float16 differs from the model's bfloat16" in why and "--block-size 48" in why


def test_prefill_kernel_choice(monkeypatch):
    monkeypatch.delenv(serving.PREFILL_ENV, raising=False)
    assert serving.prefill_kernel(3)[0] == "flash_attn"  # auto: FA3 / FA4 where vLLM has it
    assert serving.prefill_kernel(4)[0] == "flash_attn"
    assert serving.prefill_kernel(3)[1] == "FlashAttention 3 (CKV_VLLM_PREFILL=auto)"
    kernel, runs_in = serving.prefill_kernel(2)  # FA2 binaries are not in the GPU machine's bundle
    assert kernel == "triton" and runs_in == ("vLLM's Triton unified_attention (no FlashAttention 3/4 here, "
                                              "CKV_VLLM_PREFILL=auto)")
    assert serving.prefill_kernel(None)[0] == "triton"
    monkeypatch.setenv(serving.PREFILL_ENV, "triton")
    assert serving.prefill_kernel(3) == ("triton", "vLLM's Triton unified_attention (CKV_VLLM_PREFILL=triton)")
    monkeypatch.setenv(serving.PREFILL_ENV, "Flash_Attn")
    assert serving.prefill_kernel(3)[0] == "flash_attn"
    with pytest.raises(serving.ServingPolicyError, match="set CKV_VLLM_PREFILL=triton"):
        serving.prefill_kernel(None)
    monkeypatch.setenv(serving.PREFILL_ENV, "sdpa")
    with pytest.raises(serving.ServingPolicyError, match="'sdpa': choose one of auto, flash_attn, triton"):
        serving.prefill_kernel(3)
