from dataclasses import dataclass

from composable_kv.kernels.key_shadow import reference as shadow_ref
from composable_kv.stages import FusedPart, ScoringSelector, _inherits, param, register_stage
from composable_kv.summaries import KEY_MINMAX, KEY_SHADOW, SUMMARIES


@register_stage
@dataclass
class KeyShadow(ScoringSelector):
    """Rank pages by a low-bit copy of every key: U_p = max over the page's tokens and the GQA group of
    q.k^ + sum_i |q_i| step_i / 2, a sound upper bound on every q.k of the page (rounding accounted for).
    Stack it after a cheap selector (Quest keeping ~4x the final budget): the shadow re-ranks those
    pages, keeps `budget_tokens`, and hands ART a read order and bounds tight enough to stop early."""

    name = "key_shadow"
    paper = ("low-bit key estimates for page ranking as in Double Sparsity (Yang et al., 2024) and "
             "Twilight (Lin et al., 2025); the per-page sound shadow bound is composable-kv's")
    summary = "re-rank pages by an int8/int4 per-token key copy (sound bound; reads the copy)"
    score_is_bound = True
    scores_kept_only = True  # reads the shadow only for the pages the previous scorer kept (kv_bytes_read)

    bits: int = param(8, "bits per key channel in the shadow copy", choices=(8, 4))
    budget_tokens: int = param(512, "tokens kept per (request, KV head), forced pages included", min=0)

    @property
    def summary_name(self) -> str:
        return KEY_SHADOW[self.bits]

    def required_summaries(self):
        return frozenset({self.summary_name, KEY_MINMAX})

    def summary_bytes_per_page(self, cache, layer: int | None = None) -> int:
        """Per scored page (only those the previous scorer kept): codes, per-channel step, zero point."""
        return SUMMARIES[self.summary_name].bytes_per_page(cache)

    def fused_part(self, page_size: int) -> FusedPart | None:
        if not _inherits(self, KeyShadow, "score", "apply", "plan_forced"):
            return None
        return FusedPart(rerank_bits=self.bits, budget_tokens=self.budget_tokens)

    def score(self, ctx):
        c = ctx.cache
        return shadow_ref.shadow_scores(ctx.q, c.shadow_codes[self.bits][ctx.layer],
                                        c.shadow_step[self.bits][ctx.layer], c.key_min[ctx.layer],
                                        ctx.plan.page_table, ctx.plan.seq_lens, ctx.sm_scale, self.bits)
