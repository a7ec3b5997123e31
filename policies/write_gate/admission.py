"""KV admission on the write path (Write-Gated KV): a head-major gated cache and its pipeline.

Layout. One `PagedKVCache` with num_kv_heads=1 is the page pool of every layer; its sequences are
(layer, request, KV head) triples, so each triple has its own page table. A triple's sequence is

    [ admitted global tokens (oldest first) | ring window: the last <= W tokens, in any slot order ]
      positions 0 .. n_global-1               n_global .. n_global+|window|-1

Attention is order-free over keys (RoPE is already applied), so only the *set* matters, and the
sequence stays contiguous (only its last page is partial) as the window slides:
  * window not full: the new token is appended;
  * the oldest window token o (slot s_o) leaves. Admitted (g_o > threshold): swap it with the token
    at slot n_global, n_global += 1, append the new token (the sequence grows by one). Dropped: the
    new token overwrites slot s_o (the sequence keeps its length).
The global region never moves again; when it covers a whole page, that page's summaries are rebuilt
exactly (overwrites leave window pages' min/max loose, which is sound: still a bound).

Reading. `q [B, Hq, D]` is viewed as `[B*Hkv, G, D]` and the policy's selectors + terminal run
unchanged with Hkv=1 over the triples of the layer (fused Triton path included). The window is the
tail of every sequence, so before the first scoring stage we insert `sink_window(0, W)`: the window's
pages are forced and the scorer (Quest, ...) picks among the global pages. Without a scorer every
kept page is read, so attention is exact over window + admitted tokens. Layers in `dense_layers` keep
every token (no gate) and read densely.

Cost. Bookkeeping is host work per layer and step (a few list ops per (request, KV head), one small
device->host copy of the gate bits); the per-layer `plan` builds the triples' page tables on the host.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from composable_kv.cache import AppendSlots, PagedKVCache
from composable_kv.config import PolicyConfig
from composable_kv.errors import TensorContractError
from composable_kv.pipeline import DecodePipeline, DecodeResult
from composable_kv.stages import ScoringSelector, get_stage_class
from composable_kv.ints import cdiv

GateFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, k_pre, k_post) [T,H,D] -> g [T,H]
RopeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # positions [T] -> cos, sin [T, D]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrope(k_post: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE key from the post-RoPE one (RoPE is a rotation): k_post [T, H, D], cos/sin [T, D]."""
    cos, sin = cos[:, None].to(k_post.dtype), sin[:, None].to(k_post.dtype)
    return k_post * cos - rotate_half(k_post) * sin


def model_rope(model) -> RopeFn:
    """positions -> (cos, sin) from the model's rotary embedding module (Llama/Mistral/Qwen2 family)."""
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        raise ValueError(f"write_gate: {type(model).__name__} has no *RotaryEmbedding module; the gate reads "
                         f"pre-RoPE keys, which we recover by undoing RoPE")
    param = next(model.parameters())

    def rope(positions: torch.Tensor):
        x = torch.zeros(1, dtype=torch.float32, device=param.device)
        cos, sin = rotary(x, positions.to(param.device)[None])
        return cos[0].float(), sin[0].float()  # [T, D]
    return rope


@dataclass
class GatedSlots:
    """Where one `reserve()` puts tokens: per request `counts[i]` tokens at `positions` (host)."""
    seq_ids: list[int]
    counts: list[int]
    positions: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


@dataclass
class _HeadSeq:
    """One (layer, request, KV head): its pool sequence and window ring."""
    sid: int
    n_global: int = 0
    ring: deque = field(default_factory=deque)  # [slot, admit] of window tokens, oldest first
    slot_pos: list = field(default_factory=list)  # token position held by each slot
    evicted: int = 0   # tokens that left the window
    admitted: int = 0  # of those, kept in the global pages


class GatedKVCache:
    """Head-major paged KV cache with write-gated admission (see the module docstring).

    The session-facing API mirrors `PagedKVCache`: add_sequence / reserve / write / seq_len / free.
    `write(layer, slots, k, v, g=None)`: k, v `[T, Hkv, D]` post-RoPE; g `[T, Hkv]` the gate, computed
    with `gate(layer, unrope(k), k)` when not given. Layers outside `gated_layers` admit every token.
    """

    head_major = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float16, device="cpu", summaries=frozenset(), *,
                 window_tokens: int = 256, threshold: float = 0.1, gate: GateFn | None = None,
                 rope: RopeFn | None = None, gated_layers=None):
        if not isinstance(window_tokens, int) or window_tokens < 1:
            raise ValueError(f"GatedKVCache: window_tokens must be an int >= 1, got {window_tokens!r}")
        self.pool = PagedKVCache(1, 1, head_dim, num_pages, page_size, dtype, device, summaries)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, self.pool.device
        self.summaries = self.pool.summaries
        self.window_tokens, self.threshold = window_tokens, threshold
        self.gate, self.rope = gate, rope
        self.gated_layers = frozenset(range(num_layers) if gated_layers is None else gated_layers)
        self._len: dict[int, int] = {}
        self._heads: dict[int, list[list[_HeadSeq]]] = {}  # request -> [layer][kv head]
        self._next_id = 0

    # -- requests ----------------------------------------------------------------------------------
    def add_sequence(self) -> int:
        rid = self._next_id
        self._next_id += 1
        self._len[rid] = 0
        self._heads[rid] = [[_HeadSeq(self.pool.add_sequence()) for _ in range(self.num_kv_heads)]
                            for _ in range(self.num_layers)]
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
        for per_layer in self._heads.pop(self._known(seq_id)):
            for hs in per_layer:
                self.pool.free(hs.sid)
        del self._len[seq_id]

    def reserve(self, seq_ids: list[int], counts: list[int]) -> GatedSlots:
        """Positions for counts[i] new tokens of seq_ids[i]; pool pages are taken per layer in write()."""
        if len(seq_ids) != len(counts) or len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"reserve: expected distinct seq_ids and one count each, got {seq_ids} / {counts}")
        for sid, n in zip(seq_ids, counts):
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"reserve: counts must be ints >= 0, got {n!r} for request {sid}")
            if n > 1 and self._len[self._known(sid)] > 0:
                raise NotImplementedError(f"reserve: request {sid} already holds tokens; the gated cache takes "
                                          f"one prefill (any length) then one token per step, got {n}")
        positions = []
        for sid, n in zip(seq_ids, counts):
            positions += range(self._len[sid], self._len[sid] + n)
            self._len[sid] += n
        return GatedSlots(list(seq_ids), list(counts), positions)

    # -- writes ------------------------------------------------------------------------------------
    def gate_values(self, layer: int, positions: list[int], k: torch.Tensor) -> torch.Tensor:
        """g [T, Hkv] for post-RoPE keys k [T, Hkv, D] at `positions`."""
        if layer not in self.gated_layers:
            return torch.ones(k.shape[:2], device=k.device)
        if self.gate is None:
            raise ValueError("GatedKVCache.write: no gate was given to the cache; pass g= [T, Hkv] or build the "
                             "cache with gate=")
        if self.rope is None:
            raise ValueError("GatedKVCache.write: the gate reads pre-RoPE keys; build the cache with rope=")
        cos, sin = self.rope(torch.tensor(positions, dtype=torch.long))
        return self.gate(layer, unrope(k.float(), cos.to(k.device), sin.to(k.device)), k.float())

    def write(self, layer: int, slots: GatedSlots, k: torch.Tensor, v: torch.Tensor,
              g: torch.Tensor | None = None) -> None:
        T, H = slots.num_tokens, self.num_kv_heads
        expected = (T, H, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise TensorContractError(f"write: {name} expected shape [T, Hkv, D] = {list(expected)}, "
                                          f"got {list(t.shape)}")
        if not 0 <= layer < self.num_layers:
            raise TensorContractError(f"write: layer must be in [0, {self.num_layers}), got {layer}")
        if g is None or layer not in self.gated_layers:
            g = self.gate_values(layer, slots.positions, k)
        if tuple(g.shape) != (T, H):
            raise TensorContractError(f"write: g expected shape [T, Hkv] = {[T, H]}, got {list(g.shape)}")
        admit_t = (g > self.threshold).cpu()  # [T, H] bool
        admit = admit_t.tolist() if 1 in slots.counts else None
        grow: dict[int, int] = {}      # pool sid -> new slots
        moves: list[tuple] = []        # (sid, src pos, dst pos)
        news: list[tuple] = []         # (sid, pos, token row, head): one-token steps
        bulk: list[tuple] = []         # (sid, token rows [n'] int64, head): prefills, slots 0..n'-1
        finalize: list[tuple] = []     # (sid, page index): pages that just became fully global
        row = 0
        for rid, n in zip(slots.seq_ids, slots.counts):
            for h, hs in enumerate(self._heads[rid][layer]):
                if n == 1:
                    self._step(hs, row, h, slots.positions[row], admit[row][h], grow, moves, news, finalize)
                elif n > 1:
                    order = self._bulk(hs, slots.positions[row:row + n], admit_t[row:row + n, h])
                    grow[hs.sid] = len(order)
                    bulk.append((hs.sid, row + order, h))
            row += n
        if grow:
            self.pool.reserve(list(grow), list(grow.values()))
        kf, vf = self.pool.k[0].view(-1, self.head_dim), self.pool.v[0].view(-1, self.head_dim)
        if moves:
            src = self._flat([(sid, a) for sid, a, _ in moves]).to(self.device)
            self._write_rows(self._flat([(sid, b) for sid, _, b in moves]), kf[src].clone(), vf[src].clone())
        dst, tok, hid = [], [], []
        if news:
            dst.append(self._flat([(sid, pos) for sid, pos, _, _ in news]))
            tok.append(torch.tensor([r for _, _, r, _ in news]))
            hid.append(torch.tensor([h for _, _, _, h in news]))
        for sid, rows, h in bulk:
            dst.append(self._flat_range(sid, len(rows)))
            tok.append(rows)
            hid.append(torch.full_like(rows, h))
        if dst:
            tok, hid = torch.cat(tok).to(k.device), torch.cat(hid).to(k.device)
            self._write_rows(torch.cat(dst), k[tok, hid].to(self.dtype), v[tok, hid].to(self.dtype))
        if finalize:
            S = self.page_size
            self.pool._reset_summaries([self.pool._pages[sid][i] for sid, i in finalize])
            src = self._flat([(sid, i * S + o) for sid, i in finalize for o in range(S)]).to(self.device)
            self._write_rows(src, kf[src].clone(), vf[src].clone())

    def _step(self, hs: _HeadSeq, row, h, position, admit_new, grow, moves, news, finalize) -> None:
        S = self.page_size
        if len(hs.ring) < self.window_tokens:
            pos = hs.n_global + len(hs.ring)
            grow[hs.sid] = 1
            hs.slot_pos.append(None)
        else:
            slot_o, admit_o = hs.ring.popleft()
            hs.evicted += 1
            if admit_o:
                hs.admitted += 1
                g0 = hs.n_global
                if slot_o != g0:  # the token at g0 is a window token: it takes slot_o
                    entry = next(e for e in hs.ring if e[0] == g0)
                    entry[0] = slot_o
                    moves.append((hs.sid, slot_o, g0))
                    moves.append((hs.sid, g0, slot_o))
                    hs.slot_pos[g0], hs.slot_pos[slot_o] = hs.slot_pos[slot_o], hs.slot_pos[g0]
                hs.n_global += 1
                if hs.n_global % S == 0:
                    finalize.append((hs.sid, hs.n_global // S - 1))
                pos = hs.n_global + len(hs.ring)
                grow[hs.sid] = 1
                hs.slot_pos.append(None)
            else:
                pos = slot_o
        hs.slot_pos[pos] = position
        hs.ring.append([pos, bool(admit_new)])
        news.append((hs.sid, pos, row, h))

    def _bulk(self, hs: _HeadSeq, positions: list[int], admit: torch.Tensor) -> torch.Tensor:
        """Prefill of an empty sequence: admitted tokens before the window, then the window. -> order [n']"""
        n = len(positions)
        if hs.slot_pos:
            raise NotImplementedError("the gated cache takes a multi-token write only into an empty sequence")
        w = min(self.window_tokens, n)
        order = torch.cat([admit[:n - w].nonzero().flatten(), torch.arange(n - w, n)])
        hs.n_global = len(order) - w
        hs.evicted, hs.admitted = n - w, hs.n_global
        hs.ring = deque([hs.n_global + i, a] for i, a in enumerate(admit[n - w:].tolist()))
        hs.slot_pos = torch.tensor(positions)[order].tolist()
        return order

    def _flat(self, where) -> torch.Tensor:
        """Flat pool slot (page * S + offset) of each (pool sid, position)."""
        S = self.page_size
        return torch.tensor([self.pool._pages[s][p // S] * S + p % S for s, p in where], dtype=torch.int64)

    def _flat_range(self, sid: int, n: int) -> torch.Tensor:
        S = self.page_size
        pos = torch.arange(n)
        return torch.tensor(self.pool._pages[sid], dtype=torch.int64)[pos // S] * S + pos % S

    def _write_rows(self, flat: torch.Tensor, k_rows, v_rows) -> None:
        S = self.page_size
        flat = flat.to(self.device)
        self.pool.write(0, AppendSlots([], [], flat // S, flat % S), k_rows[:, None], v_rows[:, None])

    # -- read side -------------------------------------------------------------------------------------
    def layer_seq_ids(self, layer: int, seq_ids: list[int]) -> list[int]:
        """Pool sequences of `layer` for the requests, request-major: [B * Hkv]."""
        return [hs.sid for rid in seq_ids for hs in self._heads[self._known(rid)][layer]]

    def window_len(self, layer: int, seq_ids: list[int]) -> torch.Tensor:
        """Window tokens (the tail of every sequence) [B * Hkv] int32."""
        return torch.tensor([len(hs.ring) for rid in seq_ids for hs in self._heads[rid][layer]], dtype=torch.int32)

    def kept_positions(self, seq_id: int, layer: int, head: int) -> list[int]:
        """Token positions the (request, layer, head) keeps, in slot order (window included)."""
        return list(self._heads[self._known(seq_id)][layer][head].slot_pos)

    # -- accounting -------------------------------------------------------------------------------------
    def pages_used(self) -> int:
        return self.pool.num_pages - self.pool.num_free_pages

    def dense_pages(self) -> int:
        """(page, KV head) units a dense cache holds for the same requests, all layers."""
        S = self.page_size
        return sum(cdiv(n, S) for n in self._len.values()) * self.num_layers * self.num_kv_heads

    def stats(self, layers=None) -> dict:
        """Window evictions and admissions summed over requests, KV heads and `layers` (default: gated)."""
        layers = sorted(self.gated_layers if layers is None else layers)
        ev = ad = kept = 0
        for per_layer in self._heads.values():
            for layer in layers:
                for hs in per_layer[layer]:
                    ev, ad, kept = ev + hs.evicted, ad + hs.admitted, kept + len(hs.slot_pos)
        seen = sum(self._len.values()) * len(layers) * self.num_kv_heads
        return {"evicted": ev, "admitted": ad, "admitted_frac": ad / ev if ev else float("nan"),
                "kept_tokens": kept, "seen_tokens": seen, "kept_frac": kept / seen if seen else float("nan"),
                "pages_used": self.pages_used(), "dense_pages": self.dense_pages()}


class GatedPipeline:
    """Runs a policy that leads with an admission stage over a `GatedKVCache`.

    Same calls as `DecodePipeline`: `plan(cache, seq_ids)` once per step, `run(q, cache, layer)` per
    layer, `kv_bytes_read(res, cache, layer)`. Inside, q [B, Hq, D] -> [B*Hkv, G, D] and the inner
    pipeline (the policy without its admission stage, window pages forced) runs with Hkv = 1.
    """

    def __init__(self, pipeline: DecodePipeline):
        cfg, stage = pipeline.config, pipeline.admission
        if stage is None:
            raise ValueError(f"policy {pipeline.name!r} has no admission stage; use its DecodePipeline directly")
        self.outer, self.stage, self.name = pipeline, stage, pipeline.name
        self.page_size, self.dense_layers = pipeline.page_size, pipeline.dense_layers
        self.requested_backend = pipeline.requested_backend
        stages = [s for s in cfg.stages if s.kind != "admission"]
        first_scorer = next((i for i, s in enumerate(stages) if isinstance(s, ScoringSelector)), None)
        if first_scorer is not None:
            window = get_stage_class("sink_window")(sink_tokens=0, window_tokens=stage.window_tokens)
            stages.insert(first_scorer, window)
        inner = dataclasses.replace(cfg, dense_layers=[], stages=stages)
        self.sparse = DecodePipeline(inner, backend=pipeline.requested_backend)
        dense_cfg = dataclasses.replace(cfg, name=f"{cfg.name}/dense", dense_layers=[],
                                        stages=[get_stage_class("attend")()])
        self.dense = DecodePipeline(dense_cfg, backend=pipeline.requested_backend)
        self.required_summaries = self.sparse.required_summaries
        self.selectors = self.sparse.selectors
        observers = [s.name for s in self.selectors if s.observes_prefill]
        if observers:
            raise ValueError(f"policy {self.name!r}: admission stage {stage.name!r} does not stack with selectors "
                             f"that index the prefill ({observers}) yet; their per-sequence state would need "
                             f"the gated cache's layout")
        self._seq_ids: list[int] | None = None
        self._last: DecodePipeline | None = None

    @property
    def config(self) -> PolicyConfig:
        return self.outer.config

    def describe(self, device="cuda") -> str:
        return "\n".join([f"admission: {self.stage.describe()}; dense layers {sorted(self.dense_layers)} keep "
                          f"every token", "inner pipeline (Hkv=1, one sequence per layer x request x KV head):",
                          self.sparse.describe(device)])

    def make_cache(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, *, dtype, device,
                   gate: GateFn | None = None, rope: RopeFn | None = None) -> GatedKVCache:
        return GatedKVCache(num_layers, num_kv_heads, head_dim, num_pages, self.page_size, dtype, device,
                            self.required_summaries, window_tokens=self.stage.window_tokens,
                            threshold=self.stage.threshold, gate=gate, rope=rope,
                            gated_layers=[i for i in range(num_layers) if i not in self.dense_layers])

    def plan(self, cache: GatedKVCache, seq_ids: list[int]) -> None:
        if not getattr(cache, "head_major", False):
            raise TensorContractError(f"policy {self.name!r} (admission stage {self.stage.name!r}) reads a "
                                      f"GatedKVCache (GatedPipeline.make_cache), got {type(cache).__name__}")
        self._seq_ids = list(seq_ids)

    def _pipe(self, layer: int) -> DecodePipeline:
        return self.dense if layer in self.dense_layers else self.sparse

    def run(self, q: torch.Tensor, cache: GatedKVCache, layer: int, sm_scale: float | None = None) -> DecodeResult:
        if self._seq_ids is None:
            raise RuntimeError("call pipeline.plan(cache, seq_ids) once per decode step before run()")
        B, Hq, D = q.shape
        H = cache.num_kv_heads
        if B != len(self._seq_ids) or Hq % H or D != cache.head_dim:
            raise TensorContractError(f"q: expected [B={len(self._seq_ids)}, Hq (a multiple of {H}), "
                                      f"D={cache.head_dim}], got {list(q.shape)}")
        pipe = self._pipe(layer)
        pipe.plan(cache.pool, cache.layer_seq_ids(layer, self._seq_ids))
        self._last = pipe
        res = pipe.run(q.reshape(B * H, Hq // H, D), cache.pool, 0, sm_scale=sm_scale)
        tau = None if res.tau_bound is None else res.tau_bound.reshape(B, Hq)
        return DecodeResult(res.out.reshape(B, Hq, D), res.pages_read.reshape(B, H), tau)

    def kv_bytes_read(self, res: DecodeResult, cache: GatedKVCache, layer: int | None = None) -> torch.Tensor:
        """Bytes read for the last `run` per request [B]: K/V pages plus the summaries scored."""
        B, H = res.pages_read.shape
        inner = DecodeResult(res.out, res.pages_read.reshape(B * H, 1), None)
        return self._last.kv_bytes_read(inner, cache.pool, 0).reshape(B, H).sum(-1)


def model_tag(model) -> str:
    """Names a model's gate weights by family and shape: `<model_type>-<L>L-<Hkv>kv-<D>d-<hidden>`."""
    cfg = getattr(model.config, "text_config", None) or model.config
    n_q = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    return f"{cfg.model_type}-{cfg.num_hidden_layers}L-{n_kv}kv-{head_dim}d-{cfg.hidden_size}"


def gated_session(pipeline: DecodePipeline, model, shape, num_pages: int, dtype, device):
    """For hf.PolicySession: (GatedPipeline, GatedKVCache) with the stage's trained gate and the model's RoPE.

    `num_pages` is the dense cache's page count (pages of Hkv heads); the pool gets as many (page, head)
    units per layer, so no admission pattern can run out of pages."""
    from composable_kv.policies.write_gate import GateMLP

    gp = GatedPipeline(pipeline)
    gate = GateMLP.load(gp.stage.weights_path(model_tag(model)), num_layers=shape.num_layers,
                        num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim).to(device)
    cache = gp.make_cache(shape.num_layers, shape.num_kv_heads, shape.head_dim,
                          num_pages * shape.num_layers * shape.num_kv_heads, dtype=dtype, device=device,
                          gate=gate, rope=model_rope(model))
    return gp, cache
