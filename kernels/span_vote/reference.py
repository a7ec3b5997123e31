"""Ltri's span ballots in torch (the oracle; see README.md)."""
import torch


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
