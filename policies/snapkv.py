"""SnapKV as a page selector: the prompt's last W queries vote at prefill; each KV head keeps its best pages.

SnapKV (Li et al., 2024) compresses the prompt's KV cache once, at prefill: the last `window` queries of
the prompt (the observation window) attend to the earlier tokens, each token's vote is the attention it
gets summed over the window's queries, a 1-D pooling clusters the votes, and the top tokens per head
are kept together with the window itself; tokens generated later are always kept. Our choices:

  * Pages, not tokens: a page's score pools its tokens' votes. SnapKV pools over a few neighbouring
    tokens (kernel 5-7) so that a kept token keeps its neighbours; a page of 16 tokens already is such a
    cluster, so the pooling runs over the page. `avg` (the default, as SnapKV's code) ranks pages by the
    vote mass the window spent on them, i.e. keeps the most attention per byte; `max` ranks by the
    page's hottest token, closest to SnapKV's token top-k.
  * GQA: the votes of a KV head's query heads are averaged (SnapKV selects per query head on repeated
    KV; one page list per KV head needs one vote, and the mean is the group's mass).
  * Budget: `budget_tokens` counts the prompt's kept pages, window pages included (SnapKV's
    max_capacity_prompt); pages written after the prefill are always kept and on top of it.
  * Graph-safe state: per cache, a per-layer `[num_pages, Hkv]` fp32 score indexed by physical page
    id (+inf for the window's pages and every page the prefill did not write) and a `[num_pages]` bool
    "prompt page" flag. A decode step gathers them through the page table: no host sync.
  * A sequence whose prefill was not observed has no votes: all its pages count as written after the
    prefill, so it reads every page (documented, not an error: stacks are tested on plain caches). When
    an observed sequence leaves the cache, its pages are reset before they can be scored again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from composable_kv.stages import ScoringSelector, StageState, param, register_stage


def page_votes(q: torch.Tensor, k: torch.Tensor, page_size: int, sm_scale: float, window: int,
               pooling: str) -> torch.Tensor:
    """SnapKV's votes pooled per page, for one prompt.

    q [Hq, Tq, D] the prompt's last Tq >= min(window, T) queries, k [Hkv, T, D] (post-RoPE, real tokens)
    -> [Hkv, P] fp32, P = ceil(T / page_size).
    vote_t = sum over the last W = min(window, T) queries i of softmax_i(t) (causal), mean over the
    group's query heads; a page pools its tokens' votes (avg: sum / page_size; max); pages holding any
    of the last W tokens are +inf (always kept). Costs Hq * W * T dot products.
    """
    Hq, Tq, D = q.shape
    Hkv, T = k.shape[0], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"snapkv: {Hq} query heads is not a multiple of {Hkv} KV heads")
    G, W, S = Hq // Hkv, min(window, T), page_size
    if Tq < W:
        raise ValueError(f"snapkv: the last {W} queries are needed, got {Tq}")
    qw = q[:, Tq - W:].float().reshape(Hkv, G * W, D)
    logits = (qw @ k.float().transpose(1, 2)).view(Hkv, G, W, T) * sm_scale
    causal = torch.arange(T, device=q.device)[None] > torch.arange(T - W, T, device=q.device)[:, None]  # [W, T]
    votes = logits.masked_fill(causal, float("-inf")).softmax(-1).sum(2).mean(1)  # [Hkv, T]
    P = -(-T // S)
    votes = torch.nn.functional.pad(votes, (0, P * S - T)).view(Hkv, P, S)
    score = votes.sum(-1) / S if pooling == "avg" else votes.amax(-1)  # [Hkv, P]
    score[:, (T - W) // S:] = float("inf")
    return score


class _Votes(StageState):
    """One cache's SnapKV state (device tensors indexed by physical page id)."""

    def __init__(self, cache):
        self.scores: list = [None] * cache.num_layers  # per layer: [num_pages, Hkv] fp32, None if never observed
        self.prompt = torch.zeros(cache.num_pages, dtype=torch.bool, device=cache.device)  # [num_pages]: prompt pages
        self.pages: dict[int, list[int]] = {}  # seq id -> the physical pages scored at its prefill

    @property
    def observed(self) -> bool:
        return any(s is not None for s in self.scores)

    def free_sequence(self, seq_id: int) -> None:
        """Reset a finished sequence's pages (they may be handed to a new sequence)."""
        pages = self.pages.pop(seq_id, None)
        if not pages:
            return
        idx = torch.tensor(pages, dtype=torch.long, device=self.prompt.device)
        self.prompt[idx] = False
        for s in self.scores:
            if s is not None:
                s[idx] = float("inf")


@register_stage
@dataclass
class SnapKV(ScoringSelector):
    """SnapKV: at prefill the prompt's last `window` queries vote (their attention, summed over the
    window, averaged over the GQA group, pooled per page); each KV head keeps the observation window's
    pages plus its best-voted prompt pages under `budget_tokens`; pages written after the prefill are
    always kept, on top of the budget. Scores are fixed at prefill; ART reads the kept pages by vote."""

    name = "snapkv"
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., NeurIPS 2024; arXiv 2404.14469)"
    summary = "top prompt pages by the prompt's last W queries' attention at prefill; later pages always kept"

    window: int = param(32, "W: the prompt's last queries that vote; their pages are always kept", min=1, max=65536)
    pooling: str = param("avg", "per-page pooling of the token votes: avg (vote mass) or max (hottest token)",
                         choices=("avg", "max"))

    def new_state(self, cache) -> _Votes:
        return _Votes(cache)

    def summary_bytes_per_page(self, cache, layer: int | None = None) -> int:
        return 4  # one fp32 score per (page, KV head)

    def votes(self, cache) -> _Votes | None:
        """This cache's state, or None if no prefill was observed on it (for inspection and tests)."""
        st = cache.stage_state(self)
        return st if st.observed else None

    def prefill_queries(self) -> int:
        return self.window

    def observe_prefill(self, cache, seq_ids, layer, query, key, valid, sm_scale) -> None:
        """Called per layer during a dense prefill (composable_kv.hf): query [B, Hq, T, D], key
        [B, Hkv, T, D] post-RoPE, valid [B, T] bool (real tokens; None: all). Scores each prompt's pages."""
        st = cache.stage_state(self)
        if st.scores[layer] is None:
            st.scores[layer] = torch.full((cache.num_pages, cache.num_kv_heads), float("inf"),
                                          dtype=torch.float32, device=cache.device)
        sm_scale = query.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        S = cache.page_size
        with torch.no_grad():
            for b, sid in enumerate(seq_ids):
                q, k = query[b], key[b]
                if valid is not None:
                    q, k = q[:, valid[b][-q.shape[1]:]], k[:, valid[b]]  # q: the prompt's last queries
                T = k.shape[1]
                if cache.seq_len(sid) != T:
                    raise ValueError(f"snapkv: sequence {sid} holds {cache.seq_len(sid)} tokens but its prefill "
                                     f"showed {T}; observe the whole prompt in one prefill call")
                pages = cache.pages(sid)[:-(-T // S)]
                idx = torch.tensor(pages, dtype=torch.long, device=cache.device)
                st.scores[layer][idx] = page_votes(q, k, S, sm_scale, self.window, self.pooling).T.to(cache.device)
                st.prompt[idx] = True
                st.pages[sid] = pages

    def score(self, ctx):
        scores = ctx.cache.stage_state(self).scores[ctx.layer]
        if scores is None:  # nothing observed: every page counts as written after the prefill
            return torch.full((ctx.batch_size, ctx.num_kv_heads, ctx.max_pages), float("inf"), device=ctx.q.device)
        return scores[ctx.plan.page_table.long()].permute(0, 2, 1)  # [B, Hkv, P]

    def apply(self, ctx, state) -> None:
        scores = self.score(ctx)  # [B, Hkv, P]
        st = ctx.cache.stage_state(self)
        valid = ctx.plan.valid  # [B, P]
        after = valid & ~st.prompt[ctx.plan.page_table.long()]  # [B, P] written after the prefill
        state.forced = state.forced | (torch.isinf(scores) & state.valid)
        budget = self.budget_pages(ctx.page_size) + after.sum(-1).view(-1, 1, 1)  # [B, 1, 1]
        state.narrow(scores, budget, is_bound=False)
