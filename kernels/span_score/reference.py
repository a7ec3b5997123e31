"""Span scores per query head: pure-torch reference, fp32 math.

A span is indexed by R representative keys; its score for query head g is the best match
`max_r q_g . rep_r * sm_scale`. Spans past a request's `num_spans` score -inf.
"""
import torch


def span_scores(q, reps, num_spans, sm_scale: float, rows=None) -> torch.Tensor:
    """q [B, Hq, D]; reps [B, Hkv, NS, R, D] and num_spans [B], or tables [N, Hkv, NS, R, D] and [N] read at
    rows [B] long -> [B, Hq, NS] fp32 (scaled, -inf past num_spans)."""
    if rows is not None:
        reps, num_spans = reps[rows], num_spans[rows]
    B, Hq, D = q.shape
    Hkv, NS = reps.shape[1], reps.shape[2]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    logits = torch.einsum("bhgd,bhsrd->bhgsr", qg, reps.float())  # [B, Hkv, G, NS, R]
    best = logits.amax(-1).reshape(B, Hq, NS) * sm_scale
    valid = torch.arange(NS, device=q.device)[None, :] < num_spans.long()[:, None]  # [B, NS]
    return best.masked_fill(~valid[:, None, :], float("-inf"))
