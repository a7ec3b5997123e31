"""The host implementations of attention_predictor and ltri (before commit "device-only, graph-safe"),
kept as the pure-torch test oracle of the device stages: Python loops over sequences, host clocks and
host span bookkeeping. Not registered as stages; tests put them in a PolicyConfig directly.

    HostAttentionPredictor  per-layer PageHistory with a host calibration clock; CNN over the due rows
    HostLtri                per-sequence SpanIndex lists; greedy NMS; spans closed on the host
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from composable_kv.kernels.span_score import reference as span_ref
from composable_kv.kernels.span_select import reference as select_ref
from composable_kv.policies.attention_predictor import AttentionPredictor
from composable_kv.policies.attention_predictor.predictor import features, load_weights, prefill_page_mass
from composable_kv.policies.ltri import Ltri
from composable_kv.policies.ltri import spans as sp
from composable_kv.stages import GraphSupport, StageState

NEG_INF = float("-inf")


# ---------------------------------------------------------------- attention_predictor

class HostPageHistory:
    """Ring buffer of per-page attention mass for one layer: one row per live sequence (host clock)."""

    def __init__(self, heads: int, steps: int, device):
        self.heads, self.H, self.device = heads, steps, device
        self.hist = torch.zeros(0, heads, steps, 0, device=device)
        self.scores = torch.zeros(0, heads, 0, device=device)
        self.ptr = torch.zeros(0, dtype=torch.long, device=device)
        self.steps = torch.zeros(0, dtype=torch.long)
        self.seeded = torch.zeros(0, dtype=torch.bool)
        self.last_len: list[int] = []
        self.row_of: dict[int, int] = {}
        self.free_rows: list[int] = []

    def rows(self, seq_ids, seq_lens: list[int], live) -> torch.Tensor:
        live = set(live)
        for sid in [s for s in self.row_of if s not in live]:
            self.free_rows.append(self.row_of.pop(sid))
        out = []
        for sid, n in zip(seq_ids, seq_lens):
            r = self.row_of.get(sid)
            if r is not None and n < self.last_len[r]:
                self.free_rows.append(self.row_of.pop(sid))
                r = None
            if r is None:
                r = self._new_row()
                self.row_of[sid] = r
            self.last_len[r] = n
            out.append(r)
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def _new_row(self) -> int:
        if not self.free_rows:
            R = self.hist.shape[0]
            grow = max(4, R)
            self.hist = torch.cat([self.hist, self.hist.new_zeros(grow, *self.hist.shape[1:])])
            self.scores = torch.cat([self.scores, self.scores.new_zeros(grow, *self.scores.shape[1:])])
            self.ptr = torch.cat([self.ptr, self.ptr.new_zeros(grow)])
            self.steps = torch.cat([self.steps, self.steps.new_zeros(grow)])
            self.seeded = torch.cat([self.seeded, self.seeded.new_zeros(grow)])
            self.last_len += [0] * grow
            self.free_rows = list(range(R + grow - 1, R - 1, -1))
        r = self.free_rows.pop()
        self.hist[r] = 0
        self.scores[r] = NEG_INF
        self.ptr[r] = 0
        self.steps[r] = 0
        self.seeded[r] = False
        return r

    def ensure_pages(self, P: int) -> None:
        cap = self.hist.shape[-1]
        if P <= cap:
            return
        new = max(P, 2 * cap, 16)
        self.hist = torch.nn.functional.pad(self.hist, (0, new - cap))
        self.scores = torch.nn.functional.pad(self.scores, (0, new - cap), value=NEG_INF)

    def push(self, rows: torch.Tensor, mass: torch.Tensor) -> None:
        P = mass.shape[-1]
        self.ensure_pages(P)
        slot = self.ptr[rows]
        row = torch.zeros(mass.shape[0], self.heads, self.hist.shape[-1], device=self.device)
        row[..., :P] = mass
        self.hist[rows, :, slot] = row
        self.ptr[rows] = (slot + 1) % self.H
        self.steps[rows.cpu()] += 1

    def seed(self, row: int, mass: torch.Tensor) -> None:
        h, P = mass.shape[1:]
        self.ensure_pages(P)
        self.hist[row] = 0
        self.hist[row, :, :h, :P] = mass.to(self.device)
        self.ptr[row] = h % self.H
        self.steps[row] = 1
        self.seeded[row] = True

    def window(self, rows: torch.Tensor, P: int) -> torch.Tensor:
        self.ensure_pages(P)
        idx = (self.ptr[rows, None] + torch.arange(self.H, device=self.device)) % self.H
        h = self.hist[rows][..., :P]
        return h.gather(2, idx[:, None, :, None].expand_as(h))


class _HostPredictorState(StageState):
    def __init__(self):
        self.history: dict[int, HostPageHistory] = {}
        self.pending: dict[tuple[int, int], torch.Tensor] = {}
        self.rows_of = None
        self.rows = None

    def free_sequence(self, seq_id: int) -> None:
        for key in [k for k in self.pending if k[0] == seq_id]:
            del self.pending[key]


@dataclass
class HostAttentionPredictor(AttentionPredictor):
    graph_support = GraphSupport.NEVER

    def new_state(self, cache):
        return _HostPredictorState()

    def _history(self, ctx):
        state = ctx.cache.stage_state(self)
        hist = state.history.get(ctx.layer)
        if hist is None:
            heads = ctx.num_kv_heads if self.per_kv_head else ctx.num_q_heads
            hist = state.history[ctx.layer] = HostPageHistory(heads, self.history_steps, ctx.q.device)
        rows = hist.rows(ctx.plan.seq_ids, ctx.plan.seq_lens.tolist(), ctx.cache.sequences())
        for sid, r in zip(ctx.plan.seq_ids, rows.tolist()):
            mass = state.pending.pop((sid, ctx.layer), None)
            if mass is not None and hist.steps[r] == 0:
                hist.seed(r, mass)
        return hist, rows

    def observe_prefill(self, cache, seq_ids, layer, query, key, valid, sm_scale) -> None:
        pending = cache.stage_state(self).pending
        sm_scale = query.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        Hkv = key.shape[1]
        with torch.no_grad():
            for b, sid in enumerate(seq_ids):
                q, k = query[b], key[b]
                if valid is not None:
                    q, k = q[:, valid[b]], k[:, valid[b]]
                mass = prefill_page_mass(q, k, cache.page_size, sm_scale, self.history_steps)
                if self.per_kv_head:
                    mass = mass.view(Hkv, -1, *mass.shape[1:]).mean(1)
                pending[(sid, layer)] = mass

    def _rows(self, ctx):
        state = ctx.cache.stage_state(self)
        if state.rows_of is not ctx:
            state.rows_of, state.rows = ctx, self._history(ctx)
        return state.rows

    def score(self, ctx):
        hist, rows = self._rows(ctx)
        P, Hkv = ctx.max_pages, ctx.num_kv_heads
        hist.ensure_pages(P)
        steps = hist.steps[rows.cpu()]
        due = ((steps % self.run_every) == 0) | torch.isinf(hist.scores[rows, 0, 0]).cpu()
        if due.any():
            due_rows = rows[due.to(rows.device)]
            x = hist.window(due_rows, P)
            b, Hh = x.shape[:2]
            n = ctx.plan.num_pages[due.to(rows.device)].repeat_interleave(Hh)
            model = load_weights(self.weights or None, ctx.q.device)
            with torch.no_grad():
                s = model(features(x.flatten(0, 1), n)).view(b, Hh, P)
                if not self.per_kv_head:
                    s = s.masked_fill(~ctx.plan.valid[due.to(rows.device)][:, None], NEG_INF)
                    s = s.log_softmax(-1).view(b, Hkv, Hh // Hkv, P).amax(2)
            hist.scores[due_rows, :, :P] = torch.nn.functional.pad(s, (0, 0, 0, hist.heads - s.shape[1]),
                                                                   value=NEG_INF)
        return hist.scores[rows, :Hkv, :P].clone()

    def apply(self, ctx, state) -> None:
        hist, rows = self._rows(ctx)
        steps = hist.steps[rows.cpu()]
        calibrate = (steps % self.calibrate_every) == 0
        if self.calibrate_first:
            calibrate |= (steps == 1) & hist.seeded[rows.cpu()]
        if calibrate.any():
            state.forced = state.forced | (calibrate.to(state.forced.device)[:, None, None] & state.valid)
        super(AttentionPredictor, self).apply(ctx, state)

    def observe_page_mass(self, ctx, page_lse, lse):
        from composable_kv.kernels.page_history.reference import page_mass as mass_of
        page_mass = mass_of(page_lse, lse)
        hist, rows = self._rows(ctx)
        if self.per_kv_head:
            B, Hq, P = page_mass.shape
            page_mass = page_mass.view(B, ctx.num_kv_heads, Hq // ctx.num_kv_heads, P).mean(2)
        hist.push(rows, page_mass)
        ctx.cache.stage_state(self).rows_of = None


# ---------------------------------------------------------------- ltri

def host_nms_1d(scores: torch.Tensor, radius: int, min_score: float) -> torch.Tensor:
    """Greedy 1-D NMS from the highest score (ties: lower position first); sorted kept positions."""
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


def host_spans_from_boundaries(boundaries: torch.Tensor, start: int, end: int, max_pages: int):
    cuts = [start] + [int(b) for b in boundaries.tolist() if start < b < end] + [end]
    starts, ends = [], []
    for a, z in zip(cuts[:-1], cuts[1:]):
        n = -(-(z - a) // max_pages)
        edges = [a + (z - a) * i // n for i in range(n + 1)]
        starts += edges[:-1]
        ends += edges[1:]
    return torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long)


def _span_tokens(starts, ends, page_size: int):
    lens = (ends - starts) * page_size
    L = int(lens.max()) if len(lens) else 1
    off = torch.arange(L)[None, :]
    mask = off < lens[:, None]
    tok = (starts[:, None] * page_size + off).masked_fill(~mask, 0)
    return tok, mask


def host_reps_by_attention(k, received, starts, ends, page_size: int, R: int):
    tok, mask = _span_tokens(starts, ends, page_size)
    tok, mask = tok.to(k.device), mask.to(k.device)
    score = received[:, tok].masked_fill(~mask[None], NEG_INF)
    top = score.topk(min(R, score.shape[-1]), dim=-1)
    idx = torch.where(torch.isfinite(top.values), top.indices, top.indices[..., :1])
    if idx.shape[-1] < R:
        idx = torch.cat([idx, idx[..., :1].expand(*idx.shape[:-1], R - idx.shape[-1])], -1)
    pos = tok[None].expand(k.shape[0], -1, -1).gather(-1, idx)
    return k.gather(1, pos.reshape(k.shape[0], -1, 1).expand(-1, -1, k.shape[-1])).view(*pos.shape, -1)


def host_reps_by_kmeans(k, starts, ends, page_size: int, R: int, iters: int = 2):
    Hkv, _, D = k.shape
    tok, mask = _span_tokens(starts, ends, page_size)
    tok, mask = tok.to(k.device), mask.to(k.device)
    keys = k.float()[:, tok]
    lens = mask.sum(-1)
    init = ((torch.arange(R, device=k.device)[None, :] + 0.5) * lens[:, None] / R).long()
    cent = keys.gather(2, init[None, :, :, None].expand(Hkv, -1, -1, D))
    for _ in range(iters):
        dist = (cent * cent).sum(-1)[:, :, None, :] - 2 * torch.einsum("hnld,hnrd->hnlr", keys, cent)
        assign = torch.nn.functional.one_hot(dist.argmin(-1), R).float() * mask[None, :, :, None]
        count = assign.sum(2)
        mean = torch.einsum("hnlr,hnld->hnrd", assign, keys) / count.clamp(min=1)[..., None]
        cent = torch.where(count[..., None] > 0, mean, cent)
    return cent.to(k.dtype)


@dataclass
class HostSpanIndex:
    starts: torch.Tensor
    ends: torch.Tensor
    reps: torch.Tensor
    covered: int

    @property
    def num_spans(self) -> int:
        return int(self.starts.shape[0])

    def extend(self, starts, ends, reps) -> None:
        self.starts = torch.cat([self.starts, starts])
        self.ends = torch.cat([self.ends, ends])
        self.reps = torch.cat([self.reps, reps.to(self.reps.dtype)], dim=1)
        self.covered = int(ends[-1]) if len(ends) else self.covered


def host_build_index(q, k, *, page_size, sink_pages, end_page, reps_per_span, window, nms_radius, min_score,
                     max_span_pages, obs_queries, sm_scale, dtype) -> HostSpanIndex:
    Hkv, _, D = k.shape
    start = min(sink_pages, end_page)
    if end_page <= start:
        empty = torch.zeros(0, dtype=torch.long)
        return HostSpanIndex(empty, empty.clone(), k.new_zeros(Hkv, 0, reps_per_span, D, dtype=dtype), start)
    T = end_page * page_size
    proxy_q = q[:, :T] if q is not None else k[:, :T]
    attn = sp.page_pooled_attention(proxy_q, k[:, :T], page_size, sink_pages, sm_scale)
    tri = sp.triangle_scores(attn, window)
    tri[:start + 1] = NEG_INF
    fin = tri[torch.isfinite(tri)]
    level = float(fin.median()) + min_score if len(fin) else min_score
    starts, ends = host_spans_from_boundaries(host_nms_1d(tri, nms_radius, level), start, end_page, max_span_pages)
    if q is not None and obs_queries > 0:
        W = min(obs_queries, q.shape[1])
        got = sp.received_attention(q[:, -W:], k, sm_scale)
        reps = host_reps_by_attention(k, got, starts, ends, page_size, reps_per_span)
    else:
        reps = host_reps_by_kmeans(k, starts, ends, page_size, reps_per_span)
    return HostSpanIndex(starts, ends, reps.to(dtype), end_page)


@dataclass
class _SeqSpans:
    base: int
    layers: dict = field(default_factory=dict)


class _HostLtriState(StageState):
    def __init__(self):
        self.seqs: dict[int, _SeqSpans] = {}
        self.scored: dict[int, tuple] = {}  # layer -> (span counts [B], pages [B]) when it last scored

    def free_sequence(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)


@dataclass
class HostLtri(Ltri):
    graph_support = GraphSupport.NEVER

    def new_state(self, cache):
        return _HostLtriState()

    def _host_build(self, q, k, page_size, end_page, sm_scale, dtype):
        return host_build_index(q, k, page_size=page_size, sink_pages=self._sink_pages(page_size),
                                end_page=end_page, reps_per_span=self.reps_per_span, window=self.tri_window_pages,
                                nms_radius=self.nms_pages, min_score=self.min_score,
                                max_span_pages=self.max_span_pages, obs_queries=self.obs_queries,
                                sm_scale=sm_scale, dtype=dtype)

    def observe_prefill(self, cache, seq_ids, layer, query, key, valid, sm_scale) -> None:
        seqs = cache.stage_state(self).seqs
        S = cache.page_size
        sm_scale = query.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        for b, sid in enumerate(seq_ids):
            q, k = query[b], key[b]
            if valid is not None:
                q, k = q[:, valid[b]], k[:, valid[b]]
            full = k.shape[1] // S
            st = seqs.setdefault(sid, _SeqSpans(base=max(full, self._sink_pages(S))))
            st.layers[layer] = self._host_build(q, k, S, full, sm_scale, cache.dtype)

    def _index(self, cache, sid, layer, seq_len):
        S = cache.page_size
        seqs = cache.stage_state(self).seqs
        st = seqs.get(sid)
        if st is None:
            st = seqs[sid] = _SeqSpans(base=max(seq_len // S, self._sink_pages(S)))
        idx = st.layers.get(layer)
        if idx is None:
            k = cache.gather(layer, sid)[0].transpose(0, 1)
            idx = st.layers[layer] = self._host_build(None, k, S, st.base, cache.head_dim ** -0.5, cache.dtype)
        W = self.decode_span_pages
        target = st.base + W * max(0, (seq_len // S - st.base) // W)
        if target > idx.covered:
            starts = torch.arange(idx.covered, target, W, dtype=torch.long)
            ends = starts + W
            pages = torch.tensor(cache.pages(sid)[idx.covered:target], device=cache.device)
            k = cache.k[layer][pages].transpose(0, 1).reshape(cache.num_kv_heads, -1, cache.head_dim)
            reps = host_reps_by_kmeans(k, starts - idx.covered, ends - idx.covered, S, self.reps_per_span)
            idx.extend(starts, ends, reps)
        return idx

    def _batch(self, ctx):
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

    def apply(self, ctx, state) -> None:
        reps, num_spans, span_of_page, forced = self._batch(ctx)
        state.forced = state.forced | (forced[:, None, :] & state.valid)
        ctx.cache.stage_state(self).scored[ctx.layer] = (num_spans, ctx.plan.num_pages)
        budget = self.budget_pages(ctx.page_size)
        scores = span_ref.span_scores(ctx.q, reps, num_spans, ctx.sm_scale)
        keys = host_span_keys(scores, span_of_page, state.forced & state.valid, budget, self.vote)
        state.narrow(keys, budget, is_bound=False)

    # the byte accounting is the stage's own (per layer, from the span counts it last scored)
    summary_bytes_per_page = Ltri.summary_bytes_per_page


def host_span_keys(scores, span_of_page, forced, budget_pages, vote):
    """The former page order key [B, Hkv, P]: spans ranked by votes, then best score, descending, ties to the
    lower span id (two stable sorts); -rank on a span's pages, 1 outside spans, -inf for spans that no head
    scored. scores [B, Hq, NS]; span_of_page [B, P]; forced [B, Hkv, P]."""
    votes, best = select_ref.span_votes(scores, span_of_page, forced, budget_pages, vote)  # [B, Hkv, NS]
    by_best = torch.sort(best, dim=-1, descending=True, stable=True).indices
    ranked = by_best.gather(-1, torch.sort(votes.gather(-1, by_best), dim=-1, descending=True, stable=True).indices)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(ranked.shape[-1], device=ranked.device)
                                             .expand_as(ranked))
    key = (-rank.float()).masked_fill(~torch.isfinite(best), float("-inf"))
    sop = span_of_page[:, None, :].expand(-1, key.shape[1], -1)
    return key.gather(-1, sop.clamp(min=0)).masked_fill(sop < 0, 1.0)


def host_twin(stage):
    """The host implementation with `stage`'s parameters."""
    cls = {"attention_predictor": HostAttentionPredictor, "ltri": HostLtri}[stage.name]
    return cls(**{f.name: getattr(stage, f.name) for f in type(stage).params()})


def host_pipeline(pipe, backend="reference"):
    """A pipeline like `pipe` whose attention_predictor / ltri stages run the host implementation."""
    import dataclasses

    import composable_kv as ckv
    stages = [host_twin(s) if s.name in ("attention_predictor", "ltri") else s for s in pipe.config.stages]
    return ckv.compile(dataclasses.replace(pipe.config, stages=stages), backend=backend)

