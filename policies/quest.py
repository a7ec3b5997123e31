from dataclasses import dataclass

from composable_kv.stages import FusedPart, ScoringSelector, ScoreKind, _inherits, register_stage
from composable_kv.summaries import KEY_MINMAX, SUMMARIES


@register_stage
@dataclass
class Quest(ScoringSelector):
    """Quest's query-aware page selection: score each page by the box bound
    U_p = sum_i max(q_i*kmin_i, q_i*kmax_i) over its key min/max, max over the GQA group (which keeps
    it an upper bound on every q.k in the page), and keep the top pages under the budget.

    When the budget covers every page of the step's table (the whole context the session reserved),
    Quest neither scores nor reads a summary: the pages are read in natural order, and an ART stop
    after it has no bound to certify with, so it reads them all."""

    name = "quest"
    paper = "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (Tang et al., ICML 2024)"
    summary = "top pages by the key min/max box bound on q.k"
    score_is_bound = True

    def fused_part(self, page_size: int) -> FusedPart | None:
        if not _inherits(self, Quest, "score", "apply", "plan_forced", "covers"):
            return None
        return FusedPart(score=ScoreKind.BOX, budget_tokens=self.budget_tokens)

    def required_summaries(self):
        return frozenset({KEY_MINMAX})

    def summary_bytes_per_page(self, cache, layer: int | None = None) -> int:
        return SUMMARIES[KEY_MINMAX].bytes_per_page(cache)

    def score(self, ctx):
        return ctx.quest_bound()  # [B, Hkv, P]

    def covers(self, plan) -> bool:
        """The budget holds every page of the step's table: there is nothing to select."""
        return plan.max_pages <= self.budget_pages(plan.page_size)

    def apply(self, ctx, state) -> None:
        if self.covers(ctx.plan):  # keep every candidate, unscored: no page summary is read
            state.keep_all_candidates()
            return
        super().apply(ctx, state)
