"""Page scores per (request, KV head): pure-torch reference, fp32 math.

Both scores are logit upper bounds (already multiplied by `sm_scale`), reduced with a max over the
GQA group, so each stays an upper bound on every q.k of every query head in the group.
"""
import torch


def _grouped_query(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    B, Hq, D = q.shape
    return q.float().view(B, num_kv_heads, Hq // num_kv_heads, D)  # [B, Hkv, G, D]


def _valid_pages(page_table: torch.Tensor, num_pages: torch.Tensor) -> torch.Tensor:
    P = page_table.shape[1]
    return torch.arange(P, device=page_table.device)[None, :] < num_pages[:, None]  # [B, P]


def quest_scores(q, key_min, key_max, page_table, num_pages, sm_scale: float) -> torch.Tensor:
    """Quest's box bound U_p = sum_i max(q_i*kmin_i, q_i*kmax_i), max over the group.

    q [B, Hq, D]; key_min/key_max [num_pages_total, Hkv, D]; page_table [B, P] physical page ids;
    num_pages [B]. Returns [B, Hkv, P] fp32, -inf on positions past a request's pages.
    """
    Hkv = key_min.shape[1]
    qg = _grouped_query(q, Hkv)  # [B, Hkv, G, D]
    table = page_table.long().clamp(min=0)
    kmin = key_min[table].float().transpose(1, 2)  # [B, Hkv, P, D]
    kmax = key_max[table].float().transpose(1, 2)
    qe = qg[:, :, :, None, :]  # [B, Hkv, G, 1, D]
    bound = torch.maximum(qe * kmin[:, :, None], qe * kmax[:, :, None]).sum(-1)  # [B, Hkv, G, P]
    scores = bound.amax(dim=2) * sm_scale  # [B, Hkv, P]
    return scores.masked_fill(~_valid_pages(page_table, num_pages)[:, None, :], float("-inf"))


def quest_scores_listed(q, key_min, key_max, page_table, num_pages, order, count, sm_scale: float) -> torch.Tensor:
    """quest_scores at the listed pages only: order [B, Hkv, N] page positions (list order), count [B, Hkv] listed.
    Returns [B, Hkv, N] fp32: the bound of page order[b, h, i] at slot i < count, -inf from count on."""
    full = quest_scores(q, key_min, key_max, page_table, num_pages, sm_scale)
    live = torch.arange(order.shape[-1], device=order.device) < count[..., None]
    return torch.where(live, full.gather(-1, order.long().clamp(min=0)), float("-inf"))


def exact_page_max_scores(q, k_cache, page_table, seq_lens, sm_scale: float) -> torch.Tensor:
    """Exact top-k oracle: a page's score is its max q.k over its valid tokens and the group.

    k_cache [num_pages_total, Hkv, S, D]; seq_lens [B] tokens. Returns [B, Hkv, P] fp32.
    """
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    qg = _grouped_query(q, Hkv)
    P = page_table.shape[1]
    keys = k_cache[page_table.long().clamp(min=0)].float()  # [B, P, Hkv, S, D]
    logits = torch.einsum("bhgd,bphsd->bhgps", qg, keys)  # [B, Hkv, G, P, S]
    token_pos = torch.arange(P * S, device=q.device).view(P, S)
    valid = token_pos[None] < seq_lens.long()[:, None, None]  # [B, P, S]
    logits = logits.masked_fill(~valid[:, None, None], float("-inf"))
    return logits.amax(dim=(2, 4)) * sm_scale  # [B, Hkv, P]
