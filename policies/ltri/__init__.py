"""Ltri-LLM span retrieval as a selector: spans found at prefill, retrieved per decode query.

Our choices (the paper gives no exact formulas; see also policies/ltri/spans.py):
  * Boundaries come from a page-pooled attention proxy (page-mean q . page-mean k, per query head,
    averaged over the layer's heads), a triangle score T(b) = mean_{i in [b, b+w)} (mass of row i
    on [b, i]) - (mass on the w pages before b), and 1-D NMS (radius `nms_pages`; a peak must exceed
    the sequence's median T by `min_score`).
    Spans are page aligned, shared by a layer's KV heads, at most `max_span_pages` long.
  * Each span keeps `reps_per_span` representative keys per KV head: the keys that received the
    most attention from the prompt's last `obs_queries` queries (prefill), or k-means centroids
    when no query was seen (spans closed during decode; sequences whose prefill was not observed,
    where k . k stands in for the attention map).
  * Decode tokens: the pages after the last span are an open span that is always read; each time
    `decode_span_pages` full pages have gathered there, they close as a new span (k-means reps).
    The first `sink_tokens` tokens' pages are always read.
  * Retrieval: span score = max_r q . rep_r * sm_scale per query head (Triton kernel on GPU). Voting:
    every query head in the `vote` scope (`group`: the KV head's G query heads; `layer`: all query
    heads) votes for the spans its own ranking would fit into the free budget; spans are ranked by
    votes, then by their best score over the scope. Pages inherit their span's rank, so the budget
    takes whole spans best-first (the last one may be cut) and ART reads them in that order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from composable_kv.policies.ltri import spans as sp
from composable_kv.kernels.span_score import reference as span_ref
from composable_kv.stages import GraphSupport, ScoringSelector, StageState, param, register_stage
from composable_kv.ints import cdiv


@dataclass
class _SeqSpans:
    base: int                                   # first page of decode-closed spans (pages of the prompt before it)
    layers: dict = field(default_factory=dict)  # layer -> SpanIndex


@register_stage
@dataclass
class Ltri(ScoringSelector):
    """Ltri-LLM span retrieval: spans from the attention map's triangles at prefill, top spans per
    query by representative keys with voting across heads, expanded to pages under the budget."""

    name = "ltri"
    graph_support = GraphSupport.NEVER  # span tables are padded and ranked on the host per layer
    paper = ("Ltri-LLM: Streaming Long Context Inference for LLMs with Training-Free Dynamic Triangular "
             "Attention Pattern (Tang et al., arXiv 2412.04757, 2024)")
    summary = "top semantic spans (triangle boundaries + NMS) by representative keys, voting across heads"

    reps_per_span: int = param(4, "representative keys per span and KV head", min=1, max=64)
    tri_window_pages: int = param(4, "pages each side of a boundary the triangle score looks at", min=1, max=64)
    nms_pages: int = param(2, "NMS radius in pages (boundaries at least this far apart)", min=1, max=256)
    min_score: float = param(0.05, "margin over the median triangle score a boundary must exceed", min=-1.0, max=1.0)
    max_span_pages: int = param(8, "longer spans are split evenly", min=1, max=4096)
    obs_queries: int = param(32, "prompt's last queries whose attention picks the reps (0: k-means)", min=0)
    decode_span_pages: int = param(4, "decode pages that close a new span", min=1, max=256)
    sink_tokens: int = param(16, "leading tokens always read and never in a span", min=0)
    vote: str = param("group", "who votes on a KV head's spans", choices=("group", "layer"))

    def new_state(self, cache) -> "_LtriState":
        return _LtriState()

    # -- per-sequence span index ----------------------------------------------------------------

    def _sink_pages(self, page_size: int) -> int:
        return cdiv(self.sink_tokens, page_size)

    def _build(self, q, k, page_size, end_page, sm_scale, dtype):
        return sp.build_index(q, k, page_size=page_size, sink_pages=self._sink_pages(page_size),
                              end_page=end_page, reps_per_span=self.reps_per_span, window=self.tri_window_pages,
                              nms_radius=self.nms_pages, min_score=self.min_score,
                              max_span_pages=self.max_span_pages, obs_queries=self.obs_queries,
                              sm_scale=sm_scale, dtype=dtype)

    def observe_prefill(self, cache, seq_ids, layer, query, key, valid, sm_scale) -> None:
        """Called per layer during a dense prefill: query [B, Hq, T, D], key [B, Hkv, T, D] post-RoPE,
        valid [B, T] bool (real tokens; None: all). Builds each sequence's spans for this layer."""
        seqs = cache.stage_state(self).seqs
        S = cache.page_size
        sm_scale = query.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        for b, sid in enumerate(seq_ids):
            q, k = query[b], key[b]
            if valid is not None:
                q, k = q[:, valid[b]], k[:, valid[b]]
            full = k.shape[1] // S
            st = seqs.setdefault(sid, _SeqSpans(base=max(full, self._sink_pages(S))))
            st.layers[layer] = self._build(q, k, S, full, sm_scale, cache.dtype)

    def _index(self, cache, sid: int, layer: int, seq_len: int):
        S = cache.page_size
        seqs = cache.stage_state(self).seqs
        st = seqs.get(sid)
        if st is None:  # never observed: the cache's keys stand in for the prompt's queries
            st = seqs[sid] = _SeqSpans(base=max(seq_len // S, self._sink_pages(S)))
        idx = st.layers.get(layer)
        if idx is None:
            k = cache.gather(layer, sid)[0].transpose(0, 1)  # [Hkv, T, D]
            idx = st.layers[layer] = self._build(None, k, S, st.base, cache.head_dim ** -0.5, cache.dtype)
        W = self.decode_span_pages
        target = st.base + W * max(0, (seq_len // S - st.base) // W)
        if target > idx.covered:  # close full decode windows as spans
            starts = torch.arange(idx.covered, target, W, dtype=torch.long)
            ends = starts + W
            pages = torch.tensor(cache.pages(sid)[idx.covered:target], device=cache.device)
            k = cache.k[layer][pages].transpose(0, 1).reshape(cache.num_kv_heads, -1, cache.head_dim)
            reps = sp.reps_by_kmeans(k, starts - idx.covered, ends - idx.covered, S, self.reps_per_span)
            idx.extend(starts, ends, reps)
        return idx

    def span_index(self, cache, sid: int, layer: int):
        """The SpanIndex of a sequence and layer in `cache`, or None (for inspection and tests)."""
        st = cache.stage_state(self).seqs.get(sid)
        return None if st is None else st.layers.get(layer)

    def _batch(self, ctx):
        """Padded span tables of the step: reps [B, Hkv, NS, R, D], num_spans [B], span_of_page [B, P]
        (-1 outside spans), forced [B, P] (sink pages and the open decode span)."""
        c, plan = ctx.cache, ctx.plan
        lens = plan.seq_lens.tolist()
        idxs = [self._index(c, sid, ctx.layer, n) for sid, n in zip(plan.seq_ids, lens)]
        B, P, dev = len(idxs), plan.max_pages, c.device
        NS = max([i.num_spans for i in idxs] + [1])
        reps = torch.zeros(B, c.num_kv_heads, NS, self.reps_per_span, c.head_dim, dtype=c.dtype, device=dev)
        span_of_page = torch.full((B, P), -1, dtype=torch.long)
        forced = torch.zeros(B, P, dtype=torch.bool)
        sink = self._sink_pages(c.page_size)
        for b, i in enumerate(idxs):
            reps[b, :, :i.num_spans] = i.reps
            for s, (a, z) in enumerate(zip(i.starts.tolist(), i.ends.tolist())):
                span_of_page[b, a:z] = s
            forced[b, :sink] = True
            forced[b, i.covered:] = True
        num_spans = torch.tensor([i.num_spans for i in idxs], dtype=torch.int32)
        forced &= plan.valid.cpu()
        return reps, num_spans.to(dev), span_of_page.to(dev), forced.to(dev)

    # -- selection ------------------------------------------------------------------------------
    def span_scores(self, q, reps, num_spans, sm_scale):
        """[B, Hq, NS] per-head span scores: the Triton kernel on CUDA, else the torch reference."""
        if q.is_cuda or _FORCE_TRITON:
            from composable_kv.kernels.span_score import triton as span_tk
            return span_tk.span_scores(q, reps, num_spans, sm_scale)
        return span_ref.span_scores(q, reps, num_spans, sm_scale)

    def span_keys(self, scores, span_of_page, forced, budget_pages):
        """Rank spans by votes then best score; return the page order key [B, Hkv, P]: -rank on a
        span's pages, 1 (read first) on pages outside spans (the forced sink and open span).

        scores [B, Hq, NS]; span_of_page [B, P]; forced [B, Hkv, P] (pages read anyway)."""
        B, Hq, NS = scores.shape
        Hkv = forced.shape[1]
        G = Hq // Hkv
        s = scores.view(B, Hkv, G, NS)
        onehot = span_of_page.clamp(min=0)[:, None, :].expand(B, Hkv, -1)
        free_pages = (~forced & (span_of_page >= 0)[:, None, :]).float()
        size = torch.zeros(B, Hkv, NS + 1, device=scores.device).scatter_add_(
            -1, torch.where(span_of_page[:, None, :] >= 0, onehot, NS), free_pages)[..., :NS]  # [B, Hkv, NS]
        avail = (budget_pages - forced.sum(-1)).clamp(min=0).float()  # [B, Hkv]
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # [B, Hkv, G, NS]
        sz = size[:, :, None, :].expand_as(s).gather(-1, order)
        before = sz.cumsum(-1) - sz
        ballot = (before < avail[:, :, None, None]) & torch.isfinite(s.gather(-1, order))
        votes = torch.zeros_like(s).scatter_(-1, order, ballot.float())  # [B, Hkv, G, NS]
        if self.vote == "layer":
            votes = votes.sum((1, 2), keepdim=True).expand(B, Hkv, 1, NS)[:, :, 0]
            best = s.amax((1, 2), keepdim=True).expand(B, Hkv, 1, NS)[:, :, 0]
        else:
            votes, best = votes.sum(2), s.amax(2)  # [B, Hkv, NS]
        by_best = torch.sort(best, dim=-1, descending=True, stable=True).indices
        by_votes = torch.sort(votes.gather(-1, by_best), dim=-1, descending=True, stable=True).indices
        ranked = by_best.gather(-1, by_votes)
        rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(NS, device=s.device).expand_as(ranked))
        key = (-rank.float()).masked_fill(~torch.isfinite(best), float("-inf"))  # [B, Hkv, NS]
        page_key = key.gather(-1, onehot)
        return page_key.masked_fill((span_of_page < 0)[:, None, :], 1.0)  # sink / open span: read first

    def apply(self, ctx, state) -> None:
        reps, num_spans, span_of_page, forced = self._batch(ctx)
        state.forced |= forced[:, None, :] & state.valid
        ctx.cache.stage_state(self).last = (num_spans, ctx.plan.num_pages)
        budget = self.budget_pages(ctx.page_size)
        scores = self.span_scores(ctx.q, reps, num_spans, ctx.sm_scale)  # [B, Hq, NS]
        keys = self.span_keys(scores, span_of_page, state.forced & state.valid, budget)
        state.narrow(keys, budget, is_bound=False)

    # -- accounting -----------------------------------------------------------------------------
    def summary_bytes_per_page(self, cache):
        """Representative-key bytes of the layer scored last, per KV head, spread over the request's
        pages ([B] float64, as `kv_bytes_read` multiplies by pages and KV heads; it runs per layer
        right after `run`, so the figure is that layer's exact R * D * elt * num_spans)."""
        last = cache.stage_state(self).last
        if last is None:
            return 0
        num_spans, num_pages = last
        per_span = self.reps_per_span * cache.head_dim * cache.dtype.itemsize
        return num_spans.to(torch.float64) * per_span / num_pages.to(torch.float64).clamp(min=1)


class _LtriState(StageState):
    """One cache's span indexes: sequence -> its spans per layer, and the last scored layer's span counts."""

    def __init__(self):
        self.seqs: dict[int, _SeqSpans] = {}
        self.last = None  # (num_spans [B], num_pages [B]) of the last scored layer, for byte accounting

    def free_sequence(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)


_FORCE_TRITON = False  # tests set this to run the Triton span scorer under TRITON_INTERPRET on CPU
