"""Semantic spans for Ltri-LLM-style selection: boundaries from the attention map's triangles, a
per-sequence span index (a span id per page plus a few representative keys per span and KV head), and
the per-layer device table the stage decodes from.

Everything works on pages: a span is a run of whole pages, so selecting a span expands to its pages.
Every function is device ops with shapes fixed by the page count (a span has at least one page, so a
sequence of P pages has at most P spans); the build at prefill syncs only to stop the NMS rounds.
Which details are our own choices (the paper does not publish its formulas) is written in
policies/ltri/__init__.py and kernels/span_score/README.md.

  page_pooled_attention  [Hq, T, D] q, [Hkv, T, D] k -> [P, P] page-to-page attention proxy
  triangle_scores        [P, P] -> [P]  how strongly a span starts at each page
  nms_1d                 [P] -> [P] bool boundaries (1-D non-maximum suppression, greedy result)
  span_ids               boundaries -> span id per page [P] (-1 outside), long spans split
  received_attention     the prompt's last queries -> attention each key receives [Hkv, T]
  reps_by_attention / reps_by_kmeans -> [Hkv, NS, R, D] representative keys
  build_index            all of it for one sequence and layer -> SpanIndex
  SpanTable              one layer's indexes, a row per sequence; close_windows() at decode
"""
from __future__ import annotations

from dataclasses import dataclass

from composable_kv.kernels.span_score.reference import quantize_reps
from composable_kv.kernels.window_kmeans.reference import kmeans_reps, window_reps
from composable_kv.seq_rows import grown, grown_pages

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


def nms_1d(scores: torch.Tensor, radius: int, min_score) -> torch.Tensor:
    """[P] bool: the positions greedy NMS keeps (from the highest score, ties: lower position first;
    a kept peak suppresses [p - radius, p + radius]; only scores > min_score count).

    Computed in parallel rounds: an undecided position whose rank beats every undecided neighbour's is
    one greedy keeps (its better neighbours were all suppressed); it is kept and suppresses its
    neighbourhood. Each round decides at least the best undecided position; the loop stops when none
    is left (one host read per round, at prefill)."""
    P = scores.shape[0]
    s = scores.float()
    order = torch.sort(-s, stable=True).indices
    rank = torch.empty(P, device=s.device).scatter_(0, order, torch.arange(P, device=s.device, dtype=torch.float32))
    undecided = s > min_score  # [P]
    taken = torch.zeros(P, dtype=torch.bool, device=s.device)
    width = 2 * radius + 1
    pool = lambda x: torch.nn.functional.max_pool1d(x[None, None], width, 1, radius)[0, 0]  # noqa: E731
    while bool(undecided.any()):
        best_near = -pool(-torch.where(undecided, rank, float(P)))  # lowest undecided rank within the radius
        keep = undecided & (rank == best_near)
        taken |= keep
        undecided &= ~(pool(keep.float()) > 0)
    return taken


def span_ids(boundaries: torch.Tensor, start: int, end: int, max_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the pages [start, end) at the boundaries inside it; split runs longer than `max_pages`
    evenly (a run [a, z) in n = ceil((z-a)/max_pages) pieces with edges a + (z-a)*i//n).

    boundaries [P] bool (P >= end). Returns (span id per page [P] long, -1 outside [start, end);
    the number of spans, a 0-d long tensor). Spans are numbered in page order and tile [start, end)."""
    P = boundaries.shape[0]
    dev = boundaries.device
    pos = torch.arange(P, device=dev)
    inside = (pos >= start) & (pos < end)
    cut = inside & (boundaries | (pos == start))
    run_start = torch.where(cut, pos, -1).cummax(0).values  # [P] the run holding each page
    nxt = torch.where(cut, pos, end).flip(0).cummin(0).values.flip(0)  # first cut at or after each page
    run_end = torch.cat([nxt[1:], nxt.new_full((1,), end)]).clamp(max=end)
    length = (run_end - run_start).clamp(min=1)
    pieces = -(-length // max_pages)
    piece = (pieces * (pos - run_start + 1) - 1) // length  # which of the run's even pieces holds the page
    new = cut | (piece != torch.cat([piece.new_full((1,), -1), piece[:-1]]))
    new &= inside
    ids = torch.where(inside, new.long().cumsum(0) - 1, -1)
    return ids, new.sum()


def span_bounds(span_of_page: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first page [num], one past the last [num]) of spans 0..num-1 (0, 0 for ids no page has)."""
    P = span_of_page.shape[0]
    pos = torch.arange(P, device=span_of_page.device)
    idx = torch.where(span_of_page >= 0, span_of_page, num).clamp(max=num)  # pages in no span: slot `num`
    first = torch.full((num + 1,), P, device=pos.device).scatter_reduce(0, idx, pos, "amin")[:num]
    last = torch.full((num + 1,), -1, device=pos.device).scatter_reduce(0, idx, pos, "amax")[:num]
    used = last >= 0
    return torch.where(used, first, 0), torch.where(used, last + 1, 0)


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


def reps_by_attention(k: torch.Tensor, received: torch.Tensor, span_of_page: torch.Tensor, num: int,
                      page_size: int, R: int) -> torch.Tensor:
    """Per span and KV head, the R keys that received the most attention: [Hkv, num, R, D] (k's dtype;
    zero for span ids no page has). A span with fewer than R tokens repeats its best key (the max over
    reps is unchanged). k [Hkv, T, D], received [Hkv, T]; span_of_page [P] with P * page_size <= T.

    One sort by score, then a stable sort by span, lists each span's tokens best first."""
    Hkv, _, D = k.shape
    S = page_size
    dev = k.device
    tok_span = span_of_page.repeat_interleave(S)  # [P*S]
    real = tok_span >= 0
    score = received[:, :tok_span.shape[0]].float().masked_fill(~real, float("-inf"))  # [Hkv, N]
    by_score = torch.sort(score, dim=-1, descending=True, stable=True).indices  # [Hkv, N]
    key = torch.where(real, tok_span, num)[by_score]  # outside tokens sort last
    token = by_score.gather(-1, torch.sort(key, dim=-1, stable=True).indices)  # [Hkv, N]: by span, best first
    starts, ends = span_bounds(span_of_page, num)
    size = (ends - starts) * S  # [num] tokens
    first = torch.cat([size.new_zeros(1), size.cumsum(0)[:-1]])  # [num] offset of each span in `token`
    r = torch.arange(R, device=dev)
    at = first[:, None] + torch.where(r[None] < size[:, None], r[None], 0)  # [num, R]
    pos = token[:, at.clamp(max=token.shape[1] - 1).flatten()]  # [Hkv, num * R] token positions
    reps = k.gather(1, pos[..., None].expand(-1, -1, D)).view(Hkv, num, R, D)
    return reps * (size > 0).view(1, num, 1, 1).to(reps.dtype)


def reps_by_kmeans(k: torch.Tensor, span_of_page: torch.Tensor, num: int, page_size: int, R: int) -> torch.Tensor:
    """Per span and KV head, R k-means centroids of its keys: [Hkv, num, R, D] (k's dtype). Needs no
    query: it serves sequences whose prefill was not observed (k . k stands in for the attention map)."""
    S = page_size
    tok_span = span_of_page.repeat_interleave(S)  # [P*S]
    starts, ends = span_bounds(span_of_page, num)
    cent = kmeans_reps(k[:, :tok_span.shape[0]], tok_span, starts * S, (ends - starts) * S, R)
    return cent.to(k.dtype)


FORCE_TRITON = False  # tests set this to run ltri's Triton kernels (span scores, window k-means) on CPU


@dataclass
class SpanIndex:
    """One sequence's spans in one layer, as build_index returns them (fixed shapes, device):
    span_of_page [P] long (-1: sink, past the spans), reps [Hkv, NS, R, D] (NS >= num_spans; ids past
    num_spans are padding), num_spans a 0-d long tensor, covered: pages below it are sink or spans."""
    span_of_page: torch.Tensor
    reps: torch.Tensor
    num_spans: torch.Tensor
    covered: int

    @property
    def starts(self) -> torch.Tensor:
        """First page of each span [num_spans] (host read: for inspection and tests)."""
        return span_bounds(self.span_of_page, int(self.num_spans))[0]

    @property
    def ends(self) -> torch.Tensor:
        return span_bounds(self.span_of_page, int(self.num_spans))[1]


def build_index(q: torch.Tensor | None, k: torch.Tensor, *, page_size: int, sink_pages: int, end_page: int,
                covered: int, reps_per_span: int, window: int, nms_radius: int, min_score: float,
                max_span_pages: int, obs_queries: int, sm_scale: float, dtype) -> SpanIndex:
    """Spans over the pages [sink_pages, end_page) of one sequence and layer (device ops).

    q [Hq, T, D] the prompt's queries, or None: then the keys stand in for the queries in the
    attention proxy (k . k, per KV head) and the reps are k-means centroids. k [Hkv, T, D].
    A boundary is an NMS peak of T(b) above the sequence's median T plus `min_score`: on real
    maps the page's own (diagonal) mass lifts every T(b), so an absolute level would cut everywhere.
    `covered`: where the open (decode) span starts, >= end_page.
    """
    Hkv, T_all, D = k.shape
    end_page = min(end_page, T_all // page_size)
    start = min(sink_pages, end_page)
    NS = end_page - start  # a span has >= 1 page
    dev = k.device
    if NS <= 0:
        return SpanIndex(torch.full((max(end_page, 0),), -1, dtype=torch.long, device=dev),
                         k.new_zeros(Hkv, 0, reps_per_span, D, dtype=dtype),
                         torch.zeros((), dtype=torch.long, device=dev), covered)
    T = end_page * page_size
    proxy_q = q[:, :T] if q is not None else k[:, :T]
    attn = page_pooled_attention(proxy_q, k[:, :T], page_size, sink_pages, sm_scale)
    tri = triangle_scores(attn, window)
    tri[:start + 1] = NEG_INF
    fin = torch.isfinite(tri)
    m = fin.sum()
    lowest_first = torch.sort(torch.where(fin, tri, float("inf"))).values  # finite scores first, ascending
    median = lowest_first[((m - 1) // 2).clamp(min=0)]  # the lower median, as torch.median
    level = torch.where(m > 0, median.double() + min_score, torch.tensor(min_score, dtype=torch.float64,
                                                                         device=dev)).float()
    ids, num = span_ids(nms_1d(tri, nms_radius, level), start, end_page, max_span_pages)
    if q is not None and obs_queries > 0:
        W = min(obs_queries, q.shape[1])
        got = received_attention(q[:, -W:], k, sm_scale)
        reps = reps_by_attention(k, got, ids, NS, page_size, reps_per_span)
    else:
        reps = reps_by_kmeans(k, ids, NS, page_size, reps_per_span)
    return SpanIndex(ids, reps.to(dtype), num, covered)


class SpanTable:
    """One layer's span indexes, a row per sequence (rows: the stage state's SequenceRows), as
    fixed-shape device tensors that the decode step reads and extends in place:

      span_of_page [R, Pcap] long       span id of each page; -1: sink, open span, past the end
      reps         [R, Hkv, Pcap, Rr, D] representative keys of span s at [:, :, s] (<= Pcap spans), in the
                   cache's dtype or int8 (int8_reps)
      rep_scale    [R, Hkv, Pcap, Rr] fp32, the int8 keys' scales (span_score.reference.quantize_reps); None
      num_spans    [R] long
      covered      [R] long             pages below are sink or spans; the open span starts here

    Capacity grows on the host from shapes alone (before a step is captured): rows by doubling, pages with 1/8
    headroom (seq_rows.grown_pages)."""

    def __init__(self, kv_heads: int, reps_per_span: int, head_dim: int, dtype, device, int8_reps: bool = False):
        self.dtype = dtype  # the keys' dtype (index() returns int8 keys dequantized to it)
        self.span_of_page = torch.full((0, 0), -1, dtype=torch.long, device=device)
        self.reps = torch.zeros(0, kv_heads, 0, reps_per_span, head_dim, dtype=torch.int8 if int8_reps else dtype,
                                device=device)
        self.rep_scale = torch.ones(0, kv_heads, 0, reps_per_span, device=device) if int8_reps else None
        self.num_spans = torch.zeros(0, dtype=torch.long, device=device)
        self.covered = torch.zeros(0, dtype=torch.long, device=device)
        self.built: set[int] = set()  # rows holding an index (host bookkeeping)

    def ensure(self, rows: int, pages: int) -> None:
        R, cap = self.span_of_page.shape
        R2, cap2 = grown(R, rows), grown_pages(cap, pages)
        if cap2 > cap:
            self.span_of_page = torch.nn.functional.pad(self.span_of_page, (0, cap2 - cap), value=-1)
            self.reps = torch.nn.functional.pad(self.reps, (0, 0, 0, 0, 0, cap2 - cap))
            if self.rep_scale is not None:
                self.rep_scale = torch.nn.functional.pad(self.rep_scale, (0, 0, 0, cap2 - cap), value=1.0)
        if R2 > R:
            n = R2 - R
            self.span_of_page = torch.cat([self.span_of_page, self.span_of_page.new_full((n, cap2), -1)])
            self.reps = torch.cat([self.reps, self.reps.new_zeros(n, *self.reps.shape[1:])])
            if self.rep_scale is not None:
                self.rep_scale = torch.cat([self.rep_scale, self.rep_scale.new_ones(n, *self.rep_scale.shape[1:])])
            self.num_spans = torch.cat([self.num_spans, self.num_spans.new_zeros(n)])
            self.covered = torch.cat([self.covered, self.covered.new_zeros(n)])

    def reset(self, row: int) -> None:
        self.span_of_page[row] = -1
        self.reps[row] = 0
        if self.rep_scale is not None:
            self.rep_scale[row] = 1.0
        self.num_spans[row] = 0
        self.covered[row] = 0
        self.built.discard(row)

    def put(self, row: int, idx: SpanIndex) -> None:
        P, NS = idx.span_of_page.shape[0], idx.reps.shape[1]
        self.ensure(row + 1, max(P, NS, idx.covered))
        self.reset(row)
        self.span_of_page[row, :P] = idx.span_of_page
        if self.rep_scale is None:
            self.reps[row, :, :NS] = idx.reps
        else:
            self.reps[row, :, :NS], self.rep_scale[row, :, :NS] = quantize_reps(idx.reps)
        self.num_spans[row] = idx.num_spans
        self.covered[row] = idx.covered
        self.built.add(row)

    def index(self, row: int) -> SpanIndex:
        """A row as a SpanIndex (host reads: for inspection and tests)."""
        n, cov = int(self.num_spans[row]), int(self.covered[row])
        reps = self.reps[row, :, :n]
        if self.rep_scale is not None:  # dequantized
            reps = (reps.float() * self.rep_scale[row, :, :n, :, None]).to(self.dtype)
        return SpanIndex(self.span_of_page[row, :cov].clone(), reps.clone(), self.num_spans[row].clone(), cov)

    def close_windows(self, rows: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
                      k_pages: torch.Tensor, window_pages: int, page_size: int) -> None:
        """Decode tokens: a row whose open span holds `window_pages` full pages closes them as a new span
        (k-means reps). At most one span per row and call (one decode token fills at most one page). On CUDA
        (or FORCE_TRITON) two Triton launches that skip rows whose window is not full; else torch ops on
        every row, applied where due. rows [B]; page_table [B, P]; seq_lens [B] (with the new token);
        k_pages [num_pages, Hkv, S, D] (this layer's keys)."""
        if k_pages.is_cuda or FORCE_TRITON:
            from composable_kv.kernels.window_kmeans import triton as kmeans_tk
            kmeans_tk.close_windows(rows, page_table, seq_lens, k_pages, self.covered, self.num_spans,
                                    self.span_of_page, self.reps, window_pages, page_size, rep_scale=self.rep_scale)
            return
        W = window_pages
        Rr, cap = self.reps.shape[3], self.reps.shape[2]
        dev = rows.device
        cov = self.covered[rows]  # [B]
        reps, closing = window_reps(rows, page_table, seq_lens, k_pages, self.covered, W, page_size, Rr)
        ns = self.num_spans[rows]  # [B]
        slot = ns.clamp(max=cap - 1)
        if self.rep_scale is None:
            reps = reps.to(self.reps.dtype)  # [B, Hkv, Rr, D]
        else:
            reps, scale = quantize_reps(reps)  # [B, Hkv, Rr, D] int8, [B, Hkv, Rr]
            self.rep_scale[rows, :, slot] = torch.where(closing[:, None, None], scale, self.rep_scale[rows, :, slot])
        self.reps[rows, :, slot] = torch.where(closing[:, None, None, None], reps, self.reps[rows, :, slot])
        pos = torch.arange(self.span_of_page.shape[1], device=dev)
        new_pages = closing[:, None] & (pos >= cov[:, None]) & (pos < (cov + W)[:, None])  # [B, Pcap]
        self.span_of_page[rows] = torch.where(new_pages, ns[:, None], self.span_of_page[rows])
        self.num_spans[rows] = ns + closing.long()
        self.covered[rows] = cov + W * closing.long()
