"""Semantic spans for Ltri-LLM-style selection: boundaries from the attention map's triangles, and a
per-sequence span index (page ranges plus a few representative keys per span and KV head).

Everything works on pages: a span is a run of whole pages [start, end), so selecting a span expands
to its pages. Functions take one sequence and one layer. Which details are our own choices (the
paper does not publish its formulas) is written in policies/ltri.py and kernels/span_score/README.md.

  page_pooled_attention  [Hq, T, D] q, [Hkv, T, D] k -> [P, P] page-to-page attention proxy
  triangle_scores        [P, P] -> [P]  how strongly a span starts at each page
  nms_1d                 [P] -> boundaries (1-D non-maximum suppression)
  spans_from_boundaries  boundaries -> (starts, ends), long spans split
  received_attention     the prompt's last queries -> attention each key receives [Hkv, T]
  reps_by_attention / reps_by_kmeans -> [Hkv, NS, R, D] representative keys
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def page_pooled_attention(q: torch.Tensor, k: torch.Tensor, page_size: int, sink_pages: int,
                          sm_scale: float) -> torch.Tensor:
    """Page-to-page attention proxy, averaged over query heads: [P, P] fp32, rows sum to 1 (0 for sink rows).

    q [Hq, T, D], k [Hkv, T, D]; only the T // page_size full pages count. The logit between query
    page i and key page j is mean_q(i) . mean_k(j) * sm_scale, which equals the mean of the page
    block's S x S token logits (bilinearity), so the map costs O(P^2 D) instead of O(T^2 D). Causal
    at page granularity (j <= i); sink columns (j < sink_pages) are dropped so that the attention
    sinks do not flatten every row.
    """
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    P = T // page_size
    if P == 0:
        return torch.zeros(0, 0, dtype=torch.float32, device=q.device)
    qbar = q[:, :P * page_size].float().reshape(Hq, P, page_size, D).mean(2)  # [Hq, P, D]
    kbar = k[:, :P * page_size].float().reshape(Hkv, P, page_size, D).mean(2)  # [Hkv, P, D]
    kbar = kbar.repeat_interleave(Hq // Hkv, dim=0)  # [Hq, P, D]
    logits = torch.einsum("hid,hjd->hij", qbar, kbar) * sm_scale  # [Hq, P, P]
    i = torch.arange(P, device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] >= sink_pages)  # [P, P]
    logits = logits.masked_fill(~keep, NEG_INF)
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no key left -> 0
    return attn.mean(0)


def triangle_scores(attn: torch.Tensor, window: int) -> torch.Tensor:
    """T(b) for every page b: mean over the rows i in [b, b+window) of in(i, b) - out(i, b), where
    in(i, b) is row i's mass on the pages [b, i] (the triangle a span starting at b draws) and
    out(i, b) its mass on the `window` pages before b (what would cross the boundary). A planted
    boundary scores ~1; a page inside a span scores lower. [P] fp32, -inf at b = 0."""
    P = attn.shape[0]
    if P == 0:
        return torch.zeros(0, device=attn.device)
    cum = torch.nn.functional.pad(attn.float().cumsum(-1), (1, 0))  # [P, P+1]: cum[i, j] = sum_{j' < j}
    b = torch.arange(P, device=attn.device)[:, None]  # [P, 1]
    rows = b + torch.arange(window, device=attn.device)[None, :]  # [P, W]
    ok = rows < P
    r = rows.clamp(max=P - 1)
    at = lambda col: cum[r, col.expand_as(r).clamp(0, P)]  # noqa: E731
    inside = at(r + 1) - at(b)
    outside = at(b) - at((b - window).clamp(min=0))
    diff = ((inside - outside) * ok).sum(-1) / ok.sum(-1).clamp(min=1)
    diff[0] = NEG_INF
    return diff


def nms_1d(scores: torch.Tensor, radius: int, min_score: float) -> torch.Tensor:
    """Positions that are the maximum of their [p - radius, p + radius] neighbourhood and above
    `min_score`, greedily from the highest (a kept peak suppresses its neighbours; ties: lower
    position first). Sorted long tensor."""
    s = scores.float().cpu()
    order = torch.sort(-s, stable=True).indices.tolist()
    taken = torch.zeros(len(s), dtype=torch.bool)
    suppressed = torch.zeros(len(s), dtype=torch.bool)
    for p in order:
        if not s[p] > min_score:
            break
        if suppressed[p]:
            continue
        taken[p] = True
        suppressed[max(0, p - radius):p + radius + 1] = True
    return taken.nonzero().flatten()


def spans_from_boundaries(boundaries: torch.Tensor, start: int, end: int, max_pages: int):
    """Cut [start, end) at the boundaries inside it; split spans longer than `max_pages` evenly.
    Returns (starts, ends) long tensors [NS] of page ranges that tile [start, end)."""
    cuts = [start] + [int(b) for b in boundaries.tolist() if start < b < end] + [end]
    starts, ends = [], []
    for a, z in zip(cuts[:-1], cuts[1:]):
        n = -(-(z - a) // max_pages)
        edges = [a + (z - a) * i // n for i in range(n + 1)]
        starts += edges[:-1]
        ends += edges[1:]
    return torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long)


def received_attention(q_last: torch.Tensor, k: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Attention each key receives from the prompt's last W queries, summed over them and over each
    KV head's query heads: q_last [Hq, W, D] (positions T-W..T-1), k [Hkv, T, D] -> [Hkv, T] fp32."""
    Hq, W, D = q_last.shape
    Hkv, T = k.shape[0], k.shape[1]
    kk = k.float().repeat_interleave(Hq // Hkv, dim=0)  # [Hq, T, D]
    logits = torch.einsum("hwd,htd->hwt", q_last.float(), kk) * sm_scale
    qpos = torch.arange(T - W, T, device=k.device)[:, None]
    logits = logits.masked_fill(torch.arange(T, device=k.device)[None, :] > qpos, NEG_INF)
    got = torch.softmax(logits, -1).sum(1)  # [Hq, T]
    return got.view(Hkv, Hq // Hkv, T).sum(1)


def _span_tokens(starts, ends, page_size: int):
    """Token positions of each span, padded: ([NS, L] long, [NS, L] bool)."""
    lens = (ends - starts) * page_size
    L = int(lens.max()) if len(lens) else 1
    off = torch.arange(L)[None, :]
    mask = off < lens[:, None]
    tok = (starts[:, None] * page_size + off).masked_fill(~mask, 0)
    return tok, mask


def reps_by_attention(k: torch.Tensor, received: torch.Tensor, starts, ends, page_size: int, R: int):
    """Per span and KV head, the R keys that received the most attention: [Hkv, NS, R, D] (k's dtype).
    A span with fewer than R tokens repeats its best key (the max over reps is unchanged)."""
    tok, mask = _span_tokens(starts, ends, page_size)
    tok, mask = tok.to(k.device), mask.to(k.device)
    score = received[:, tok].masked_fill(~mask[None], NEG_INF)  # [Hkv, NS, L]
    top = score.topk(min(R, score.shape[-1]), dim=-1)
    idx = torch.where(torch.isfinite(top.values), top.indices, top.indices[..., :1])  # [Hkv, NS, r]
    if idx.shape[-1] < R:
        idx = torch.cat([idx, idx[..., :1].expand(*idx.shape[:-1], R - idx.shape[-1])], -1)
    pos = tok[None].expand(k.shape[0], -1, -1).gather(-1, idx)  # [Hkv, NS, R]
    return k.gather(1, pos.reshape(k.shape[0], -1, 1).expand(-1, -1, k.shape[-1])).view(*pos.shape, -1)


def reps_by_kmeans(k: torch.Tensor, starts, ends, page_size: int, R: int, iters: int = 2):
    """Per span and KV head, R k-means centroids of its keys (init: evenly spaced tokens; `iters`
    Lloyd steps, Euclidean): [Hkv, NS, R, D] (k's dtype). Needs no query, so it serves spans closed
    during decode and sequences whose prefill was not observed."""
    Hkv, _, D = k.shape
    tok, mask = _span_tokens(starts, ends, page_size)
    tok, mask = tok.to(k.device), mask.to(k.device)
    keys = k.float()[:, tok]  # [Hkv, NS, L, D]
    lens = mask.sum(-1)  # [NS]
    init = ((torch.arange(R, device=k.device)[None, :] + 0.5) * lens[:, None] / R).long()  # [NS, R]
    cent = keys.gather(2, init[None, :, :, None].expand(Hkv, -1, -1, D))  # [Hkv, NS, R, D]
    for _ in range(iters):
        dist = (cent * cent).sum(-1)[:, :, None, :] - 2 * torch.einsum("hnld,hnrd->hnlr", keys, cent)
        assign = torch.nn.functional.one_hot(dist.argmin(-1), R).float() * mask[None, :, :, None]
        count = assign.sum(2)  # [Hkv, NS, R]
        mean = torch.einsum("hnlr,hnld->hnrd", assign, keys) / count.clamp(min=1)[..., None]
        cent = torch.where(count[..., None] > 0, mean, cent)
    return cent.to(k.dtype)


@dataclass
class SpanIndex:
    """One sequence's spans in one layer: page ranges (shared by the KV heads) and their
    representative keys per KV head. Pages [sink, covered) are tiled by spans."""
    starts: torch.Tensor  # [NS] long, first page of each span
    ends: torch.Tensor    # [NS] long, one past its last page
    reps: torch.Tensor    # [Hkv, NS, R, D], the cache's dtype and device
    covered: int          # pages below this are in spans (or sink)

    @property
    def num_spans(self) -> int:
        return int(self.starts.shape[0])

    def extend(self, starts, ends, reps) -> None:
        self.starts = torch.cat([self.starts, starts])
        self.ends = torch.cat([self.ends, ends])
        self.reps = torch.cat([self.reps, reps.to(self.reps.dtype)], dim=1)
        self.covered = int(ends[-1]) if len(ends) else self.covered


def build_index(q: torch.Tensor | None, k: torch.Tensor, *, page_size: int, sink_pages: int, end_page: int,
                reps_per_span: int, window: int, nms_radius: int, min_score: float, max_span_pages: int,
                obs_queries: int, sm_scale: float, dtype) -> SpanIndex:
    """Spans over the pages [sink_pages, end_page) of one sequence and layer.

    q [Hq, T, D] the prompt's queries, or None: then the keys stand in for the queries in the
    attention proxy (k . k, per KV head) and the reps are k-means centroids. k [Hkv, T, D].
    A boundary is an NMS peak of T(b) above the sequence's median T plus `min_score`: on real
    maps the page's own (diagonal) mass lifts every T(b), so an absolute level would cut everywhere.
    """
    Hkv, _, D = k.shape
    start = min(sink_pages, end_page)
    if end_page <= start:
        empty = torch.zeros(0, dtype=torch.long)
        return SpanIndex(empty, empty.clone(), k.new_zeros(Hkv, 0, reps_per_span, D, dtype=dtype), start)
    T = end_page * page_size
    proxy_q = q[:, :T] if q is not None else k[:, :T]
    attn = page_pooled_attention(proxy_q, k[:, :T], page_size, sink_pages, sm_scale)
    tri = triangle_scores(attn, window)
    tri[:start + 1] = NEG_INF
    fin = tri[torch.isfinite(tri)]
    level = float(fin.median()) + min_score if len(fin) else min_score  # the diagonal lifts every T(b)
    starts, ends = spans_from_boundaries(nms_1d(tri, nms_radius, level), start, end_page, max_span_pages)
    if q is not None and obs_queries > 0:
        W = min(obs_queries, q.shape[1])
        got = received_attention(q[:, -W:], k, sm_scale)
        reps = reps_by_attention(k, got, starts, ends, page_size, reps_per_span)
    else:
        reps = reps_by_kmeans(k, starts, ends, page_size, reps_per_span)
    return SpanIndex(starts, ends, reps.to(dtype), end_page)
