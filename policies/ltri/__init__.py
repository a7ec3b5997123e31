"""Ltri-LLM span retrieval as a selector: spans found at prefill, retrieved per decode query.

Our choices (the paper gives no exact formulas; see also policies/ltri/spans.py):
  * Boundaries come from a page-pooled attention proxy (page-mean q . page-mean k, per query head,
    averaged over the layer's heads), a triangle score T(b) = mean_{i in [b, b+w)} (mass of row i
    on [b, i]) - (mass on the w pages before b), and 1-D NMS (radius `nms_pages`; a peak must exceed
    the sequence's median T by `min_score`).
    Spans are page aligned, shared by a layer's KV heads, at most `max_span_pages` long.
  * Each span keeps `reps_per_span` representative keys per KV head: k-means centroids of its keys
    (the default, `obs_queries: 0`), or the keys that received the most attention from the prompt's
    last `obs_queries` queries. Measured on needle tasks (NOTES.md), the attention-picked keys lose the
    needles and the centroids do not; spans closed during decode and sequences whose prefill was not
    observed (k . k stands in for the attention map) use centroids either way. `rep_dtype: int8` stores
    them as int8 with a scale a key (max |x| / 127): the span scoring reads half the bytes of bf16.
  * Decode tokens: the pages after the last span are an open span that is always read; each time
    `decode_span_pages` full pages have gathered there, they close as a new span (k-means reps; at most
    one span per layer and step, which one decode token per step never exceeds).
    The first `sink_tokens` tokens' pages are always read.
  * Retrieval: span score = max_r q . rep_r * sm_scale per query head (Triton kernel on GPU). Voting:
    every query head in the `vote` scope (`group`: the KV head's G query heads; `layer`: all query
    heads) votes for the spans its own ranking would fit into the free budget; spans are ranked by
    votes, then by their best score over the scope. Pages inherit their span's key, so the budget
    takes whole spans best-first (the last one may be cut) and ART reads them in that order. Ballots,
    keys, budget and order are one Triton launch on CUDA (kernels/span_select).

Device-only (graph-safe): each layer's indexes live in a fixed-shape device table with a row per
sequence (spans.SpanTable, in the cache's StageState); the prefill builds a sequence's row with device
ops; a decode step closes spans (two launches), scores them (one) and selects (one), with shapes fixed
by the page table's width. A sequence whose prefill was not observed gets its row built from the
cache the first time a step meets it (host bookkeeping; outside a captured step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from composable_kv.policies.ltri import spans as sp
from composable_kv.kernels.span_score import reference as span_ref
from composable_kv.kernels.span_select import reference as select_ref
from composable_kv.seq_rows import SequenceRows
from composable_kv.stages import GraphSupport, ScoringSelector, StageState, param, register_stage
from composable_kv.ints import cdiv


@register_stage
@dataclass
class Ltri(ScoringSelector):
    """Ltri-LLM span retrieval: spans from the attention map's triangles at prefill, top spans per
    query by representative keys with voting across heads, expanded to pages under the budget."""

    name = "ltri"
    graph_support = GraphSupport.ALWAYS  # span tables, vote and expansion: device ops, fixed shapes
    paper = ("Ltri-LLM: Streaming Long Context Inference for LLMs with Training-Free Dynamic Triangular "
             "Attention Pattern (Tang et al., arXiv 2412.04757, 2024)")
    summary = "top semantic spans (triangle boundaries + NMS) by representative keys, voting across heads"

    reps_per_span: int = param(4, "representative keys per span and KV head", min=1, max=64)
    tri_window_pages: int = param(4, "pages each side of a boundary the triangle score looks at", min=1, max=64)
    nms_pages: int = param(2, "NMS radius in pages (boundaries at least this far apart)", min=1, max=256)
    min_score: float = param(0.05, "margin over the median triangle score a boundary must exceed", min=-1.0, max=1.0)
    max_span_pages: int = param(2, "longer spans are split evenly (2: as many rep keys per page as Quest's "
                                "min/max at reps_per_span 4)", min=1, max=4096)
    obs_queries: int = param(0, "0: k-means reps; N > 0: the prompt's last N queries' attention picks them", min=0)
    decode_span_pages: int = param(4, "decode pages that close a new span", min=1, max=256)
    sink_tokens: int = param(16, "leading tokens always read and never in a span", min=0)
    vote: str = param("group", "who votes on a KV head's spans", choices=("group", "layer"))
    rep_dtype: str = param("cache", "the representative keys' storage: the cache's dtype, or int8 with a scale a key "
                           "(half the bytes the span scoring reads at bf16)", choices=("cache", "int8"))

    def new_state(self, cache) -> "_LtriState":
        return _LtriState(self.reps_per_span, self.rep_dtype == "int8")

    # -- per-sequence span index ----------------------------------------------------------------

    def _sink_pages(self, page_size: int) -> int:
        return cdiv(self.sink_tokens, page_size)

    def _build(self, q, k, page_size, end_page, covered, sm_scale, dtype):
        return sp.build_index(q, k, page_size=page_size, sink_pages=self._sink_pages(page_size),
                              end_page=end_page, covered=covered, reps_per_span=self.reps_per_span,
                              window=self.tri_window_pages, nms_radius=self.nms_pages, min_score=self.min_score,
                              max_span_pages=self.max_span_pages, obs_queries=self.obs_queries,
                              sm_scale=sm_scale, dtype=dtype)

    def _row(self, cache, sid: int, seq_len: int) -> int:
        """The sequence's row (a new one: reset in every layer's table) and its base page (first sight)."""
        state = cache.stage_state(self)
        row, fresh = state.rows.assign(sid)
        if fresh:
            for t in state.tables.values():
                t.ensure(state.rows.capacity, 0)
                t.reset(row)
            state.base[sid] = max(seq_len // cache.page_size, self._sink_pages(cache.page_size))
        return row

    def observe_prefill(self, cache, seq_ids, layer, query, key, valid, sm_scale) -> None:
        """Called per layer during a dense prefill: query [B, Hq, T, D], key [B, Hkv, T, D] post-RoPE,
        valid [B, T] bool (real tokens; None: all). Builds each sequence's spans for this layer."""
        state = cache.stage_state(self)
        S = cache.page_size
        sm_scale = query.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        with torch.no_grad():
            for b, sid in enumerate(seq_ids):
                q, k = query[b], key[b]
                if valid is not None:
                    q, k = q[:, valid[b]], k[:, valid[b]]
                row = self._row(cache, sid, k.shape[1])
                idx = self._build(q, k, S, k.shape[1] // S, state.base[sid], sm_scale, cache.dtype)
                state.table(layer, cache).put(row, idx)

    def _table(self, ctx) -> tuple[sp.SpanTable, torch.Tensor]:
        """This layer's table (grown to the step's pages) and the batch's rows [B]; rows of sequences not
        seen at prefill are built from the cache here (host bookkeeping, once per sequence and layer)."""
        c = ctx.cache
        state = c.stage_state(self)
        table = state.table(ctx.layer, c)
        for sid in ctx.plan.seq_ids:
            row = self._row(c, sid, c.seq_len(sid))
            if row not in table.built:  # never observed: the cache's keys stand in for the prompt's queries
                k = c.gather(ctx.layer, sid)[0].transpose(0, 1)  # [Hkv, T, D]
                base = state.base[sid]
                table.put(row, self._build(None, k, c.page_size, base, base, c.head_dim ** -0.5, c.dtype))
        rows, _ = state.rows.lookup(ctx.plan.seq_ids, ctx.q.device)
        table.ensure(state.rows.capacity, ctx.max_pages)
        return table, rows

    def span_index(self, cache, sid: int, layer: int):
        """The SpanIndex of a sequence and layer in `cache`, or None (host reads: inspection and tests)."""
        state = cache.stage_state(self)
        row, table = state.rows.row_of.get(sid), state.tables.get(layer)
        return None if row is None or table is None or row not in table.built else table.index(row)

    # -- selection ------------------------------------------------------------------------------
    def span_scores(self, q, reps, num_spans, sm_scale, rows=None, scales=None):
        """[B, Hq, NS] per-head span scores (reps [R, Hkv, NS, Rr, D], int8 reps' scales [R, Hkv, NS, Rr] or None and
        num_spans [R] read at `rows` [B]): the Triton kernel on CUDA, else the torch reference."""
        if q.is_cuda or sp.FORCE_TRITON:
            from composable_kv.kernels.span_score import triton as span_tk
            return span_tk.span_scores(q, reps, num_spans, sm_scale, rows=rows, scales=scales)
        return span_ref.span_scores(q, reps, num_spans, sm_scale, rows=rows, scales=scales)

    def select(self, scores, rows, table, state, num_pages, budget_pages, page_size, record=None):
        """Votes, span ranking, budget and read order in one Triton launch on CUDA (kernels/span_select), else
        the torch reference; the state takes the result. scores [B, Hq, NS]; rows [B] of `table`; record: where
        the selection copies the requests' span and page counts (_LtriState.scored_counts)."""
        if scores.is_cuda or sp.FORCE_TRITON:
            from composable_kv.kernels.span_select import triton as select_impl
        else:
            select_impl = select_ref
        state.take(*select_impl.span_select(scores, rows, table.span_of_page, table.covered, state.forced,
                                            state.candidates, num_pages, budget_pages, self._sink_pages(page_size),
                                            self.vote, record))

    def apply(self, ctx, state) -> None:
        table, rows = self._table(ctx)
        plan, P, S = ctx.plan, ctx.max_pages, ctx.page_size
        table.close_windows(rows, plan.page_table, plan.seq_lens, ctx.cache.k[ctx.layer], self.decode_span_pages, S)
        counts = ctx.cache.stage_state(self).scored_counts(ctx.layer, table.num_spans, plan.num_pages)
        scales = None if table.rep_scale is None else table.rep_scale[:, :, :P]
        scores = self.span_scores(ctx.q, table.reps[:, :, :P], table.num_spans, ctx.sm_scale, rows,
                                  scales)  # [B, Hq, P]
        self.select(scores, rows, table, state, plan.num_pages, self.budget_pages(S), S, (table.num_spans, *counts))

    # -- accounting -----------------------------------------------------------------------------
    def summary_bytes_per_page(self, cache, layer: int | None = None):
        """Representative-key bytes per KV head, spread over the request's pages ([B] float64, as
        `kv_bytes_read` multiplies by pages and KV heads): R * D * elt * num_spans of `layer` as it was
        last scored (int8 keys: R * (D + 4), the scales' bytes counted), or the mean over the scored layers
        (layer None)."""
        scored = cache.stage_state(self).scored
        if layer is not None and layer not in scored or not scored:
            return 0
        spans, pages = zip(*([scored[layer]] if layer is not None else scored.values()))
        per_key = cache.head_dim + 4 if self.rep_dtype == "int8" else cache.head_dim * cache.dtype.itemsize
        per_span = self.reps_per_span * per_key
        ratio = torch.stack(spans).to(torch.float64) / torch.stack(pages).to(torch.float64).clamp(min=1)  # [L, B]
        return ratio.mean(0) * per_span


class _LtriState(StageState):
    """One cache's span indexes: a row per sequence, a SpanTable per layer, each sequence's base page
    (where decode spans start), and each layer's span counts when it last scored (byte accounting)."""

    def __init__(self, reps_per_span: int, int8_reps: bool = False):
        self.reps_per_span, self.int8_reps = reps_per_span, int8_reps
        self.rows = SequenceRows()
        self.tables: dict[int, sp.SpanTable] = {}
        self.base: dict[int, int] = {}
        self.scored: dict[int, tuple] = {}  # layer -> (num_spans [B], num_pages [B]) when it last scored

    def scored_counts(self, layer: int, num_spans: torch.Tensor, num_pages: torch.Tensor) -> tuple:
        """A layer's held (span counts [B], page counts [B]), which its selection overwrites in place: a CUDA graph
        captured once keeps updating the same tensors, whichever of eager steps and replays came last."""
        held = self.scored.get(layer)
        if held is None or held[1].shape != num_pages.shape:
            held = self.scored[layer] = (num_spans.new_zeros(num_pages.shape), torch.zeros_like(num_pages))
        return held

    def table(self, layer: int, cache) -> sp.SpanTable:
        t = self.tables.get(layer)
        if t is None:
            t = self.tables[layer] = sp.SpanTable(cache.num_kv_heads, self.reps_per_span, cache.head_dim,
                                                  cache.dtype, cache.device, self.int8_reps)
        t.ensure(self.rows.capacity, 0)
        return t

    def free_sequence(self, seq_id: int) -> None:
        self.rows.release(seq_id)
        self.base.pop(seq_id, None)

