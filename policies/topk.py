from dataclasses import dataclass

from composable_kv.stages import FusedPart, ScoringSelector, ScoreKind, _inherits, register_stage


@register_stage
@dataclass
class TopK(ScoringSelector):
    """Exact top-k oracle: a page's score is its max q.k over its tokens and the GQA group. It reads
    every key to score, so it saves no bytes; it is the ceiling that cheaper scores aim for."""

    name = "topk"
    paper = "oracle (exact page max q.k); the upper reference in Quest (Tang et al., 2024)"
    summary = "top pages by the exact max q.k (reads all keys; an oracle)"
    score_is_bound = True

    def fused_part(self, page_size: int) -> FusedPart | None:
        if not _inherits(self, TopK, "score", "apply", "plan_forced"):
            return None
        return FusedPart(score=ScoreKind.EXACT, budget_tokens=self.budget_tokens)

    def summary_bytes_per_page(self, cache, layer: int | None = None) -> int:
        return cache.page_size * cache.head_dim * cache.dtype.itemsize

    def score(self, ctx):
        c = ctx.cache
        return ctx.page_score.exact_page_max_scores(ctx.q, c.k[ctx.layer], ctx.plan.page_table,
                                                    ctx.plan.seq_lens, ctx.sm_scale)  # [B, Hkv, P]
