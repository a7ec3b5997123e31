"""AttentionPredictor's history push in torch (the oracle of triton.py): one decode step's page mass into each row's
next ring slot, averaged over each head's group, and the row's clock ticks."""
import torch


def push(hist, ptr, steps, rows, mass, group: int = 1) -> None:
    """In place. hist [R, Hh, H, Pcap] fp32, ptr and steps [R] long, rows [B] long (distinct), mass [B, Hh * group, P]
    (P <= Pcap; 0 for pages not read): hist[rows[b], h, ptr[rows[b]], :P] = mean of mass[b, h*group:(h+1)*group],
    0 past P; then ptr[rows] = (ptr + 1) % H and steps[rows] += 1."""
    B, Hq, P = mass.shape
    mass = mass.float().view(B, Hq // group, group, P).mean(2)  # [B, Hh, P]
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
