"""Ltri's selection in torch (the oracle; see README.md): ballots, span keys, the budget and the read order."""
import torch

from ..page_select import reference as select_ref

# page keys as exact float64 integers: class (votes + 1; 0: no finite score; OUTSIDE: not in a span) above the
# best score's 32 order bits
_ORD = 2.0 ** 32
OUTSIDE = 255


def span_votes(scores, span_of_page, forced, budget_pages: int, vote: str = "group"):
    """Each query head ranks the spans by its score (desc, ties: lower span id) and votes for those that fit
    into the free budget: the free pages of the spans ranked before it < budget - forced pages.
    -> (votes [B, Hkv, NS] fp32, best [B, Hkv, NS] fp32: the best score over the voters).

    scores [B, Hq, NS] fp32 (-inf: no span); span_of_page [B, P] (-1: no span); forced [B, Hkv, P] bool;
    vote: "group" (a KV head's G query heads) or "layer" (every query head; the same row for every KV head)."""
    B, Hq, NS = scores.shape
    Hkv = forced.shape[1]
    G = Hq // Hkv
    s = scores.view(B, Hkv, G, NS)
    onehot = span_of_page.clamp(min=0)[:, None, :].expand(B, Hkv, -1)
    free_pages = (~forced & (span_of_page >= 0)[:, None, :]).float()
    size = torch.zeros(B, Hkv, NS + 1, device=scores.device).scatter_add_(
        -1, torch.where(span_of_page[:, None, :] >= 0, onehot, NS), free_pages)[..., :NS]  # [B, Hkv, NS]
    avail = (budget_pages - forced.sum(-1)).clamp(min=0).float()  # [B, Hkv]
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # [B, Hkv, G, NS]
    sz = size[:, :, None, :].expand_as(s).gather(-1, order)
    before = sz.cumsum(-1) - sz
    ballot = (before < avail[:, :, None, None]) & torch.isfinite(s.gather(-1, order))
    votes = torch.zeros_like(s).scatter_(-1, order, ballot.float())  # [B, Hkv, G, NS]
    if vote == "layer":
        return (votes.sum((1, 2), keepdim=True).expand(B, Hkv, 1, NS)[:, :, 0],
                s.amax((1, 2), keepdim=True).expand(B, Hkv, 1, NS)[:, :, 0])
    return votes.sum(2), s.amax(2)


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 in [0, 2^32) with the same order (-0.0 folded onto +0.0)."""
    bits = (x.float() + 0.0).contiguous().view(torch.int32).long()
    return torch.where(bits >= 0, bits + 2 ** 31, -1 - bits)


def page_keys(votes, best, span_of_page):
    """[B, Hkv, P] float64 keys, exact integers: pages outside spans first, then by their span's
    (votes, best score), spans without a finite best score last. votes, best [B, Hkv, NS]; span_of_page [B, P]."""
    Hkv = votes.shape[1]
    span_key = torch.where(torch.isfinite(best), (votes.double() + 1) * _ORD + ordered_bits(best).double(), 0.0)
    sop = span_of_page[:, None, :].expand(-1, Hkv, -1)
    key = span_key.gather(-1, sop.clamp(min=0))
    return key.masked_fill(sop < 0, OUTSIDE * _ORD)


def span_select(scores, rows, span_of_page, covered, forced, candidates, num_pages, budget_pages: int,
                sink_pages: int, vote: str = "group", record=None):
    """One layer's ltri selection per (request, KV head).

    scores [B, Hq, NS] fp32 span scores (-inf: no span); rows [B] long: each request's row of the span table
    span_of_page [R, >= P] (-1: sink, open span, past the end; span ids increase with page position) and
    covered [R] (pages from here on are the open span); forced, candidates [B, Hkv, P] bool: the selection
    state so far; num_pages [B]. Forced: the state's, the sink pages and the open span. The others are
    ranked by their span's votes, then its best score (ties: the lower page), and the budget takes them
    best-first; a span's pages share its key, so the last span taken may be cut.

    Returns (order [B, Hkv, P] int32, -1 past count; count [B, Hkv] int32; kept [B, Hkv, P] bool;
    forced [B, Hkv, P] bool; order_key [B, Hkv, P] fp32: -(list index) on kept pages, -inf elsewhere).
    record: None, or (num_spans [R], spans_out [B], pages_out [B]): num_spans[rows] and num_pages are copied there."""
    if record is not None:
        record[1].copy_(record[0][rows.long()])
        record[2].copy_(num_pages)
    B, Hkv, P = forced.shape
    pos = torch.arange(P, device=forced.device)
    valid = (pos[None] < num_pages.long()[:, None])[:, None, :]  # [B, 1, P]
    sop = span_of_page[rows.long(), :P]  # [B, P]
    own = (pos[None] < sink_pages) | (pos[None] >= covered[rows.long()][:, None])  # [B, P]
    forced = (forced | own[:, None, :]) & valid
    votes, best = span_votes(scores, sop.masked_fill(~valid[:, 0], -1), forced, budget_pages, vote)  # valid pages count
    order, count = select_ref.select_pages(page_keys(votes, best, sop), forced, candidates & valid, budget_pages)
    kept = select_ref.order_to_mask(order, P)
    index = torch.arange(P, device=forced.device, dtype=torch.float32).expand(B, Hkv, P)
    slot = torch.where(order >= 0, order.long(), P)  # pads land in a spare column
    order_key = torch.full((B, Hkv, P + 1), float("-inf"), device=forced.device).scatter_(-1, slot, -index)
    return order, count, kept, forced, order_key[..., :P]
