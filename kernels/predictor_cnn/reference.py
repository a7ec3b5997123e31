"""AttentionPredictor's page-score CNN: pure-torch reference, fp32 math (the oracle of `triton.py`).

The CNN reads a [H, P] image per (request, head): the last H steps of per-page attention mass, oldest
first, as features log1p(mass * num_pages); conv 3x3 (1 -> C1) + ReLU, conv 3x3 (C1 -> C2) + ReLU, both
zero-padded by 1 (torch's Conv2d padding=1), the mean over the H axis, a 1x1 conv (C2 -> 1): [P] scores.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


class CNNWeights(NamedTuple):
    w1: torch.Tensor  # [C1, 1, 3, 3]
    b1: torch.Tensor  # [C1]
    w2: torch.Tensor  # [C2, C1, 3, 3]
    b2: torch.Tensor  # [C2]
    wh: torch.Tensor  # [1, C2, 1]
    bh: torch.Tensor  # [1]


def cnn_forward(x: torch.Tensor, w: CNNWeights) -> torch.Tensor:
    """x [N, H, P] features (oldest step first) -> scores [N, P]."""
    y = torch.relu(F.conv2d(x[:, None], w.w1, w.b1, padding=1))
    y = torch.relu(F.conv2d(y, w.w2, w.b2, padding=1))  # [N, C2, H, P]
    return F.conv1d(y.mean(dim=2), w.wh, w.bh)[:, 0]


def features(mass: torch.Tensor, num_pages: torch.Tensor) -> torch.Tensor:
    """History masses [N, H, P] -> CNN input: log1p(mass * pages), so a uniform row is log 2 whatever
    the context length and an unread page stays 0. num_pages: [N] (broadcast over H and P)."""
    return torch.log1p(mass * num_pages.to(mass.dtype).view(-1, 1, 1))


def ring_window(hist: torch.Tensor, rows: torch.Tensor, ptr: torch.Tensor, P: int) -> torch.Tensor:
    """The last H steps of each row of a ring buffer, oldest first (one indexed read).

    hist [R, Hh, H, Pcap] (slot ptr[r] of row r is the oldest), rows [B] long, ptr [R] long
    -> [B, Hh, H, P]."""
    H = hist.shape[2]
    idx = (ptr[rows, None] + torch.arange(H, device=hist.device)) % H  # [B, H]
    return hist[rows[:, None], :, idx, :P].transpose(1, 2)  # [B, H, Hh, P] -> [B, Hh, H, P]


def predictor_scores(hist, rows, ptr, num_pages, P: int, weights: CNNWeights, due=None, last=None) -> torch.Tensor:
    """CNN scores of every (request, head) from the ring buffer.

    hist [R, Hh, H, Pcap] fp32, rows [B] long, ptr [R] long, num_pages [B] (the features' scale),
    P <= Pcap pages, due [B] bool or None (None: every row), last [R, Hh, >= P] fp32 or None: each row's kept
    scores -> [B, Hh, P] fp32. A row not due gets last[rows[b], :, :P] (0 without `last`); with `last`, a due
    row's scores are also written there (in place)."""
    x = ring_window(hist, rows, ptr, P)  # [B, Hh, H, P]
    B, Hh = x.shape[:2]
    n = num_pages[:, None].expand(B, Hh).reshape(-1)  # [B * Hh]
    s = cnn_forward(features(x.flatten(0, 1), n), weights).view(B, Hh, P)
    if last is not None:
        if due is not None:
            s = torch.where(due[:, None, None], s, last[rows, :, :P])
        last[rows, :, :P] = s
    elif due is not None:
        s = torch.where(due[:, None, None], s, 0.0)
    return s
