from dataclasses import dataclass

import torch


from composable_kv.policies.attention_predictor.predictor import PageHistory, features, load_weights, prefill_page_mass
from composable_kv.stages import GraphSupport, ScoringSelector, StageState, param, register_stage
from composable_kv.ints import cdiv


@register_stage
@dataclass
class AttentionPredictor(ScoringSelector):
    """AttentionPredictor: a small CNN reads the last `history_steps` steps of block-pooled attention
    (one mass per page per step, from the decode kernel's page-mass side output; pages a step did not
    read count 0) and scores the pages for the next step. The history starts from the prefill: the
    prompt's last H queries' attention pooled per page (exact causal softmax). The sink and recent
    pages are forced; every `calibrate_every`-th step a sequence reads every page (a dense calibration
    step) to refresh its history, the prefill counting as step 0 (decode steps N-1, 2N-1, ... are
    dense). `calibrate_first` (default) makes the first decode step dense too; without it the first
    step predicts from the prefill history alone. A sequence whose prefill was not observed (empty
    history) calibrates on its first decode step whatever the setting.
    Cheaper settings: per_kv_head (one history and
    one CNN row per KV head instead of per query head), fewer history_steps, run_every > 1 (reuse the
    last prediction in between).

    The history is per pipeline, per cache, per layer and per sequence (policies/attention_predictor/predictor.py:
    PageHistory); rows of finished sequences are freed when the cache no longer holds them.
    """

    name = "attention_predictor"
    graph_support = GraphSupport.NEVER  # the CNN history and calibration schedule live on the host
    paper = ("AttentionPredictor: Temporal Pattern Matters for Efficient LLM Inference "
             "(Yang et al., 2025; arXiv 2502.04077)")
    summary = "top pages by a CNN over the history of page attention (trained: ckv train-predictor)"

    history_steps: int = param(64, "H: decode steps of page attention the CNN reads", min=3, max=1024)
    calibrate_every: int = param(5, "N: every N-th step reads every page (dense; the prefill is step 0)", min=1)
    calibrate_first: bool = param(True, "the first decode step reads every page, prefill history or not")
    per_kv_head: bool = param(True, "one history per KV head (group-summed mass); false: per query head")
    run_every: int = param(1, "k: run the CNN every k steps, reuse its scores in between", min=1)
    sink_tokens: int = param(64, "leading tokens always read", min=0)
    recent_tokens: int = param(64, "most recent tokens always read", min=0)
    weights: str = param("", "CNN weights file; empty: the `ckv train-predictor` default in the user cache")


    def summary_bytes_per_page(self, cache) -> int:
        """The CNN reads H fp32 history values per page and KV head (per query head: G times that,
        which the cache alone cannot tell; this counts one), every run_every steps."""
        return cdiv(self.history_steps * 4, self.run_every)

    def plan_forced(self, plan):
        S = plan.page_size
        pos = torch.arange(plan.max_pages, device=plan.page_table.device)[None]  # [1, P]
        start = (plan.seq_lens.long() - self.recent_tokens).clamp(min=0)[:, None]
        return ((pos * S < self.sink_tokens) | ((pos + 1) * S > start)) & plan.valid  # [B, P]

    # -- state -----------------------------------------------------------------------------------
    def new_state(self, cache) -> "_PredictorState":
        return _PredictorState()

    def _history(self, ctx) -> tuple[PageHistory, torch.Tensor]:
        state = ctx.cache.stage_state(self)
        hist = state.history.get(ctx.layer)
        if hist is None:
            heads = ctx.num_kv_heads if self.per_kv_head else ctx.num_q_heads
            hist = state.history[ctx.layer] = PageHistory(heads, self.history_steps, ctx.q.device)
        rows = hist.rows(ctx.plan.seq_ids, ctx.plan.seq_lens.tolist(), ctx.cache.sequences())
        pending = state.pending
        if pending:
            for sid, r in zip(ctx.plan.seq_ids, rows.tolist()):
                mass = pending.pop((sid, ctx.layer), None)
                if mass is not None and hist.steps[r] == 0:  # a fresh row: start it from the prefill
                    hist.seed(r, mass)
        return hist, rows

    def observe_prefill(self, cache, seq_ids, layer, query, key, valid, sm_scale) -> None:
        """Called per layer during a dense prefill (composable_kv.hf): query [B, Hq, T, D], key
        [B, Hkv, T, D] post-RoPE, valid [B, T] bool (None: all real). Keeps each sequence's last
        `history_steps` queries' attention pooled per page, for its history row at its first decode."""
        pending = cache.stage_state(self).pending
        sm_scale = query.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        Hkv = key.shape[1]
        with torch.no_grad():
            for b, sid in enumerate(seq_ids):
                q, k = query[b], key[b]
                if valid is not None:
                    q, k = q[:, valid[b]], k[:, valid[b]]
                mass = prefill_page_mass(q, k, cache.page_size, sm_scale, self.history_steps)  # [Hq, h, P]
                if self.per_kv_head:  # as observe(): the group's mean
                    mass = mass.view(Hkv, -1, *mass.shape[1:]).mean(1)
                pending[(sid, layer)] = mass

    def _rows(self, ctx):
        """This layer's history and the step's rows, looked up once per layer and step (score, apply and
        observe_page_mass all ask)."""
        state = ctx.cache.stage_state(self)
        if state.rows_of is not ctx:
            state.rows_of, state.rows = ctx, self._history(ctx)
        return state.rows

    # -- selection ---------------------------------------------------------------------------------
    def score(self, ctx):
        hist, rows = self._rows(ctx)
        B, P, Hkv = ctx.batch_size, ctx.max_pages, ctx.num_kv_heads
        hist.ensure_pages(P)
        steps = hist.steps[rows.cpu()]
        due = ((steps % self.run_every) == 0) | torch.isinf(hist.scores[rows, 0, 0]).cpu()  # or never scored
        if due.any():
            due_rows = rows[due.to(rows.device)]
            x = hist.window(due_rows, P)  # [b, Hh, H, P]
            b, Hh = x.shape[:2]
            n = ctx.plan.num_pages[due.to(rows.device)].repeat_interleave(Hh)
            model = load_weights(self.weights or None, ctx.q.device)
            with torch.no_grad():
                s = model(features(x.flatten(0, 1), n)).view(b, Hh, P)
                if not self.per_kv_head:  # per query head: max of each head's predicted distribution
                    s = s.masked_fill(~ctx.plan.valid[due.to(rows.device)][:, None], float("-inf"))
                    s = s.log_softmax(-1).view(b, Hkv, Hh // Hkv, P).amax(2)
            hist.scores[due_rows, :, :P] = torch.nn.functional.pad(s, (0, 0, 0, hist.heads - s.shape[1]),
                                                                   value=float("-inf"))
        return hist.scores[rows, :Hkv, :P].clone()  # [B, Hkv, P]

    def apply(self, ctx, state) -> None:
        hist, rows = self._rows(ctx)
        steps = hist.steps[rows.cpu()]
        calibrate = (steps % self.calibrate_every) == 0  # [B]; an unseeded first step too
        if self.calibrate_first:
            calibrate |= (steps == 1) & hist.seeded[rows.cpu()]
        if calibrate.any():
            state.forced = state.forced | (calibrate.to(state.forced.device)[:, None, None] & state.valid)
        super().apply(ctx, state)

    def observe_page_mass(self, ctx, page_mass: torch.Tensor) -> None:
        """After the decode: page_mass [B, Hq, P] (softmax mass per page, 0 where not read)."""
        hist, rows = self._rows(ctx)
        if self.per_kv_head:
            B, Hq, P = page_mass.shape
            page_mass = page_mass.view(B, ctx.num_kv_heads, Hq // ctx.num_kv_heads, P).mean(2)
        hist.push(rows, page_mass)
        ctx.cache.stage_state(self).rows_of = None


class _PredictorState(StageState):
    """One cache's predictor state: a history ring buffer per layer, the prefill's pooled attention waiting
    for each sequence's first decode, and the rows looked up for the layer being decoded."""

    def __init__(self):
        self.history: dict[int, PageHistory] = {}  # layer -> rows of (sequence, head) history
        self.pending: dict[tuple[int, int], torch.Tensor] = {}  # (seq id, layer) -> [Hh, h, P]
        self.rows_of = None  # the LayerContext the cached rows belong to
        self.rows = None

    def free_sequence(self, seq_id: int) -> None:
        for key in [k for k in self.pending if k[0] == seq_id]:
            del self.pending[key]
