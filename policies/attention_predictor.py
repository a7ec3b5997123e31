from dataclasses import dataclass

import torch

from composable_kv.predictor import PageHistory, features, load_weights
from composable_kv.stages import ScoringSelector, param, register_stage


@register_stage
@dataclass
class AttentionPredictor(ScoringSelector):
    """AttentionPredictor: a small CNN reads the last `history_steps` steps of block-pooled attention
    (one mass per page per step, from the decode kernel's page-mass side output; pages a step did not
    read count 0) and scores the pages for the next step. The sink and recent pages are forced; every
    `calibrate_every` steps a sequence reads every page (a dense calibration step) to refresh its
    history; a sequence's first decode step is one. Cheaper settings: per_kv_head (one history and
    one CNN row per KV head instead of per query head), fewer history_steps, run_every > 1 (reuse the
    last prediction in between).

    The history is per pipeline, per cache, per layer and per sequence (composable_kv.predictor.
    PageHistory); rows of finished sequences are freed when the cache no longer holds them.
    """

    name = "attention_predictor"
    graph_safe = False  # the CNN history and calibration schedule live on the host
    paper = ("AttentionPredictor: Temporal Pattern Matters for Efficient LLM Inference "
             "(Yang et al., 2025; arXiv 2502.04077)")
    summary = "top pages by a CNN over the history of page attention (trained: ckv train-predictor)"

    history_steps: int = param(64, "H: decode steps of page attention the CNN reads", min=3, max=1024)
    calibrate_every: int = param(5, "N: every N-th step of a sequence reads every page (dense)", min=1)
    per_kv_head: bool = param(True, "one history per KV head (group-summed mass); false: per query head")
    run_every: int = param(1, "k: run the CNN every k steps, reuse its scores in between", min=1)
    sink_tokens: int = param(64, "leading tokens always read", min=0)
    recent_tokens: int = param(64, "most recent tokens always read", min=0)
    weights: str = param("", "CNN weights file; empty: the `ckv train-predictor` default in the user cache")

    observes_page_mass = True  # the pipeline asks the decode for the page-mass side output

    def summary_bytes_per_page(self, cache) -> int:
        """The CNN reads H fp32 history values per page and KV head (per query head: G times that,
        which the cache alone cannot tell; this counts one), every run_every steps."""
        return -(-self.history_steps * 4 // self.run_every)

    def plan_forced(self, plan):
        S = plan.page_size
        pos = torch.arange(plan.max_pages, device=plan.page_table.device)[None]  # [1, P]
        start = (plan.seq_lens.long() - self.recent_tokens).clamp(min=0)[:, None]
        return ((pos * S < self.sink_tokens) | ((pos + 1) * S > start)) & plan.valid  # [B, P]

    # -- state -----------------------------------------------------------------------------------
    def _history(self, ctx) -> tuple[PageHistory, torch.Tensor]:
        state = ctx.state if getattr(ctx, "state", None) is not None else self.__dict__.setdefault("_state", {})
        per_cache = state.setdefault(id(self), {})
        key = (id(ctx.cache), ctx.layer)
        hist, ref = per_cache.get(key, (None, None))
        if hist is None or ref() is not ctx.cache:  # a new cache (an id can be reused after GC)
            import weakref
            heads = ctx.num_kv_heads if self.per_kv_head else ctx.num_q_heads
            hist, ref = PageHistory(heads, self.history_steps, ctx.q.device), weakref.ref(ctx.cache)
            per_cache[key] = (hist, ref)
        rows = hist.rows(ctx.plan.seq_ids, ctx.plan.seq_lens.tolist(), ctx.cache.sequences())
        return hist, rows

    def _rows(self, ctx):
        cached = getattr(ctx, "_predictor_rows", None)
        if cached is None or cached[0] is not self:
            cached = (self, *self._history(ctx))
            ctx._predictor_rows = cached
        return cached[1], cached[2]

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
        calibrate = (hist.steps[rows.cpu()] % self.calibrate_every) == 0  # [B] (first step included)
        if calibrate.any():
            state.forced = state.forced | (calibrate.to(state.forced.device)[:, None, None] & state.valid)
        super().apply(ctx, state)

    def observe(self, ctx, page_mass: torch.Tensor) -> None:
        """After the decode: page_mass [B, Hq, P] (softmax mass per page, 0 where not read)."""
        hist, rows = self._rows(ctx)
        if self.per_kv_head:
            B, Hq, P = page_mass.shape
            page_mass = page_mass.view(B, ctx.num_kv_heads, Hq // ctx.num_kv_heads, P).mean(2)
        hist.push(rows, page_mass)
        ctx._predictor_rows = None
