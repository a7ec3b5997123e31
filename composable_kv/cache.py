"""Paged KV cache with FlashInfer's conventions and per-page summaries.

K and V per layer: [num_pages, num_kv_heads, page_size, head_dim] (HND). Page tables are shared by
all layers: `reserve()` allocates pages and advances lengths once per step, then `write()` fills each
layer. The summaries the policy's stages declare (composable_kv.summaries: key_minmax, value_norm,
key_shadow_int8/int4) are allocated, reset for fresh pages and updated on write by their registered
objects; their tensors are attributes of the cache (`key_min`, `key_max`, `value_norm`,
`shadow_codes[bits]`, `shadow_step[bits]`), one per layer, where the kernels read them.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .contracts import FLOAT_DTYPES, check_finite, check_int, check_tensor, value_checks_on
from .errors import CacheFullError, TensorContractError
from . import summaries as summ
from .ints import cdiv


@dataclass
class AppendSlots:
    """Where the tokens of one `reserve()` go; packed in the order of `seq_ids`."""
    seq_ids: list[int]
    counts: list[int]
    page_ids: torch.Tensor  # [T] int64 physical page of each token
    offsets: torch.Tensor   # [T] int64 slot within the page
    touched_pages: torch.Tensor | None = None  # [U] int64 distinct pages written (reserve() knows them on the host)

    @property
    def num_tokens(self) -> int:
        return int(self.page_ids.shape[0])


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int,
                 page_size: int = 16, dtype: torch.dtype = torch.float16, device="cpu",
                 summaries=frozenset(), validate: bool | None = None):
        """validate: NaN/Inf checks on written K/V (None: on for CPU caches or CKV_VALIDATE=1; see contracts)."""
        if dtype not in FLOAT_DTYPES:
            raise TensorContractError(f"PagedKVCache: dtype expected one of {[str(d) for d in FLOAT_DTYPES]}, "
                                      f"got {dtype!r}")
        for key, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                         ("head_dim", head_dim), ("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"PagedKVCache: {key} must be a positive int, got {val!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_pages, self.page_size, self.dtype = num_pages, page_size, dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:N", as tensors report it
            self.device = torch.device("cuda", torch.cuda.current_device())
        try:
            self._summaries = summ.resolve(summaries)  # dependencies first (a key shadow needs key_min/max)
        except ValueError as e:
            raise ValueError(f"PagedKVCache: {e}") from None
        for s in self._summaries:
            s.check(self)
        self.summaries = frozenset(s.name for s in self._summaries)
        self.shadow_bits = tuple(s.bits for s in self._summaries if isinstance(s, summ.KeyShadow))
        self.check_values = value_checks_on(validate, self.device)
        shape = (num_pages, num_kv_heads, page_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.key_min = self.key_max = self.value_norm = None
        self.shadow_codes: dict[int, list[torch.Tensor]] = {}
        self.shadow_step: dict[int, list[torch.Tensor]] = {}
        for s in self._summaries:
            s.allocate(self)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._pages: dict[int, list[int]] = {}
        self._len: dict[int, int] = {}
        self._next_id = 0
        self._stage_states: dict[int, tuple] = {}  # id(stage) -> (weakref to the stage, its StageState)

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def sequences(self) -> list[int]:
        return list(self._pages)

    def seq_len(self, seq_id: int) -> int:
        return self._len[self._known(seq_id)]

    def pages(self, seq_id: int) -> list[int]:
        return list(self._pages[self._known(seq_id)])

    def _known(self, seq_id: int) -> int:
        if seq_id not in self._pages:
            raise KeyError(f"sequence {seq_id} is not in the cache (live: {sorted(self._pages)[:16]})")
        return seq_id

    def add_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self._pages[sid], self._len[sid] = [], 0
        return sid

    def free(self, seq_id: int) -> None:
        """Finish a sequence; its pages go back to the pool and the stages' states forget it."""
        self._free.extend(reversed(self._pages.pop(self._known(seq_id))))
        del self._len[seq_id]
        for _, state in self._stage_states.values():
            if state is not None:
                state.free_sequence(seq_id)

    def stage_state(self, stage):
        """`stage`'s run-time state for this cache (Stage.new_state), made on first use."""
        entry = self._stage_states.get(id(stage))
        if entry is None or entry[0]() is not stage:  # an id is reused only after its stage is gone
            entry = (weakref.ref(stage), stage.new_state(self))
            self._stage_states[id(stage)] = entry
        return entry[1]

    def adopt_stage_state(self, stage, state) -> None:
        """Give `stage` this state on this cache (e.g. a reference pipeline reusing another's prefill votes)."""
        self._stage_states[id(stage)] = (weakref.ref(stage), state)

    def reserve(self, seq_ids: list[int], counts: list[int]) -> AppendSlots:
        """Make room for counts[i] new tokens of seq_ids[i] (all layers); all or nothing."""
        if len(seq_ids) != len(counts):
            raise ValueError(f"reserve: {len(seq_ids)} seq_ids but {len(counts)} counts")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"reserve: seq_ids has duplicates: {seq_ids}")
        S = self.page_size
        need = 0
        for sid, n in zip(seq_ids, counts):
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"reserve: counts must be ints >= 0, got {n!r} for sequence {sid}")
            length = self._len[self._known(sid)]
            need += max(0, cdiv(length + n, S) - len(self._pages[sid]))
        if need > len(self._free):
            raise CacheFullError(f"out of KV pages: this reserve needs {need} new pages but {len(self._free)} "
                                 f"of {self.num_pages} are free; free finished sequences or build the cache "
                                 f"with more num_pages. Nothing was changed.")
        page_ids, offsets, fresh, touched = [], [], [], []
        for sid, n in zip(seq_ids, counts):
            pages, length = self._pages[sid], self._len[sid]
            while len(pages) * S < length + n:
                fresh.append(self._free.pop())
                pages.append(fresh[-1])
            touched += pages[length // S: cdiv(length + n, S)]
            pos = torch.arange(length, length + n)
            page_ids.append(torch.tensor(pages, dtype=torch.int64)[pos // S])
            offsets.append(pos % S)
            self._len[sid] = length + n
        self._reset_summaries(fresh)
        cat = (lambda xs: torch.cat(xs).to(self.device)) if page_ids else (
            lambda xs: torch.zeros(0, dtype=torch.int64, device=self.device))
        return AppendSlots(list(seq_ids), list(counts), cat(page_ids), cat(offsets),
                           torch.tensor(touched, dtype=torch.int64).to(self.device))

    def reserve_ahead(self, seq_ids: list[int], total_tokens: int) -> None:
        """Give each sequence every page it needs to reach `total_tokens` tokens, now; lengths stay.

        The page table is then fixed until the sequences are freed: the decode runtime's static step
        writes each new token into a page reserved here and `advance()` only counts it."""
        S = self.page_size
        need = sum(max(0, cdiv(total_tokens, S) - len(self._pages[self._known(s)])) for s in seq_ids)
        if need > len(self._free):
            raise CacheFullError(f"out of KV pages: reserving {total_tokens} tokens for {len(seq_ids)} sequences "
                                 f"needs {need} new pages but {len(self._free)} of {self.num_pages} are free; "
                                 f"build the cache with more num_pages. Nothing was changed.")
        fresh = []
        for sid in seq_ids:
            pages = self._pages[sid]
            while len(pages) * S < total_tokens:
                fresh.append(self._free.pop())
                pages.append(fresh[-1])
        self._reset_summaries(fresh)

    def decode_slots(self, seq_ids: list[int], page_table: torch.Tensor, positions: torch.Tensor) -> AppendSlots:
        """Where a decode step's new tokens go, from the step's page table [B, P] and positions [B] (device
        ops only: the decode runtime calls it inside its graph)."""
        S = self.page_size
        page_ids = page_table.gather(1, (positions // S)[:, None].to(torch.int64))[:, 0].long()  # [B]
        return AppendSlots(list(seq_ids), [1] * len(seq_ids), page_ids, positions % S, page_ids)

    def advance(self, seq_ids: list[int], count: int = 1) -> None:
        """Count `count` tokens written on the device into pages reserved ahead (host bookkeeping only)."""
        S = self.page_size
        for sid in seq_ids:
            n = self._len[sid] + count
            if n > len(self._pages[sid]) * S:
                raise CacheFullError(f"sequence {sid} would hold {n} tokens but only "
                                     f"{len(self._pages[sid]) * S} were reserved ahead (reserve_ahead)")
            self._len[sid] = n

    def _reset_summaries(self, pages: list[int]) -> None:
        if pages and self._summaries:
            idx = torch.tensor(pages, dtype=torch.int64, device=self.device)
            for s in self._summaries:
                s.reset(self, idx)

    # -- data ------------------------------------------------------------------------------------
    def write(self, layer: int, slots: AppendSlots, k: torch.Tensor, v: torch.Tensor, *,
              _checked: bool = False) -> None:
        """Write one layer's new K/V ([T, Hkv, D], packed like `slots`) and update its summaries."""
        check_int("write", "layer", layer)
        if not 0 <= layer < self.num_layers:
            raise TensorContractError(f"write: layer must be in [0, {self.num_layers}), got {layer}")
        expected = (slots.num_tokens, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            check_tensor("write", name, t, dtypes=None)
            if tuple(t.shape) != expected:
                raise TensorContractError(f"write: {name} expected shape [T, Hkv, D] = {list(expected)}, "
                                          f"got {list(t.shape)}")
            if t.dtype != self.dtype:
                raise TensorContractError(f"write: {name} dtype is {t.dtype}, the cache holds {self.dtype}; "
                                          f"cast with .to({self.dtype})")
            if t.device != self.device:
                raise TensorContractError(f"write: {name} is on {t.device}, the cache is on {self.device}")
            if self.check_values and not _checked:
                check_finite("write", name, t, "token, head, d")
        self.k[layer][slots.page_ids, :, slots.offsets] = k
        self.v[layer][slots.page_ids, :, slots.offsets] = v
        for s in self._summaries:
            s.update(self, layer, slots, k, v)

    def summary_tensors(self, layer: int) -> tuple:
        """(key_min, key_max, value_norm) of `layer`, None where not kept: what the fused write kernel updates."""
        minmax = (None, None) if self.key_min is None else (self.key_min[layer], self.key_max[layer])
        return (*minmax, None if self.value_norm is None else self.value_norm[layer])

    def refresh_after_fused_write(self, layer: int, slots: AppendSlots) -> None:
        """After a fused kernel wrote K/V and the summaries it keeps (summary_tensors), update the others."""
        for s in self._summaries:
            if not s.in_fused_write:
                s.update(self, layer, slots, None, None)

    # the fused decoder's write hook (composable_kv.decoder): one token per request, `ops` = kernels/decoder_ops
    fused_write = "rope_write (rotary + K/V page write + key min/max, value norm: one kernel)"

    def rope_write(self, layer: int, slots: AppendSlots, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, ops) -> torch.Tensor:
        """Rotary on q [B, Hq*D] and k [B, Hkv*D] (cos/sin [B, D]), the new K/V into `slots` with the
        summaries updated -> the rotated q [B, Hq, D]. Another cache (an admission stage's) may write its own way."""
        q = ops.rope_write(q, k, v, cos, sin, self.k[layer], self.v[layer], slots.page_ids, slots.offsets,
                           *self.summary_tensors(layer))
        self.refresh_after_fused_write(layer, slots)
        return q

    def rebuild_summaries(self, layer: int, seq_ids: list[int] | None = None, chunk: int = 8192) -> None:
        """Recompute every summary of the sequences' pages from their K/V (after K/V were filled directly),
        `chunk` pages at a time (a rebuild copies the pages it reads)."""
        pages, counts = [], []
        for sid in (self.sequences() if seq_ids is None else seq_ids):
            n = self._len[self._known(sid)]
            for i, p in enumerate(self._pages[sid]):
                pages.append(p)
                counts.append(max(0, min(self.page_size, n - i * self.page_size)))
        if not pages:
            return
        idx = torch.tensor(pages, dtype=torch.int64, device=self.device)
        cnt = torch.tensor(counts, dtype=torch.int64, device=self.device)
        for i in range(0, len(pages), chunk):
            self.rebuild_pages(layer, idx[i:i + chunk], cnt[i:i + chunk])

    def rebuild_pages(self, layer: int, pages: torch.Tensor, counts: torch.Tensor) -> None:
        """Recompute every summary of `pages` [U] (int64, device) from their first `counts` [U] tokens.
        Device ops only; a page listed twice gets the same values twice."""
        for s in self._summaries:  # dependencies first: a key shadow quantizes against the new min/max
            s.rebuild(self, layer, pages, counts)

    def append(self, seq_ids: list[int], counts: list[int], k: torch.Tensor, v: torch.Tensor) -> AppendSlots:
        """reserve() plus write() for every layer. k, v: [num_layers, T, Hkv, D]."""
        # every check before reserve(): a refused append changes nothing
        T = sum(counts) if all(isinstance(n, int) and n >= 0 for n in counts) else None  # else reserve() says
        for name, t in (("k", k), ("v", v)):
            check_tensor("append", name, t, shape=(self.num_layers, T, self.num_kv_heads, self.head_dim),
                         dims="num_layers, T=sum(counts), Hkv, D", dtype=self.dtype, dtypes=None,
                         device=self.device)
            if self.check_values:
                check_finite("append", name, t, "layer, token, head, d")
        slots = self.reserve(seq_ids, counts)
        for layer in range(self.num_layers):
            self.write(layer, slots, k[layer], v[layer], _checked=True)
        return slots

    def gather(self, layer: int, seq_id: int):
        """A sequence's K and V in order: ([T, Hkv, D], [T, Hkv, D])."""
        T = self.seq_len(seq_id)
        pages = torch.tensor(self._pages[seq_id], dtype=torch.int64, device=self.device)
        k = self.k[layer][pages].transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)[:T]
        v = self.v[layer][pages].transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)[:T]
        return k, v

    # -- page tables -------------------------------------------------------------------------------
    def page_table(self, seq_ids: list[int]):
        """FlashInfer's CSR tables: (kv_indptr [B+1], kv_indices [nnz], kv_last_page_len [B]), int32."""
        pages = [self._pages[self._known(s)] for s in seq_ids]
        indptr = torch.tensor([0] + [len(p) for p in pages], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        indices = torch.tensor([i for p in pages for i in p], dtype=torch.int32)
        last = torch.tensor([(self._len[s] - 1) % self.page_size + 1 if self._len[s] else 0 for s in seq_ids],
                            dtype=torch.int32)
        return indptr.to(self.device), indices.to(self.device), last.to(self.device)

    def padded_page_table(self, seq_ids: list[int]):
        """([B, P] int32 page ids padded with 0, [B] int32 lengths), P = the most pages of any request."""
        pages = [self._pages[self._known(s)] for s in seq_ids]
        P = max([len(p) for p in pages] + [1])
        table = torch.zeros(len(seq_ids), P, dtype=torch.int32)
        for i, p in enumerate(pages):
            table[i, :len(p)] = torch.tensor(p, dtype=torch.int32)
        lens = torch.tensor([self._len[s] for s in seq_ids], dtype=torch.int32)
        return table.to(self.device), lens.to(self.device)
