"""Span scores per query head: pure-torch reference, fp32 math.

A span is indexed by R representative keys; its score for query head g is the best match
`max_r q_g . rep_r * sm_scale`. Spans past a request's `num_spans` score -inf. The keys are stored in the cache's
dtype, or as int8 with a scale a key (quantize_reps: half the bytes of bf16 for the span scoring to read).
"""
import torch


def quantize_reps(reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 representative keys, the storage span_scores reads with `scales`: reps [..., D] -> (int8 [..., D],
    fp32 scales [...]) with reps ~ int8 * scale; symmetric per key, scale = max |rep| / 127 (1 for a zero key), values
    rounded half up: floor(rep / scale + 0.5). Error per element <= scale / 2."""
    x = reps.float()
    scale = x.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.floor(x / scale[..., None] + 0.5).clamp(-127, 127).to(torch.int8), scale


def span_scores(q, reps, num_spans, sm_scale: float, rows=None, scales=None) -> torch.Tensor:
    """q [B, Hq, D]; reps [B, Hkv, NS, R, D] and num_spans [B], or tables [N, Hkv, NS, R, D] and [N] read at
    rows [B] long -> [B, Hq, NS] fp32 (scaled, -inf past num_spans). scales: None, or int8 reps' scales
    [B or N, Hkv, NS, R] fp32 (quantize_reps): a key is reps * scales, and q is quantized the same way (a scale a
    query head) for the int8 dot the kernel runs."""
    if rows is not None:
        reps, num_spans = reps[rows], num_spans[rows]
        scales = None if scales is None else scales[rows]
    B, Hq, D = q.shape
    Hkv, NS = reps.shape[1], reps.shape[2]
    if scales is not None:
        q8, q_scale = quantize_reps(q)  # [B, Hq, D] int8, [B, Hq]
        q = q8.float() * q_scale[..., None]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    logits = torch.einsum("bhgd,bhsrd->bhgsr", qg, reps.float())  # [B, Hkv, G, NS, R]
    if scales is not None:
        logits = logits * scales.float()[:, :, None]
    best = logits.amax(-1).reshape(B, Hq, NS) * sm_scale
    valid = torch.arange(NS, device=q.device)[None, :] < num_spans.long()[:, None]  # [B, NS]
    return best.masked_fill(~valid[:, None, :], float("-inf"))
