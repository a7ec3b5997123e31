"""The vLLM backend classes (composable_kv/integrations/vllm/backend.py) against vLLM 0.26.0's API, on CPU.

Needs vllm importable (skipped otherwise). No engine: registration, what the backend declares, the batch
split, and one layer's write + decode through the impl, compared with the adapter's reference decode.
vLLM's own Triton kernels do not run on CPU, so the impl's vLLM-side write is replaced by its torch
equivalent here; the GPU run (gpu/vllm.sh) covers the whole engine.
"""
import inspect
import types

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (the `vllm` extra; the shared dev venv stays "
                                          "without it: run these from a separate venv that has vllm 0.26.0)")

import composable_kv as ckv  # noqa: E402
from composable_kv.integrations import vllm as ckv_vllm  # noqa: E402
from composable_kv.integrations.vllm import adapter, policy as serving  # noqa: E402
from conftest import INTERPRET  # noqa: E402
from test_vllm_adapter import D, G, HKV, S, store_kv, vllm_kv_cache  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionMetadataBuilder, CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl  # noqa: E402


@pytest.fixture
def policy_env(monkeypatch):
    monkeypatch.setenv(serving.ENV, "configs/quest_art.yaml")
    serving._pipeline_for.cache_clear()
    yield
    serving._pipeline_for.cache_clear()
    AttentionBackendEnum.CUSTOM.clear_override()


def test_pinned_version():
    assert vllm.__version__ == ckv_vllm.VLLM_VERSION


def test_register_makes_it_vllms_custom_backend(policy_env):
    ckv_vllm.register()
    from composable_kv.integrations.vllm.backend import CkvAttentionBackend, CkvMetadataBuilder
    assert AttentionBackendEnum.CUSTOM.get_class() is CkvAttentionBackend
    assert AttentionBackendEnum[CkvAttentionBackend.get_name()] is AttentionBackendEnum.CUSTOM
    assert CkvMetadataBuilder.get_cudagraph_support(None, None) is AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert CkvAttentionBackend.get_kv_cache_shape(10, 16, 2, 64) == TritonAttentionBackend.get_kv_cache_shape(10, 16, 2, 64)


def test_register_refuses_a_bad_policy_at_startup(monkeypatch):
    monkeypatch.setenv(serving.ENV, "configs/write_gate_quest_art.yaml")
    serving._pipeline_for.cache_clear()
    with pytest.raises(serving.ServingPolicyError, match="admission stage 'write_gate'"):
        ckv_vllm.register()
    assert not AttentionBackendEnum.CUSTOM.is_overridden()
    serving._pipeline_for.cache_clear()


def test_classes_implement_vllms_interfaces():
    """Every abstract method defined, and each method vLLM calls keeps the signature vLLM 0.26 calls it with."""
    from composable_kv.integrations.vllm.backend import CkvAttentionBackend, CkvAttentionImpl, CkvMetadataBuilder
    for cls, base in [(CkvAttentionBackend, AttentionBackend), (CkvAttentionImpl, AttentionImpl),
                      (CkvMetadataBuilder, AttentionMetadataBuilder)]:
        assert issubclass(cls, base) and not inspect.isabstract(cls), (cls, cls.__abstractmethods__)

    def params(f):
        return list(inspect.signature(f).parameters)
    assert params(CkvAttentionImpl.forward) == params(AttentionImpl.forward)
    assert params(CkvAttentionImpl.__init__) == params(TritonAttentionImpl.__init__)  # Attention passes these
    assert params(CkvAttentionImpl.do_kv_cache_update) == params(TritonAttentionImpl.do_kv_cache_update)
    assert params(CkvMetadataBuilder.__init__) == params(AttentionMetadataBuilder.__init__)
    assert params(CkvMetadataBuilder.build) == params(AttentionMetadataBuilder.build)
    for name in ("get_name", "get_impl_cls", "get_builder_cls", "get_supported_kernel_block_sizes"):
        assert isinstance(inspect.getattr_static(CkvAttentionBackend, name), staticmethod), name
    # vLLM calls do_kv_cache_update (unified_kv_cache_update) before forward only when this is False
    assert CkvAttentionBackend.forward_includes_kv_cache_update is False


def test_kv_writes_cannot_bypass_the_summaries(policy_env, monkeypatch):
    from composable_kv.integrations.vllm import backend
    from composable_kv.integrations.vllm.backend import CkvAttentionImpl
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym
    monkeypatch.setattr(backend, "get_current_vllm_config", lambda: None)  # no engine here
    impl = CkvAttentionImpl(4, 64, 0.125, 2, None, None, "auto")
    assert not impl.fused_output_quant_supported(kFp8StaticTensorSym)  # TRITON_ATTN's says True
    assert not impl.fused_rope_kvcache_supported() and not impl.fused_qk_norm_rope_kvcache_supported()


def test_kernel_block_size_is_the_page_size(policy_env, monkeypatch, tmp_path):
    """vLLM picks the kernel block size from get_supported_kernel_block_sizes and splits larger blocks."""
    from composable_kv.integrations.vllm.backend import CkvAttentionBackend
    from vllm.v1.worker.utils import select_common_block_size
    assert CkvAttentionBackend.get_preferred_block_size(16) == 16
    for manager_block in (16, 32, 64):
        assert select_common_block_size(manager_block, [CkvAttentionBackend]) == 16
    policy = tmp_path / "dense_p32.yaml"
    policy.write_text("page_size: 32\nstages:\n  - {stage: attend}\n")
    monkeypatch.setenv(serving.ENV, str(policy))
    assert CkvAttentionBackend.get_preferred_block_size(16) == 32  # vLLM's default 16 is not a multiple of 32


def test_validate_configuration(policy_env):
    from composable_kv.integrations.vllm.backend import CkvAttentionBackend
    base = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
                device_capability=DeviceCapability(9, 0), attn_type="decoder")
    assert CkvAttentionBackend.validate_configuration(**base) == []
    assert CkvAttentionBackend.validate_configuration(**(base | {"block_size": 64})) == []  # 4 kernel blocks each
    for change, reason in [({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"), ({"block_size": 8}, "block_size"),
                           ({"block_size": 24}, "pass --block-size 16"), ({"kv_cache_dtype": "float16"}, "auto"),
                           ({"use_pcp": True}, "PCP"), ({"use_mm_prefix": True}, "multimodal"),
                           ({"has_sliding_window": True}, "sliding window"), ({"use_kv_connector": True}, "KV connector"),
                           ({"has_sink": True}, "sinks"), ({"attn_type": "encoder_only"}, "attention type")]:
        reasons = CkvAttentionBackend.validate_configuration(**(base | change))
        assert any(reason in r for r in reasons), (change, reasons)


def _common(query_lens, seq_lens, width=6):
    qsl = torch.tensor([0] + list(query_lens)).cumsum(0).to(torch.int32)
    R, T = len(query_lens), int(qsl[-1])
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=R, num_actual_tokens=T, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_table_tensor=torch.arange(R * width, dtype=torch.int32).view(R, width),
        slot_mapping=torch.arange(100, 100 + T), positions=torch.arange(T))


def test_requests_from_slices_the_prefill_part():
    from composable_kv.integrations.vllm.backend import _requests_from
    cm = _common([1, 1, 5, 3], [40, 9, 5, 20])
    p = _requests_from(cm, 2, 2)
    assert p.num_reqs == 2 and p.num_actual_tokens == 8 and p.max_query_len == 5
    assert p.query_start_loc.tolist() == [0, 5, 8] and p.query_start_loc_cpu.tolist() == [0, 5, 8]
    assert p.seq_lens.tolist() == [5, 20]
    assert torch.equal(p.block_table_tensor, cm.block_table_tensor[2:])
    assert p.slot_mapping.tolist() == list(range(102, 110)) and p.positions.tolist() == list(range(2, 10))


@pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.interpret
def test_impl_write_and_decode_equal_the_adapter(policy_env, monkeypatch, tmp_path):
    """One layer through CkvAttentionImpl (do_kv_cache_update, then forward on a decode-only batch with a
    CUDA-graph padding row) equals adapter.decode with the reference backend on the same cache."""
    from composable_kv.integrations.vllm import backend
    from composable_kv.integrations.vllm.backend import CkvAttentionImpl, CkvAttentionMetadata
    engine = types.SimpleNamespace(model_config=types.SimpleNamespace(get_total_num_hidden_layers=lambda: 4))
    monkeypatch.setattr(backend, "get_current_vllm_config", lambda: engine)
    policy = tmp_path / "small_quest_art.yaml"
    policy.write_text("dense_layers: [0, 1]\nstages:\n  - {stage: quest, budget_tokens: 96}\n"
                      "  - {stage: art, stop: stability, chunk_pages: 1, patience: 1, scale_tol: 0.05, "
                      "direction_tol: 0.05}\n")
    monkeypatch.setenv(serving.ENV, str(policy))
    monkeypatch.setattr(TritonAttentionImpl, "do_kv_cache_update",
                        lambda self, layer, k, v, kv_cache, slots: store_kv(kv_cache, k, v, slots))
    impl = CkvAttentionImpl(HKV * G, D, D ** -0.5, HKV, None, None, "auto")
    layer = types.SimpleNamespace(layer_name="model.layers.3.self_attn.attn")  # sparse: quest_art keeps 0, 1 dense
    g = torch.Generator().manual_seed(0)
    kv = vllm_kv_cache(40, torch.float32)
    lens = [150, 37]
    blocks = torch.randperm(39, generator=g)[:20] + 1
    table = torch.zeros(3, 12, dtype=torch.int32)
    table[0, :10], table[1, :3] = blocks[:10], blocks[10:13]
    slots = torch.cat([table[b, torch.arange(n) // S].long() * S + torch.arange(n) % S for b, n in enumerate(lens)])
    k, v = torch.randn(len(slots), HKV, D, generator=g), torch.randn(len(slots), HKV, D, generator=g)
    impl.do_kv_cache_update(layer, k, v, kv, slots)
    seq_lens = torch.tensor(lens + [0], dtype=torch.int32)
    q = torch.randn(3, HKV * G, D, generator=g) * 8
    md = CkvAttentionMetadata(3, 3, table, seq_lens, None)
    out = torch.full((3, HKV * G, D), float("nan"))
    impl.forward(layer, q, q, q, kv, md, out)

    ref_pipe = ckv.compile(str(policy), backend="reference")
    ref = adapter.VllmPagedCache(num_layers=4, num_kv_heads=HKV, head_dim=D, num_blocks=40, page_size=S,
                                 dtype=torch.float32, device="cpu", summaries=ref_pipe.required_summaries)
    ref.bind(3, kv)
    ref.write(3, slots, k, v)
    plan = adapter.plan_decode(ref_pipe, ref, table, seq_lens)
    want = adapter.decode(ref_pipe, ref, plan, q, 3, D ** -0.5)
    torch.testing.assert_close(out[:2], want.out[:2], atol=2e-5, rtol=2e-5)
    assert torch.isfinite(out[2]).all()  # the padding row read nothing and wrote a finite value
    assert 0 < want.pages_read[0].sum() < 2 * 10 and want.pages_read[2].sum() == 0  # quest + the stop selected
    assert md.plan is not None  # the step's plan, kept for the next layers


def paged_varlen_attention(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                           causal, block_table, fa_version):
    """What vLLM's flash_attn_varlen_func computes with a paged KV cache (k, v: [blocks, S, Hkv, D]): request b's
    queries are the last ones of its seqused_k[b] tokens (causal, aligned bottom-right), read through its blocks."""
    assert causal and fa_version in (3, 4) and k.shape[1:] == (S, HKV, D) and k.stride(-1) == 1
    for b in range(len(seqused_k)):
        q0, q1, n = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seqused_k[b])
        pages = block_table[b, :-(-n // S)].long()
        kb, vb = (t[pages].reshape(-1, HKV, D)[:n].repeat_interleave(G, 1) for t in (k, v))  # [n, Hq, D]
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), kb.float()) * softmax_scale
        pos = torch.arange(n - (q1 - q0), n)
        s = s.masked_fill(torch.arange(n)[None, None, :] > pos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vb.float()).to(out.dtype)


def test_impl_prefill_runs_flash_attention_on_the_paged_cache(policy_env, monkeypatch):
    """With the FlashAttention prefill, the impl hands vLLM's flash_attn_varlen_func the K and V halves of the
    cache as [blocks, S, Hkv, D] views, the block table and the context lengths; a mixed batch's decode rows
    still go through our pipeline. Checked against attention over the contiguous K/V each request wrote."""
    from composable_kv.integrations.vllm import backend
    from composable_kv.integrations.vllm.backend import CkvAttentionImpl, CkvAttentionMetadata
    from vllm.v1.attention.backends import fa_utils
    engine = types.SimpleNamespace(model_config=types.SimpleNamespace(get_total_num_hidden_layers=lambda: 4))
    monkeypatch.setattr(backend, "get_current_vllm_config", lambda: engine)
    monkeypatch.setattr(CkvAttentionImpl, "_flash_attn_version", staticmethod(lambda head_size: 3))
    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", paged_varlen_attention, raising=False)
    monkeypatch.setattr(TritonAttentionImpl, "do_kv_cache_update",
                        lambda self, layer, k, v, kv_cache, slots: store_kv(kv_cache, k, v, slots))
    monkeypatch.delenv(serving.PREFILL_ENV, raising=False)
    said = []
    monkeypatch.setattr(backend.logger, "info_once", lambda msg, *a, **k: said.append(msg))
    impl = CkvAttentionImpl(HKV * G, D, D ** -0.5, HKV, None, None, "auto")
    assert impl.prefill_kernel == "flash_attn"
    assert backend.logger.name.startswith("vllm.")  # vLLM configures its own loggers' handlers, not others'
    assert said and said[0].endswith("prefill runs in FlashAttention 3 (CKV_VLLM_PREFILL=auto)")
    layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    g = torch.Generator().manual_seed(1)
    kv = vllm_kv_cache(30, torch.float32)
    ctx, new = [37, 0], [20, 45]  # request 0 extends 37 cached tokens by 20 (chunked prefill), request 1 is new
    table = torch.zeros(2, 8, dtype=torch.int32)
    blocks = (torch.randperm(29, generator=g) + 1).to(torch.int32)
    table[0, :4], table[1, :3] = blocks[:4], blocks[4:7]
    total = [c + n for c, n in zip(ctx, new)]
    keys = [torch.randn(n, HKV, D, generator=g) for n in total]
    vals = [torch.randn(n, HKV, D, generator=g) for n in total]
    slots = [table[b, torch.arange(n) // S].long() * S + torch.arange(n) % S for b, n in enumerate(total)]
    store_kv(kv, keys[0][:ctx[0]], vals[0][:ctx[0]], slots[0][:ctx[0]])  # the cached context
    step_slots = torch.cat([slots[0][ctx[0]:], slots[1]])
    k_new, v_new = torch.cat([keys[0][ctx[0]:], keys[1]]), torch.cat([vals[0][ctx[0]:], vals[1]])
    impl.do_kv_cache_update(layer, k_new, v_new, kv, step_slots)
    q = torch.randn(sum(new), HKV * G, D, generator=g)
    prefill = types.SimpleNamespace(num_actual_tokens=sum(new), query_start_loc=torch.tensor([0, 20, 65]),
                                    max_query_len=45, seq_lens=torch.tensor(total, dtype=torch.int32),
                                    max_seq_len=max(total), block_table=table)
    md = CkvAttentionMetadata(0, 0, table[:0], torch.zeros(0, dtype=torch.int32), prefill)
    out = torch.full((sum(new) + 3, HKV * G, D), float("nan"))  # 3 padded tokens stay untouched
    impl.forward(layer, torch.cat([q, q[:3]]), None, None, kv, md, out)
    for b, (q0, q1) in enumerate([(0, 20), (20, 65)]):
        qs = q[q0:q1].transpose(0, 1)  # [Hq, n_new, D]
        k = keys[b].repeat_interleave(G, 1).transpose(0, 1)
        v = vals[b].repeat_interleave(G, 1).transpose(0, 1)
        n_new, n = q1 - q0, total[b]
        allowed = torch.arange(n)[None, :] <= torch.arange(n - n_new, n)[:, None]
        want = torch.nn.functional.scaled_dot_product_attention(qs, k, v, attn_mask=allowed).transpose(0, 1)
        torch.testing.assert_close(out[q0:q1], want, atol=1e-5, rtol=1e-5)
    assert out[sum(new):].isnan().all()
