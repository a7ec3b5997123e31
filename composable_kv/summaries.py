"""Page summaries: small per-page facts that selectors and ART read instead of the keys.

A summary registers like a stage: a small object that allocates its per-layer tensors on the cache,
resets them for fresh pages, updates them when tokens are written, rebuilds them from a page's K/V,
and says how many bytes a (page, KV head) costs to read. The cache keeps exactly the summaries the
policy's stages declare (``Stage.required_summaries``) and imports no stage.

    key_minmax       key_min / key_max [num_pages, Hkv, D] (cache dtype; exact element-wise min / max)
    value_norm       value_norm [num_pages, Hkv] fp32 (max ||v|| over the page's tokens)
    key_shadow_int8  shadow_codes[8] [num_pages, Hkv, S, D] uint8 + shadow_step[8] [num_pages, Hkv, D];
    key_shadow_int4  likewise packed two channels a byte; zero point key_min (kernels/key_shadow/README.md)
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .kernels.key_shadow.reference import code_dim, quantize_pages

KEY_MINMAX = "key_minmax"
VALUE_NORM = "value_norm"
KEY_SHADOW = {8: "key_shadow_int8", 4: "key_shadow_int4"}  # low-bit per-token K copy, by bits


class Summary:
    """One kind of page summary. Its tensors live on the cache, one per layer (kernels read them there)."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()  # summaries it is built from (kept too)
    in_fused_write: ClassVar[bool] = False  # kernels/decoder_ops' rope_write keeps it up to date

    def check(self, cache) -> None:
        """Refuse a cache shape the summary cannot describe (ValueError naming the fix)."""

    def allocate(self, cache) -> None:
        raise NotImplementedError

    def reset(self, cache, pages: torch.Tensor, layers=None) -> None:
        """Fresh pages [U] (no token yet) in `layers` (None: every layer)."""
        raise NotImplementedError

    def update(self, cache, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens k, v [T, Hkv, D] were written to ``slots`` (already in the cache)."""
        raise NotImplementedError

    def rebuild(self, cache, layer: int, pages: torch.Tensor, counts: torch.Tensor) -> None:
        """Recompute pages [U] from their K/V; counts [U] = tokens written in each page."""
        raise NotImplementedError

    def bytes_per_page(self, cache) -> int:
        """Bytes a reader of this summary reads per (page, KV head)."""
        raise NotImplementedError


def _layers(cache, layers):
    return range(cache.num_layers) if layers is None else layers


SUMMARIES: dict[str, Summary] = {}


def register_summary(summary: Summary) -> Summary:
    if summary.name in SUMMARIES:
        raise ValueError(f"summary {summary.name!r} is registered twice")
    SUMMARIES[summary.name] = summary
    return summary


def resolve(names) -> list[Summary]:
    """The summaries ``names`` need, dependencies first; an unknown name is a ValueError listing the known."""
    unknown = set(names) - set(SUMMARIES)
    if unknown:
        raise ValueError(f"unknown summaries {sorted(unknown)}; known: {list(SUMMARIES)}")
    out: list[Summary] = []

    def add(name: str) -> None:
        s = SUMMARIES[name]
        for dep in s.requires:
            add(dep)
        if s not in out:
            out.append(s)

    for name in SUMMARIES:  # registration order: the same order for the same set
        if name in names:
            add(name)
    return out


def _valid_tokens(cache, counts: torch.Tensor) -> torch.Tensor:
    """[U, 1, S, 1] bool: the written token slots of pages with counts [U]."""
    return (torch.arange(cache.page_size, device=counts.device)[None, :] < counts[:, None])[:, None, :, None]


class KeyMinMax(Summary):
    name = KEY_MINMAX
    in_fused_write = True

    def allocate(self, cache) -> None:
        shape = (cache.num_pages, cache.num_kv_heads, cache.head_dim)
        cache.key_min = [torch.empty(shape, dtype=cache.dtype, device=cache.device) for _ in range(cache.num_layers)]
        cache.key_max = [torch.empty_like(t) for t in cache.key_min]

    def reset(self, cache, pages, layers=None) -> None:
        for layer in _layers(cache, layers):
            cache.key_min[layer].index_fill_(0, pages, torch.finfo(cache.dtype).max)
            cache.key_max[layer].index_fill_(0, pages, torch.finfo(cache.dtype).min)

    def update(self, cache, layer, slots, k, v) -> None:
        idx = slots.page_ids[:, None, None].expand_as(k)
        cache.key_min[layer].scatter_reduce_(0, idx, k, "amin")
        cache.key_max[layer].scatter_reduce_(0, idx, k, "amax")

    def rebuild(self, cache, layer, pages, counts) -> None:
        kp = cache.k[layer][pages]  # [U, Hkv, S, D]
        valid = _valid_tokens(cache, counts)
        big = torch.finfo(cache.dtype).max
        cache.key_min[layer][pages] = kp.masked_fill(~valid, big).amin(2)
        cache.key_max[layer][pages] = kp.masked_fill(~valid, -big).amax(2)

    def bytes_per_page(self, cache) -> int:
        return 2 * cache.head_dim * cache.dtype.itemsize


class ValueNorm(Summary):
    name = VALUE_NORM
    in_fused_write = True

    def allocate(self, cache) -> None:
        cache.value_norm = [torch.empty(cache.num_pages, cache.num_kv_heads, dtype=torch.float32, device=cache.device)
                            for _ in range(cache.num_layers)]

    def reset(self, cache, pages, layers=None) -> None:
        for layer in _layers(cache, layers):
            cache.value_norm[layer].index_fill_(0, pages, 0.0)

    def update(self, cache, layer, slots, k, v) -> None:
        norms = v.float().norm(dim=-1)  # [T, Hkv]
        cache.value_norm[layer].scatter_reduce_(0, slots.page_ids[:, None].expand_as(norms), norms, "amax")

    def rebuild(self, cache, layer, pages, counts) -> None:
        norms = cache.v[layer][pages].float().norm(dim=-1)  # [U, Hkv, S]
        cache.value_norm[layer][pages] = norms.masked_fill(~_valid_tokens(cache, counts)[..., 0], 0.0).amax(-1)

    def bytes_per_page(self, cache) -> int:
        return 4


class KeyShadow(Summary):
    """A low-bit copy of every key, quantized per (page, head, channel) between key_min and key_max."""

    requires = (KEY_MINMAX,)

    def __init__(self, bits: int):
        self.bits = bits
        self.name = KEY_SHADOW[bits]

    def check(self, cache) -> None:
        if self.bits == 4 and cache.head_dim % 2:
            raise ValueError(f"PagedKVCache: {self.name} packs two channels a byte; head_dim must be even, "
                             f"got {cache.head_dim}")

    def allocate(self, cache) -> None:
        shape = (cache.num_pages, cache.num_kv_heads, cache.page_size)
        cshape = shape + (code_dim(cache.head_dim, self.bits),)
        cache.shadow_codes[self.bits] = [torch.zeros(cshape, dtype=torch.uint8, device=cache.device)
                                         for _ in range(cache.num_layers)]
        cache.shadow_step[self.bits] = [torch.zeros(shape[:2] + (cache.head_dim,), dtype=cache.dtype,
                                                    device=cache.device) for _ in range(cache.num_layers)]

    def reset(self, cache, pages, layers=None) -> None:
        for layer in _layers(cache, layers):
            cache.shadow_codes[self.bits][layer].index_fill_(0, pages, 0)
            cache.shadow_step[self.bits][layer].index_fill_(0, pages, 0)

    def update(self, cache, layer, slots, k, v) -> None:
        if slots.num_tokens:
            # hand-built slots pay a torch.unique (a device sync on CUDA); reserve()'s carry the pages
            pages = torch.unique(slots.page_ids) if slots.touched_pages is None else slots.touched_pages
            self.requantize(cache, layer, pages)

    def rebuild(self, cache, layer, pages, counts) -> None:
        self.requantize(cache, layer, pages)

    def requantize(self, cache, layer: int, pages: torch.Tensor) -> None:
        """Whole pages: their min/max (zero point, step) may have moved with the new tokens."""
        codes, step = quantize_pages(cache.k[layer][pages], cache.key_min[layer][pages], cache.key_max[layer][pages],
                                     self.bits, cache.dtype)
        cache.shadow_codes[self.bits][layer][pages] = codes
        cache.shadow_step[self.bits][layer][pages] = step

    def bytes_per_page(self, cache) -> int:
        """Codes, the per-channel step and the zero point (key_min) of a page."""
        return cache.page_size * code_dim(cache.head_dim, self.bits) + 2 * cache.head_dim * cache.dtype.itemsize


for _s in (KeyMinMax(), ValueNorm(), KeyShadow(8), KeyShadow(4)):
    register_summary(_s)
