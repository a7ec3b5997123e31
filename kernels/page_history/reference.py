"""AttentionPredictor's history push in torch (the oracle of triton.py): one decode step's page mass into each row's
next ring slot, averaged over each head's group, and the row's clock ticks."""
import torch


def page_mass(page_lse, lse) -> torch.Tensor:
    """Softmax mass per page [B, Hq, P] from the decode's side output: page_lse [B, Hq, P] (log of each page's
    unnormalised mass, -inf where not read) and lse [B, Hq] (the step's log-sum-exp); 0 where not read."""
    return torch.nan_to_num((page_lse.float() - lse.float()[..., None]).exp(), nan=0.0)


def push(hist, ptr, steps, rows, page_lse, lse, group: int = 1) -> None:
    """In place. hist [R, Hh, H, Pcap] fp32, ptr and steps [R] long, rows [B] long (distinct), page_lse
    [B, Hh * group, P] and lse [B, Hh * group] (page_mass's inputs; P <= Pcap): hist[rows[b], h, ptr[rows[b]], :P] =
    the mean of page_mass over the head group h*group .. (h+1)*group, 0 past P; then ptr[rows] = (ptr + 1) % H and
    steps[rows] += 1."""
    B, Hq, P = page_lse.shape
    mass = page_mass(page_lse, lse).view(B, Hq // group, group, P).mean(2)  # [B, Hh, P]
    slot = ptr[rows]  # [B]
    hist[rows, :, slot] = torch.nn.functional.pad(mass, (0, hist.shape[-1] - P))
    ptr[rows] = (slot + 1) % hist.shape[2]
    steps[rows] += 1


def clock(steps, seeded, scores, rows, calibrate_every: int, calibrate_first: bool, run_every: int):
    """The step's turns from each row's clock: (calibrate [B] bool: the row reads every page, steps % calibrate_every
    == 0, or its first decode step after a prefill seed with calibrate_first; due [B] bool: the CNN scores the row,
    steps % run_every == 0 or never scored (scores[row, 0, 0] = -inf)). steps [R] long, seeded [R] bool,
    scores [R, Hkv, Pcap], rows [B] long."""
    s = steps[rows]  # [B]
    calibrate = s % calibrate_every == 0
    if calibrate_first:
        calibrate = calibrate | ((s == 1) & seeded[rows])
    return calibrate, (s % run_every == 0) | torch.isinf(scores[rows, 0, 0])
