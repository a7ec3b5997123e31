"""The vLLM 0.26.0 attention backend that serves a composable-kv policy (registered as CUSTOM by `register`).

It is TRITON_ATTN with the decode replaced: the same KV-cache layout and the same cache writes. Prefill
runs in vLLM's FlashAttention 3 on the same cache (FLASH_ATTN's layout is TRITON_ATTN's) where vLLM has it,
else in vLLM's Triton `unified_attention` ($CKV_VLLM_PREFILL, policy.prefill_kernel; the engine logs
which). So the only difference from the reference backends is what a single-token decode reads.
Per step, the builder splits the batch: decode requests (first in the batch: the V2 model runner,
vLLM 0.26's default for dense models, sorts them first; the V1 runner reorders by
reorder_batch_threshold = 1) get our pipeline; the rest of the batch keeps TRITON_ATTN metadata.
Per layer (forward_includes_kv_cache_update = False, inherited: vLLM calls the write hook, then forward):
  do_kv_cache_update: vLLM's own write, then the policy's page summaries for the written blocks
                      (adapter.VllmPagedCache.write: side buffers indexed by block id);
  forward:            the prefill part through FlashAttention (or TritonAttentionImpl.forward); the
                      decode part through adapter.decode on vLLM's cache in place (the step's plan is
                      built by the first layer and shared, so a captured graph rebuilds it on every replay).
K/V reach the cache only through do_kv_cache_update: the fusions that would bypass it (RoPE + cache
write, output quantization) are declared unsupported, and so are the engine features that move K/V
without it (KV connectors; hybrid models, whose partial prefix hits vLLM copies block to block).
CUDA graphs: AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE (pure-decode batches are captured whole;
mixed batches run attention eagerly between vLLM's piecewise graphs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend, TritonAttentionImpl, TritonAttentionMetadata, TritonAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from ...pipeline import StepPlan
from .adapter import VllmPagedCache, decode, plan_decode
from .policy import ServingPolicyError, check_model, combination_problem, prefill_kernel, serving_pipeline

logger = init_logger("vllm.composable_kv")  # under vLLM's logger, which alone has a handler in its processes


@dataclass
class CkvAttentionMetadata:
    num_decodes: int             # the batch's first requests, one query token each
    num_decode_tokens: int
    block_table: torch.Tensor    # [num_decodes, max_blocks] int32, vLLM's (persistent buffer)
    seq_lens: torch.Tensor       # [num_decodes] int32, counting the new token; 0 for CUDA-graph padding
    prefill: TritonAttentionMetadata | None  # the other requests, for the dense prefill kernel
    plan: StepPlan | None = None  # made by the step's first decoding layer, shared by the others


def _requests_from(cm: CommonAttentionMetadata, first_req: int, first_token: int) -> CommonAttentionMetadata:
    """`cm` restricted to requests first_req.. (their tokens start at first_token)."""
    per_req = {name: getattr(cm, name)[first_req:] for name in (
        "seq_lens", "block_table_tensor", "is_prefilling", "seq_lens_cpu_upper_bound", "rswa_prefix_lens",
        "_seq_lens_cpu", "_num_computed_tokens_cpu", "encoder_seq_lens", "encoder_seq_lens_cpu",
        "dcp_local_seq_lens", "dcp_local_seq_lens_cpu") if getattr(cm, name) is not None}
    qsl_cpu = cm.query_start_loc_cpu[first_req:] - first_token
    return cm.replace(
        **per_req, query_start_loc=cm.query_start_loc[first_req:] - first_token, query_start_loc_cpu=qsl_cpu,
        num_reqs=cm.num_reqs - first_req, num_actual_tokens=cm.num_actual_tokens - first_token,
        max_query_len=int((qsl_cpu[1:] - qsl_cpu[:-1]).max()), slot_mapping=cm.slot_mapping[first_token:],
        positions=None if cm.positions is None else cm.positions[first_token:],
        causal=cm.causal[first_req:] if isinstance(cm.causal, torch.Tensor) else cm.causal,
        _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)


class CkvMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # the V1 runner moves the single-token decodes to the front
        model = vllm_config.model_config
        # kv_cache_spec.block_size is the kernel block size (copy_with_new_block_size): the policy's page_size,
        # the one size get_supported_kernel_block_sizes offers, whatever --block-size multiple of it vLLM uses.
        check_model(serving_pipeline(), num_layers=model.get_total_num_hidden_layers(),
                    block_size=kv_cache_spec.block_size, hybrid=model.is_hybrid)
        self._layers = [vllm_config.compilation_config.static_forward_context[n] for n in layer_names]
        self._attached = False

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CkvAttentionMetadata:
        if not self._attached:  # the side buffers exist before any graph capture (builds run outside it)
            if all(layer.kv_cache.numel() for layer in self._layers):  # else vLLM has not bound its KV yet
                for layer in self._layers:
                    layer.impl.attach(layer, layer.kv_cache)
                self._attached = True
        cm = common_attn_metadata
        nd, n_prefill, nd_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1, require_uniform=True)
        prefill = super().build(0, _requests_from(cm, nd, nd_tokens)) if n_prefill else None
        return CkvAttentionMetadata(nd, nd_tokens, cm.block_table_tensor[:nd], cm.seq_lens[:nd], prefill)


_CACHES: dict[tuple, tuple[VllmConfig, VllmPagedCache]] = {}  # (engine, num_blocks) -> (its config, its cache)


def _engine_cache(vllm_config: VllmConfig, kv_cache: torch.Tensor, impl: "CkvAttentionImpl") -> VllmPagedCache:
    """The summaries' side buffers of one engine, shared by its layers; made before any graph capture."""
    key = (id(vllm_config), kv_cache.shape[0])
    entry = _CACHES.get(key)
    if entry is None:
        if kv_cache.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("composable-kv: the page-summary side buffers must exist before vLLM captures "
                               "CUDA graphs (the metadata builder makes them at its first build)")
        cache = VllmPagedCache(num_layers=vllm_config.model_config.get_total_num_hidden_layers(),
                               num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size, num_blocks=kv_cache.shape[0],
                               page_size=impl.pipeline.page_size, dtype=kv_cache.dtype, device=kv_cache.device,
                               summaries=impl.pipeline.required_summaries)
        entry = _CACHES[key] = (vllm_config, cache)
    return entry[1]


class CkvAttentionImpl(TritonAttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 use_alibi_sqrt: bool = False, chunk_lookback: int = -1) -> None:
        unsupported = [what for what, on in (
            ("ALiBi", alibi_slopes is not None), ("a sliding window", sliding_window is not None),
            ("a logits soft cap", bool(logits_soft_cap)), (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
            ("KV sharing across layers", kv_sharing_target_layer_name is not None), ("attention sinks", sinks is not None),
            ("chunked local attention", chunk_lookback != -1)) if on]
        if self.dcp_world_size > 1:  # set by AttentionImplBase.__new__
            unsupported.append(f"decode context parallelism ({self.dcp_world_size} ranks)")
        if unsupported:
            raise ServingPolicyError(f"the composable-kv backend serves plain causal decoder attention; this layer "
                                     f"uses {', '.join(unsupported)}: serve the model with another backend")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, use_alibi_sqrt,
                         chunk_lookback)
        self.pipeline = serving_pipeline()
        self._fa_version = self._flash_attn_version(head_size)
        self.prefill_kernel, runs_in = prefill_kernel(self._fa_version)
        logger.info_once(f"composable-kv: policy {self.pipeline.name!r} decodes; prefill runs in {runs_in}")
        self._vllm_config = get_current_vllm_config()
        self._cache: VllmPagedCache | None = None
        self._layer: int | None = None

    @staticmethod
    def _flash_attn_version(head_size: int) -> int | None:
        from vllm.platforms import current_platform
        if not current_platform.is_cuda():
            return None
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        return get_flash_attn_version(head_size=head_size)

    def _flash_prefill(self, query: torch.Tensor, kv_cache: torch.Tensor, md: TritonAttentionMetadata,
                       output: torch.Tensor) -> None:
        """Causal attention of the prefill requests' new tokens over their cached context, in FlashAttention,
        reading vLLM's paged cache in place (the tokens were written by do_kv_cache_update before forward)."""
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
        n = md.num_actual_tokens
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [blocks, S, Hkv, D] views
        flash_attn_varlen_func(q=query[:n], k=key_cache, v=value_cache, out=output[:n],
                               cu_seqlens_q=md.query_start_loc, max_seqlen_q=md.max_query_len,
                               seqused_k=md.seq_lens, max_seqlen_k=md.max_seq_len, softmax_scale=self.scale,
                               causal=True, block_table=md.block_table, fa_version=self._fa_version)

    def attach(self, layer: torch.nn.Module, kv_cache: torch.Tensor) -> VllmPagedCache:
        """Bind this layer's KV tensor to the engine's cache view (views only; repeated if vLLM reallocates)."""
        if self._layer is None:
            self._layer = extract_layer_index(layer.layer_name)
        cache = self._cache
        if cache is None or cache.num_blocks != kv_cache.shape[0]:
            cache = self._cache = _engine_cache(self._vllm_config, kv_cache, self)
        if not cache.bound(self._layer, kv_cache):
            cache.bind(self._layer, kv_cache)
        return cache

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False  # TritonAttentionImpl says yes for static fp8; the decode writes model-dtype outputs

    def fused_rope_kvcache_supported(self) -> bool:
        return False  # TritonAttentionImpl says yes with ROCm AITER: that write would skip the page summaries

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if kv_cache.numel():
            self.attach(layer, kv_cache).write(self._layer, slot_mapping, key, value)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: CkvAttentionMetadata, output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the composable-kv backend does not fuse output quantization")
        if attn_metadata is None:  # vLLM's profiling run
            return output.fill_(0)
        md = attn_metadata
        if md.prefill is not None:
            n = md.num_decode_tokens
            if self.prefill_kernel == "flash_attn":
                self._flash_prefill(query[n:], kv_cache, md.prefill, output[n:])
            else:
                super().forward(layer, query[n:], key[n:], value[n:], kv_cache, md.prefill, output[n:])
        if md.num_decodes:
            cache = self.attach(layer, kv_cache)
            if md.plan is None:
                md.plan = plan_decode(self.pipeline, cache, md.block_table, md.seq_lens)
            B = md.num_decodes
            res = decode(self.pipeline, cache, md.plan, query[:B], self._layer, self.scale)  # out [B, Hq, D]
            output[:B].copy_(res.out)
        return output


class CkvAttentionBackend(TritonAttentionBackend):
    """TRITON_ATTN's cache layout and writes; FlashAttention's (or Triton's) prefill; composable-kv's decode
    (the policy in $CKV_POLICY)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM maps a layer's backend back to AttentionBackendEnum by this name

    @staticmethod
    def get_impl_cls() -> type[CkvAttentionImpl]:
        return CkvAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CkvMetadataBuilder]:
        return CkvMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return [serving_pipeline().page_size]  # a vLLM block is one of the policy's pages

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size % serving_pipeline().page_size == 0

    @classmethod
    def supports_combination(cls, head_size: int, dtype: torch.dtype, kv_cache_dtype, block_size: int | None,
                             use_mla: bool, has_sink: bool, use_sparse: bool, use_mm_prefix: bool,
                             device_capability) -> str | None:
        # validate_configuration adds this line to its reasons; vLLM's own say only "... not supported"
        return combination_problem(serving_pipeline(), dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                                   block_size=block_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # a connector fills blocks without the write path that keeps the page summaries
