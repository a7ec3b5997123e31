"""Page selection per (request, KV head): pure-torch reference.

Given scores, a forced mask and a budget, keep forced pages plus the best-scoring others, and emit
them as a list ordered by descending order-key (ties: lower position first).
"""
import math

import torch


def select_pages(order_key, forced, candidates, budget_pages: int | None):
    """Choose and order pages.

    order_key  [B, Hkv, P] fp32: higher is read earlier; -inf marks positions that are not pages.
    forced     [B, Hkv, P] bool: always kept (sink, window, last page).
    candidates [B, Hkv, P] bool: pages eligible for the budget.
    budget_pages: total pages kept per (request, KV head), forced included; None keeps every candidate.
    Forced pages are kept even past the budget.

    Returns (order [B, Hkv, P] int32 positions into the request's page table, -1 past `count`;
             count [B, Hkv] int32).
    """
    keep = forced.clone()
    if budget_pages is None:
        keep = keep | candidates
    else:
        n_forced = forced.sum(-1, keepdim=True)  # [B, Hkv, 1]
        free = (budget_pages - n_forced).clamp(min=0)  # [B, Hkv, 1]
        rest = candidates & ~forced
        rest_key = order_key.masked_fill(~rest, float("-inf"))
        rank = _descending_rank(rest_key)  # [B, Hkv, P]
        keep = keep | (rest & (rank < free))
    key = order_key.masked_fill(~keep, float("-inf"))
    order = _descending_positions(key)
    count = keep.sum(-1).to(torch.int32)
    P = order_key.shape[-1]
    slot = torch.arange(P, device=order.device)
    order = torch.where(slot < count[..., None], order, torch.full_like(order, -1))
    return order.to(torch.int32), count


def narrow_pages(order_key, forced, candidates, num_pages, budget_pages: int):
    """select_pages on each request's pages (positions below num_pages [B]; the others are out of play, whatever
    order_key, forced and candidates say there) -> (order, count, kept [B, Hkv, P] bool: the listed pages)."""
    P = order_key.shape[-1]
    valid = (torch.arange(P, device=order_key.device) < num_pages.to(order_key.device)[:, None])[:, None]  # [B, 1, P]
    order, count = select_pages(order_key.masked_fill(~valid, float("-inf")), forced & valid, candidates & valid,
                                budget_pages)
    return order, count, order_to_mask(order, P)


def order_within_splits(order_key, num_pages, num_splits: int):
    """Every page kept, each split's own pages best-first (kernels/page_select/README.md, "split-local order").

    order_key [B, Hkv, P] fp32 (higher is read earlier); num_pages [B]: the request's pages, positions
    0 .. num_pages-1. Split s of S owns the pages p = s (mod S) and reads list positions s, s+S, ...
    (the strided layout): list position k*S + s holds split s's k-th best page (ties: lower position).
    With S = 1 this is select_pages' order of every page.
    Returns (order [B, Hkv, P] int32, -1 past count; count [B, Hkv] int32 = num_pages).
    """
    B, H, P = order_key.shape
    S = max(1, int(num_splits))
    K = -(-P // S)
    pos = torch.arange(K * S, device=order_key.device)
    valid = pos < num_pages.long()[:, None]  # [B, K*S]
    key = torch.nn.functional.pad(order_key, (0, K * S - P), value=float("-inf"))
    key = key.masked_fill(~valid[:, None], float("-inf")).view(B, H, K, S)  # column s: split s's pages
    kth = torch.sort(key, dim=2, descending=True, stable=True).indices  # [B, H, K, S]
    order = (kth * S + torch.arange(S, device=order_key.device)).view(B, H, K * S)[..., :P]
    count = num_pages.to(torch.int32)[:, None].expand(B, H).contiguous()
    order = torch.where(pos[:P] < count[..., None], order, torch.full_like(order, -1))
    return order.to(torch.int32), count


def order_to_mask(order, num_positions: int):
    """[B, Hkv, N] positions (-1 pad) -> [B, Hkv, num_positions] bool membership."""
    idx = torch.where(order >= 0, order.long(), torch.full_like(order.long(), num_positions))
    mask = torch.zeros(order.shape[:-1] + (num_positions + 1,), dtype=torch.bool, device=order.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :num_positions]


def _descending_positions(key):
    """Positions sorted by descending key, ties to the lower position; -inf keys go last."""
    P = key.shape[-1]
    pos = torch.arange(P, device=key.device).expand_as(key)
    # NaN-free keys: sort by (key desc, position asc) with a stable sort on position order.
    _, idx = torch.sort(key, dim=-1, descending=True, stable=True)
    return pos.gather(-1, idx)


def _descending_rank(key):
    order = _descending_positions(key)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    return rank


def page_token_counts(order, page_table_lens, page_size: int):
    """Tokens in each listed page: page_size, or the request's last-page length. order [B, Hkv, N]."""
    seq_lens = page_table_lens.long()  # [B]
    num_pages = (seq_lens + page_size - 1) // page_size
    last_len = seq_lens - (num_pages - 1) * page_size
    pos = order.long()
    is_last = pos == (num_pages - 1)[:, None, None]
    n = torch.where(is_last, last_len[:, None, None].expand_as(pos), torch.full_like(pos, page_size))
    return torch.where(pos >= 0, n, torch.zeros_like(n))  # [B, Hkv, N]


def tail_terms(bounds, tokens, count):
    """Per listed position: U_b + log n_b, the page's bound on its mass if every token sat at the bound
    (-inf past count or for an empty page). bounds, tokens [B, Hkv, N] in list order -> [B, Hkv, N] fp32."""
    live = torch.arange(bounds.shape[-1], device=bounds.device) < count[..., None]
    return torch.where(live & (tokens > 0), bounds.float() + tokens.float().clamp(min=1).log(),
                       torch.full_like(bounds, float("-inf"), dtype=torch.float32))


def strided_tail_lse(bounds, tokens, count, num_splits: int):
    """Per listed position i: LSE over j >= i with j = i (mod num_splits), j < count, of U_j + log n_j.

    Split s of the decode reads positions s, s+S, s+2S, ...; after it has read up to i-S, the pages it
    has not read are exactly this tail. bounds [B, Hkv, N] (in list order), tokens [B, Hkv, N].
    Returns [B, Hkv, N] fp32; -inf where the tail is empty.
    """
    B, H, N = bounds.shape
    S = num_splits
    n_per = math.ceil(N / S)
    pad = n_per * S - N
    terms = torch.nn.functional.pad(tail_terms(bounds, tokens, count), (0, pad), value=float("-inf"))
    per_split = terms.view(B, H, n_per, S)  # position = j*S + s
    tail = torch.logcumsumexp(per_split.flip(2), dim=2).flip(2)
    return tail.reshape(B, H, n_per * S)[..., :N].contiguous()
