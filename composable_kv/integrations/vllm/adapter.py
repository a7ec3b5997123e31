"""composable-kv's decode over vLLM's paged KV cache, in place: plain torch, no vLLM import.

vLLM (TRITON_ATTN's layout, which the backend keeps) gives each attention layer one tensor of logical
shape [num_blocks, Hkv, block_size, 2 * D], K and V side by side in the last dim, physically NHD by
default. Its K half and V half are [num_blocks, Hkv, block_size, D] views: our HND page layout with
vLLM's strides, which the decode kernels take as they are. vLLM's block ids are our page ids and its
block table [num_reqs, max_blocks] int32 is our padded page table, so nothing is copied or remapped.

Page summaries (composable_kv.summaries: key_minmax, value_norm, key shadows) live in side buffers
indexed by block id, one row more than vLLM has blocks: padded slots (slot -1) land in that last row.
A block's summary is reset when a token is written at its offset 0 (every owner of a block writes it
from offset 0), then updated with the written keys and values, by the registered summary objects.
"""
from __future__ import annotations

import torch

from ... import summaries as summ
from ...cache import AppendSlots
from ...errors import TensorContractError
from ...kernels import backend_for
from ...pipeline import DecodePipeline, DecodeResult, StepPlan


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's vLLM cache [num_blocks, Hkv, block_size, 2 * D] -> (K, V) views [num_blocks, Hkv, block_size, D]."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size or kv_cache.stride(-1) != 1:
        raise TensorContractError(f"vLLM kv_cache: expected logical [num_blocks, Hkv, block_size, 2 * {head_size}] "
                                  f"with K|V contiguous in the last dim (TRITON_ATTN's layout), got shape "
                                  f"{list(kv_cache.shape)} strides {list(kv_cache.stride())}")
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


def slots_from_mapping(slot_mapping: torch.Tensor, page_size: int, trash_page: int) -> tuple[AppendSlots, torch.Tensor]:
    """vLLM's slot_mapping [T] (block * block_size + offset; -1 for padding) -> (our AppendSlots, fresh [T]).

    page_ids: the block, or `trash_page` for padding; touched_pages: the block, or block 0 for padding
    (vLLM's null block: re-summarizing a block nobody wrote leaves it as it was); fresh: the block where
    the token opens it (offset 0), else `trash_page`. Device ops only."""
    slot = slot_mapping.long()  # [T]
    real = slot >= 0
    page = torch.div(slot, page_size, rounding_mode="floor")
    offset = slot - page * page_size
    slots = AppendSlots([], [], torch.where(real, page, trash_page), torch.where(real, offset, 0),
                        torch.where(real, page, 0))
    return slots, torch.where(real & (offset == 0), page, trash_page)


class VllmPagedCache:
    """What the pipeline, the fused kernels and the summary registry read from a PagedKVCache, over vLLM's
    per-layer KV tensors (bound with `bind`, never copied) plus the policy's page summaries."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, page_size: int,
                 dtype: torch.dtype, device, summaries=frozenset()):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, torch.device(device)
        self.num_blocks = num_blocks
        self.num_pages = num_blocks + 1  # summary rows: vLLM's blocks, then the trash row
        self.trash_page = num_blocks
        self.check_values = False
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.key_min = self.key_max = self.value_norm = None
        self.shadow_codes: dict[int, list[torch.Tensor]] = {}
        self.shadow_step: dict[int, list[torch.Tensor]] = {}
        self._summaries = summ.resolve(summaries)
        for s in self._summaries:
            s.check(self)
            s.allocate(self)
        self.summaries = frozenset(s.name for s in self._summaries)
        self.shadow_bits = tuple(s.bits for s in self._summaries if isinstance(s, summ.KeyShadow))
        every = torch.arange(self.num_pages, device=self.device)
        for s in self._summaries:
            s.reset(self, every)

    def bind(self, layer: int, kv_cache: torch.Tensor) -> None:
        """Point `layer` at vLLM's cache tensor of that layer (views; call again if vLLM reallocates it)."""
        k, v = split_kv_cache(kv_cache, self.head_dim)
        if tuple(k.shape) != (self.num_blocks, self.num_kv_heads, self.page_size, self.head_dim) or k.dtype != self.dtype:
            raise TensorContractError(f"layer {layer}: vLLM kv_cache holds K as {list(k.shape)} {k.dtype}, this cache "
                                      f"was built for {[self.num_blocks, self.num_kv_heads, self.page_size, self.head_dim]} "
                                      f"{self.dtype}")
        self.k[layer], self.v[layer] = k, v

    def bound(self, layer: int, kv_cache: torch.Tensor) -> bool:
        k = self.k[layer]
        return k is not None and k.data_ptr() == kv_cache.data_ptr()

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """After vLLM stored key/value [T, Hkv, D] at slot_mapping [T]: reset the blocks they open, then update
        the layer's summaries. Device ops only (captured with the decode step's CUDA graph)."""
        if not self._summaries:
            return
        T = slot_mapping.shape[0]
        rest = self._summaries
        if summ.KEY_MINMAX in self.summaries:  # first: a key shadow quantizes against the new min/max
            if backend_for(self.device) == "triton":  # one launch (kernels/minmax_write)
                from ...kernels.minmax_write import triton as minmax
            else:
                from ...kernels.minmax_write import reference as minmax
            minmax.minmax_write(slot_mapping, key[:T], self.key_min[layer], self.key_max[layer], self.page_size,
                                self.trash_page)
            rest = [s for s in rest if s.name != summ.KEY_MINMAX]
        if not rest:
            return
        slots, fresh = slots_from_mapping(slot_mapping, self.page_size, self.trash_page)
        for s in rest:
            s.reset(self, fresh, layers=(layer,))
        for s in rest:  # dependencies first
            s.update(self, layer, slots, key[:T], value[:T])


def plan_decode(pipeline: DecodePipeline, cache: VllmPagedCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                num_splits: int | None = None) -> StepPlan:
    """The decode step's plan, shared by all layers, from vLLM's tables: block_table [B', max_blocks] int32
    (its first B rows are the decode requests), seq_lens [B] int32 counting the new token (0 for requests
    that only pad a CUDA-graph batch: they read nothing). Device ops only (CUDA-graph safe)."""
    B = seq_lens.shape[0]
    return pipeline.plan_tables(cache, block_table[:B], seq_lens, list(range(B)), num_splits)


def decode(pipeline: DecodePipeline, cache: VllmPagedCache, plan: StepPlan, q: torch.Tensor, layer: int,
           sm_scale: float) -> DecodeResult:
    """One layer's decode for q [B, Hq, D] under `plan`: the policy's selection, read and stop, as in our runtime
    (dense_layers read densely). -> DecodeResult (out [B, Hq, D] in q's dtype, pages_read [B, Hkv])."""
    pipeline.use_plan(plan)
    return pipeline.run(q, cache, layer, sm_scale)
