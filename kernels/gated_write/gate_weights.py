"""The gate MLP's weights for one layer, as the write op reads them (fp32, KV head first)."""
from typing import NamedTuple

import torch


class GateWeights(NamedTuple):
    w1: torch.Tensor     # [H, 2D, HID]
    b1: torch.Tensor     # [H, HID]
    w2: torch.Tensor     # [H, HID]
    b2: torch.Tensor     # [H]
    mu: torch.Tensor     # [H, 2D] input standardization: (x - mu) / sigma
    sigma: torch.Tensor  # [H, 2D]
