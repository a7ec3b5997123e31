"""The write-gated cache: head-major pages and ring windows, kept up to date by device ops of fixed shapes.

Layout. One `PagedKVCache` with num_kv_heads=1 is the page pool of every layer. Each (layer, request,
KV head) triple has its own page table (`pages`) and holds

    [ admitted global tokens (oldest first) | ring window: the last <= W tokens, in any slot order ]
      slots 0 .. n_global-1                   n_global .. kept-1

Attention is order-free over keys (RoPE is already applied), so only the *set* matters, and the
sequence stays contiguous (only its last page is partial) as the window slides. A decode step, per triple:
  * window not full: the new token is appended (slot `kept`);
  * else the oldest window token o (slot s_o) leaves. Admitted (its gate g_o > threshold): it swaps with
    the token at slot n_global, n_global += 1, the new token is appended. Dropped: the new token
    overwrites slot s_o.
The global region never moves again; a page that becomes fully global gets exact summaries (overwrites
leave window pages' min/max loose, which is sound: still a bound).

Device state, per triple (`[L, R, H]`, R request rows): `kept`, `n_global`, and the ring of window
tokens `ring_slot` / `ring_admit` `[.., W]` (the token at position p sits at ring index p % W: its
slot and its gate decision, read when it leaves). A decode token's write is one op a layer,
`kernels/gated_write` `gated_write` (the gate MLP, the ring step, the move, the new K/V, the key min/max and
value norm of the pages written): one Triton kernel on CUDA and under TRITON_INTERPRET, its pure-torch
reference (fixed-shape ops; a triple with nothing to move writes to a trash page) otherwise
(`kernels.backend_for`; `write_path` says which). Either way a decode step has no host plan and no host
sync. The host keeps the
requests' lengths and reserves pages (every triple gets pages for the request's whole length, as a
dense cache would: `reserve` per step on the host path, `reserve_ahead` once on the device path).
`slot_pos` records the position held by every pool slot (4 bytes a token) for `kept_positions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from composable_kv.cache import AppendSlots, PagedKVCache
from composable_kv.contracts import check_finite, value_checks_on
from composable_kv.errors import CacheFullError, TensorContractError
from composable_kv.ints import cdiv
from composable_kv.kernels import backend_for
from composable_kv.kernels.gated_write.reference import rotate_half, unrope  # noqa: F401 (re-exported)
from composable_kv.policies.write_gate.gate import GateMLP
from composable_kv.summaries import SUMMARIES

GateFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, k_pre, k_post) [T,H,D] -> g [T,H]
RopeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # positions [T] -> cos, sin [T, D]


@dataclass
class GatedSlots:
    """Where one `reserve()` (or a decode step) puts tokens: per request `counts[i]` tokens, at
    `positions` [T] int64 on the cache's device (request-major, like the tokens)."""
    seq_ids: list[int]
    counts: list[int]
    positions: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def ring_prefill(admit: torch.Tensor, window: int):
    """An empty sequence takes n tokens at once, admit [n, H] bool -> (dst [n, H] slot or -1 for dropped,
    n_global [H], ring_slot [H, W], ring_admit [H, W]): admitted tokens before the window, then the window."""
    n, H = admit.shape
    w = min(window, n)
    keep = admit.clone()
    keep[n - w:] = True
    dst = torch.where(keep, keep.long().cumsum(0) - 1, -1)  # [n, H]
    n_global = keep[:n - w].sum(0)
    ring_slot = torch.full((H, window), -1, dtype=torch.long, device=admit.device)
    ring_admit = torch.zeros(H, window, dtype=torch.bool, device=admit.device)
    idx = torch.arange(n - w, n, device=admit.device) % window  # ring index of each window token
    ring_slot[:, idx] = dst[n - w:].T
    ring_admit[:, idx] = admit[n - w:].T
    return dst, n_global, ring_slot, ring_admit


@dataclass
class _Batch:
    """Device views for one list of requests (built on the host when the batch or its pages change)."""
    seq_ids: tuple
    rows: torch.Tensor    # [B] int64 state rows
    tables: torch.Tensor  # [L, B * H, P] int32 page tables of the triples, request-major
    head_ids: list        # [B * H] ints: the inner plan's seq_ids (one per triple)


class GatedKVCache:
    """Head-major paged KV cache with write-gated admission (see the module docstring).

    The session-facing API mirrors `PagedKVCache`: add_sequence / reserve / reserve_ahead / advance /
    write / seq_len / free. `write(layer, slots, k, v, g=None)`: k, v `[T, Hkv, D]` post-RoPE; g `[T, Hkv]`
    the gate, computed with `gate(layer, unrope(k), k)` when not given (a `GateMLP` runs inside the decode
    write op). Layers outside `gated_layers` admit every token. `write_backend`: "triton" or "reference" for
    the decode write op (default `kernels.backend_for(device)`).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float16, device="cpu", summaries=frozenset(), *,
                 window_tokens: int = 256, threshold: float = 0.1, gate: GateFn | None = None,
                 rope: RopeFn | None = None, gated_layers=None, validate: bool | None = None,
                 write_backend: str | None = None):
        if not isinstance(window_tokens, int) or window_tokens < 1:
            raise ValueError(f"GatedKVCache: window_tokens must be an int >= 1, got {window_tokens!r}")
        if write_backend not in (None, "triton", "reference"):
            raise ValueError(f"GatedKVCache: write_backend must be 'triton', 'reference' or None, got {write_backend!r}")
        self.pool = PagedKVCache(1, 1, head_dim, num_pages, page_size, dtype, device, summaries)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, self.pool.device
        self.summaries = self.pool.summaries
        self.window_tokens, self.threshold = window_tokens, threshold
        self.gate, self.rope = gate, rope
        self.gated_layers = frozenset(range(num_layers) if gated_layers is None else gated_layers)
        self.check_values = value_checks_on(validate, self.device)
        self.write_backend = write_backend or backend_for(self.device)
        if self.write_backend == "triton":
            from composable_kv.kernels.gated_write import triton as write_ops
        else:
            from composable_kv.kernels.gated_write import reference as write_ops
        self._write_ops = write_ops
        self._refreshed = [n for n in self.summaries if not SUMMARIES[n].in_fused_write]  # key shadows
        self._trash_sid = self.pool.add_sequence()  # one page that takes the writes of triples with nothing to move
        self.pool.reserve_ahead([self._trash_sid], page_size)
        self.trash_slot = self.pool.pages(self._trash_sid)[0] * page_size
        self.slot_pos = torch.full((num_pages * page_size,), -1, dtype=torch.int32, device=self.device)
        self._len: dict[int, int] = {}    # request -> tokens seen (its next position)
        self._cols: dict[int, int] = {}   # request -> pages every one of its triples holds
        self._row: dict[int, int] = {}    # request -> state row
        self._sid: dict[int, int] = {}    # request -> pool sequence owning its pages
        self._free_rows: list[int] = []
        self._next_id = 0
        self._batch: _Batch | None = None
        L, H, W, dev = num_layers, num_kv_heads, window_tokens, self.device
        self.kept = torch.zeros(L, 0, H, dtype=torch.long, device=dev)         # [L, R, H]
        self.n_global = torch.zeros(L, 0, H, dtype=torch.long, device=dev)     # [L, R, H]
        self.ring_slot = torch.full((L, 0, H, W), -1, dtype=torch.long, device=dev)  # [L, R, H, W]
        self.ring_admit = torch.zeros(L, 0, H, W, dtype=torch.bool, device=dev)      # [L, R, H, W]
        self.pages = torch.zeros(L, 0, H, 0, dtype=torch.int32, device=dev)    # [L, R, H, P]

    def _resize(self, rows: int, cols: int) -> None:
        """Room for `rows` requests and `cols` pages a triple (host, when requests arrive or pages grow)."""
        def grown(t, shape, fill):
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            out[tuple(slice(0, n) for n in t.shape)] = t
            return out
        L, H, W = self.num_layers, self.num_kv_heads, self.window_tokens
        self.kept = grown(self.kept, (L, rows, H), 0)
        self.n_global = grown(self.n_global, (L, rows, H), 0)
        self.ring_slot = grown(self.ring_slot, (L, rows, H, W), -1)
        self.ring_admit = grown(self.ring_admit, (L, rows, H, W), False)
        self.pages = grown(self.pages, (L, rows, H, cols), 0)
        self._batch = None

    # -- requests ----------------------------------------------------------------------------------
    def add_sequence(self) -> int:
        rid = self._next_id
        self._next_id += 1
        if not self._free_rows:
            R = self.kept.shape[1]
            self._resize(max(1, 2 * R), self.pages.shape[3])
            self._free_rows = list(range(self.kept.shape[1] - 1, R - 1, -1))  # pop() hands out row R first
        row = self._free_rows.pop()
        self.kept[:, row] = 0
        self.n_global[:, row] = 0
        self.ring_slot[:, row] = -1
        self.ring_admit[:, row] = False
        self._len[rid], self._cols[rid], self._row[rid] = 0, 0, row
        self._sid[rid] = self.pool.add_sequence()
        self._batch = None
        return rid

    def sequences(self) -> list[int]:
        return list(self._len)

    def seq_len(self, seq_id: int) -> int:
        """Tokens the request has seen (its next position), kept or not."""
        return self._len[self._known(seq_id)]

    def _known(self, seq_id: int) -> int:
        if seq_id not in self._len:
            raise KeyError(f"request {seq_id} is not in the gated cache (live: {sorted(self._len)[:16]})")
        return seq_id

    def free(self, seq_id: int) -> None:
        self.pool.free(self._sid.pop(self._known(seq_id)))
        self._free_rows.append(self._row.pop(seq_id))
        del self._len[seq_id], self._cols[seq_id]
        self._batch = None

    def _ensure_pages(self, seq_ids: list[int], tokens: list[int]) -> None:
        """Every triple of seq_ids[i] gets pages for tokens[i] tokens (what it holds if it keeps every token)."""
        L, H, S = self.num_layers, self.num_kv_heads, self.page_size
        grow = [(rid, cdiv(n, S)) for rid, n in zip(seq_ids, tokens) if cdiv(n, S) > self._cols[rid]]
        if not grow:
            return
        need = sum((c - self._cols[rid]) * L * H for rid, c in grow)
        if need > self.pool.num_free_pages:
            raise CacheFullError(f"out of KV pages: the gated cache needs {need} more pages (layers x KV heads "
                                 f"x pages) but {self.pool.num_free_pages} of {self.pool.num_pages} are free; "
                                 f"build it with more num_pages. Nothing was changed.")
        width = max(c for _, c in grow)
        if width > self.pages.shape[3]:
            self._resize(self.kept.shape[1], width)
        for rid, c in grow:
            sid, old = self._sid[rid], self._cols[rid]
            self.pool.reserve_ahead([sid], c * L * H * S)
            fresh = torch.tensor(self.pool.pages(sid)[old * L * H:], dtype=torch.int32).view(c - old, L, H)
            self.pages[:, self._row[rid], :, old:c] = fresh.permute(1, 2, 0).to(self.device)
            self._cols[rid] = c
        self._batch = None

    def reserve(self, seq_ids: list[int], counts: list[int]) -> GatedSlots:
        """Positions for counts[i] new tokens of seq_ids[i]; their triples get pages for them now."""
        if len(seq_ids) != len(counts) or len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"reserve: expected distinct seq_ids and one count each, got {seq_ids} / {counts}")
        for sid, n in zip(seq_ids, counts):
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"reserve: counts must be ints >= 0, got {n!r} for request {sid}")
            if n > 1 and self._len[self._known(sid)] > 0:
                raise NotImplementedError(f"reserve: request {sid} already holds tokens; the gated cache takes "
                                          f"one prefill (any length) then one token per step, got {n}")
        self._ensure_pages(list(seq_ids), [self._len[s] + n for s, n in zip(seq_ids, counts)])
        positions = []
        for sid, n in zip(seq_ids, counts):
            positions += range(self._len[sid], self._len[sid] + n)
            self._len[sid] += n
        return GatedSlots(list(seq_ids), list(counts), torch.tensor(positions, dtype=torch.long).to(self.device))

    def reserve_ahead(self, seq_ids: list[int], total_tokens: int) -> None:
        """Pages for `total_tokens` tokens in every triple of the requests, now: decode steps then need
        nothing from the host (`decode_slots`, `advance`)."""
        self._ensure_pages(list(seq_ids), [max(total_tokens, self._len[self._known(s)]) for s in seq_ids])

    def advance(self, seq_ids: list[int], count: int = 1) -> None:
        """Count `count` tokens written on the device (host bookkeeping only)."""
        for sid in seq_ids:
            n = self._len[sid] + count
            if n > self._cols[sid] * self.page_size:
                raise CacheFullError(f"request {sid} would hold {n} tokens but its triples have pages for "
                                     f"{self._cols[sid] * self.page_size} (reserve_ahead)")
            self._len[sid] = n

    def padded_page_table(self, seq_ids: list[int]):
        """([B, 0] int32, [B] int32 lengths): a gated cache has no request-level pages (each triple has its
        own, `batch(seq_ids).tables`); the decode runtime takes the lengths, and `decode_slots` the positions."""
        lens = torch.tensor([self._len[self._known(s)] for s in seq_ids], dtype=torch.int32)
        return torch.zeros(len(seq_ids), 0, dtype=torch.int32, device=self.device), lens.to(self.device)

    def decode_slots(self, seq_ids: list[int], page_table: torch.Tensor, positions: torch.Tensor) -> GatedSlots:
        """A decode step's new tokens (one per request) at positions [B] (device): device ops only."""
        return GatedSlots(list(seq_ids), [1] * len(seq_ids), positions.long())

    def batch(self, seq_ids: list[int]) -> _Batch:
        """Rows and page tables of the requests' triples (cached until the batch or a page table changes)."""
        key = tuple(seq_ids)
        if self._batch is None or self._batch.seq_ids != key:
            rows = torch.tensor([self._row[self._known(s)] for s in seq_ids], dtype=torch.long).to(self.device)
            L, P = self.num_layers, self.pages.shape[3]
            tables = self.pages.index_select(1, rows).reshape(L, len(seq_ids) * self.num_kv_heads, P).contiguous()
            self._batch = _Batch(key, rows, tables, list(range(len(seq_ids) * self.num_kv_heads)))
        return self._batch

    # -- writes ------------------------------------------------------------------------------------
    def gate_values(self, layer: int, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """g [T, Hkv] for post-RoPE keys k [T, Hkv, D] at positions [T] (device)."""
        if self.gate is None:
            raise ValueError("GatedKVCache.write: no gate was given to the cache; pass g= [T, Hkv] or build the "
                             "cache with gate=")
        if self.rope is None:
            raise ValueError("GatedKVCache.write: the gate reads pre-RoPE keys; build the cache with rope=")
        cos, sin = self.rope(positions)
        return self.gate(layer, unrope(k.float(), cos.to(k.device), sin.to(k.device)), k.float())

    def write(self, layer: int, slots: GatedSlots, k: torch.Tensor, v: torch.Tensor,
              g: torch.Tensor | None = None) -> None:
        T, H = slots.num_tokens, self.num_kv_heads
        expected = (T, H, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise TensorContractError(f"write: {name} expected shape [T, Hkv, D] = {list(expected)}, "
                                          f"got {list(t.shape)}")
            if self.check_values:
                check_finite("write", name, t, "token, head, d")
        if not 0 <= layer < self.num_layers:
            raise TensorContractError(f"write: layer must be in [0, {self.num_layers}), got {layer}")
        gated = layer in self.gated_layers
        decode = all(n == 1 for n in slots.counts)
        if gated and g is None and not (decode and self._gate_in_op()):
            g = self.gate_values(layer, slots.positions, k)
        if gated and g is not None and tuple(g.shape) != (T, H):
            raise TensorContractError(f"write: g expected shape [T, Hkv] = {[T, H]}, got {list(g.shape)}")
        k_gate = k
        k, v = k.to(self.dtype), v.to(self.dtype)
        if decode:
            self._write_step(layer, slots.seq_ids, slots.positions, k, v, g if gated else None, gated, k_gate)
            return
        admit = g > self.threshold if gated else torch.ones(T, H, dtype=torch.bool, device=k.device)
        row = 0
        for rid, n in zip(slots.seq_ids, slots.counts):  # a prefill: once per request, off the decode path
            if n == 1:
                self._write_step(layer, [rid], slots.positions[row:row + 1], k[row:row + 1], v[row:row + 1],
                                 g[row:row + 1] if gated else None, gated, k_gate[row:row + 1])
            elif n > 1:
                self._write_prefill(layer, rid, slots.positions[row:row + n], k[row:row + n], v[row:row + n],
                                    admit[row:row + n])
            row += n

    def _gate_in_op(self) -> bool:
        """The decode write op runs the gate itself (a GateMLP; any other gate callable gives it g)."""
        if self.gate is not None and self.rope is None:
            raise ValueError("GatedKVCache.write: the gate reads pre-RoPE keys; build the cache with rope=")
        return isinstance(self.gate, GateMLP)

    @property
    def write_path(self) -> str:
        """Which decode write runs (describe() and benchmarks print it)."""
        gate = ("gate MLP inside" if isinstance(self.gate, GateMLP) else
                "gate: g computed by the gate callable in torch, then" if self.gate is not None else "g given, then")
        if self.write_backend == "triton":
            return f"{gate} one Triton kernel a layer (kernels/gated_write: gate, ring window, move, K/V, summaries)"
        return f"{gate} the torch reference (kernels/gated_write/reference.py: fixed-shape device ops)"

    @property
    def fused_write(self) -> str:
        """The fused decoder's write hook (composable_kv.decoder; PagedKVCache.rope_write is the plain one)."""
        return f"rope (rotary) then the gated write ({self.write_path})"

    def rope_write(self, layer: int, slots: GatedSlots, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, ops) -> torch.Tensor:
        """Rotary on q [B, Hq*D] and k [B, Hkv*D] (cos/sin [B, D], `ops` = kernels/decoder_ops), then `write`
        of the rotated key and the value in the cache dtype, as the modules' attention writes them
        -> the rotated q [B, Hq, D]."""
        q, k = ops.rope(q, k, cos, sin)  # [B, Hq, D], [B, Hkv, D]
        self.write(layer, slots, k.to(self.dtype), v.view(k.shape).to(self.dtype))
        return q

    def _flat_triple(self, layer: int, row: int, head: torch.Tensor | int, slot: torch.Tensor) -> torch.Tensor:
        """Pool slots of one request's triples: head and slot [N] (or head an int) -> [N] int64."""
        S = self.page_size
        return self.pages[layer, row, head, slot // S].long() * S + slot % S

    def _put(self, flat: torch.Tensor, k_rows, v_rows, pos_rows) -> None:
        """Rows [N, D] to pool slots [N] (summaries updated); every destination is a distinct slot or trash."""
        S = self.page_size
        pages = flat // S
        self.pool.write(0, AppendSlots([], [], pages, flat % S, pages), k_rows[:, None], v_rows[:, None],
                        _checked=True)
        self.slot_pos[flat] = pos_rows

    def _write_step(self, layer, seq_ids, positions, k, v, g, gated, k_gate) -> None:
        """One token per request: k, v [B, H, D] (cache dtype), g [B, H] or None (gated: the op runs the
        GateMLP on k_gate, the key as given; not gated: admit all). One op, `kernels/gated_write`."""
        batch = self.batch(seq_ids)
        B, H, D = k.shape
        mlp = {}
        if gated and g is None:
            cos, sin = self.rope(positions)
            mlp = dict(gate=self.gate.layer_weights(layer), cos=cos.to(k.device, torch.float32),
                       sin=sin.to(k.device, torch.float32), k_gate=k_gate)
        pool = self.pool
        touched = self._write_ops.gated_write(
            k, v, positions, batch.rows, batch.tables[layer], self.kept[layer], self.n_global[layer],
            self.ring_slot[layer], self.ring_admit[layer], self.slot_pos, pool.k[0], pool.v[0],
            *pool.summary_tensors(0), trash_page=self.trash_slot // self.page_size, threshold=self.threshold,
            g=None if g is None else g.float(), **mlp)
        if self._refreshed:  # summaries the op does not keep: rebuilt from the pages it wrote
            pages = touched.flatten()
            pool.refresh_after_fused_write(0, AppendSlots([], [], pages, pages % self.page_size, pages))

    def _write_prefill(self, layer, rid, positions, k, v, admit) -> None:
        """An empty request's n tokens at once (host-shaped: prefill is off the decode path)."""
        row = self._row[rid]
        if int(self.kept[layer, row].max()) > 0:
            raise NotImplementedError("the gated cache takes a multi-token write only into an empty sequence")
        dst, n_global, ring_slot, ring_admit = ring_prefill(admit, self.window_tokens)
        tok, head = (dst >= 0).nonzero(as_tuple=True)
        flat = self._flat_triple(layer, row, head, dst[tok, head])
        self._put(flat, k[tok, head], v[tok, head], positions[tok].to(torch.int32))
        self.kept[layer, row] = n_global + min(self.window_tokens, k.shape[0])
        self.n_global[layer, row] = n_global
        self.ring_slot[layer, row] = ring_slot
        self.ring_admit[layer, row] = ring_admit

    # -- read side -------------------------------------------------------------------------------------
    def kept_lengths(self, layer: int, seq_ids: list[int]) -> torch.Tensor:
        """Tokens each triple of `layer` holds, request-major: [B * Hkv] int32 (device)."""
        return self.kept[layer, self.batch(seq_ids).rows].flatten().to(torch.int32)

    def kept_positions(self, seq_id: int, layer: int, head: int) -> list[int]:
        """Token positions the (request, layer, head) keeps, in slot order (window included). Host sync."""
        row = self._row[self._known(seq_id)]
        n = int(self.kept[layer, row, head])
        return self.slot_pos[self._flat_triple(layer, row, head, torch.arange(n, device=self.device))].tolist()

    def triple_kv(self, seq_id: int, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The triple's K and V in slot order: ([kept, D], [kept, D])."""
        row = self._row[self._known(seq_id)]
        n = int(self.kept[layer, row, head])
        flat = self._flat_triple(layer, row, head, torch.arange(n, device=self.device))
        D = self.head_dim
        return self.pool.k[0].view(-1, D)[flat], self.pool.v[0].view(-1, D)[flat]

    def triple_pages(self, seq_id: int, layer: int, head: int) -> list[int]:
        """The pool pages holding the triple's tokens, in order."""
        row = self._row[self._known(seq_id)]
        n = int(self.kept[layer, row, head])
        return self.pages[layer, row, head, :cdiv(n, self.page_size)].tolist()

    def window_len(self, seq_id: int) -> int:
        return min(self.window_tokens, self.seq_len(seq_id))

    # -- accounting -------------------------------------------------------------------------------------
    def pages_used(self) -> int:
        """Pages holding kept tokens, all triples (the pool reserves pages for every token: `pages_reserved`)."""
        if not self._row:
            return 0
        rows = torch.tensor(list(self._row.values()), device=self.device)
        return int(((self.kept[:, rows] + self.page_size - 1) // self.page_size).sum())

    def pages_reserved(self) -> int:
        return self.pool.num_pages - self.pool.num_free_pages - 1  # the trash page is not a request's

    def dense_pages(self) -> int:
        """(page, KV head) units a dense cache holds for the same requests, all layers."""
        S = self.page_size
        return sum(cdiv(n, S) for n in self._len.values()) * self.num_layers * self.num_kv_heads

    def stats(self, layers=None) -> dict:
        """Window evictions and admissions summed over requests, KV heads and `layers` (default: gated)."""
        layers = sorted(self.gated_layers if layers is None else layers)
        H, W = self.num_kv_heads, self.window_tokens
        ev = sum(max(0, n - W) for n in self._len.values()) * len(layers) * H
        ad = kept = 0
        if self._row and layers:
            rows = torch.tensor(list(self._row.values()), device=self.device)
            idx = torch.tensor(layers, device=self.device)
            ad = int(self.n_global[idx][:, rows].sum())
            kept = int(self.kept[idx][:, rows].sum())
        seen = sum(self._len.values()) * len(layers) * H
        return {"evicted": ev, "admitted": ad, "admitted_frac": ad / ev if ev else float("nan"),
                "kept_tokens": kept, "seen_tokens": seen, "kept_frac": kept / seen if seen else float("nan"),
                "pages_used": self.pages_used(), "dense_pages": self.dense_pages()}
