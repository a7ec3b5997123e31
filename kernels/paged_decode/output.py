"""The one decode-output type: both decode kernels return it (out fp32), and so does pipeline.run (out in
q's dtype; exported as composable_kv.DecodeResult)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeOut:
    out: torch.Tensor          # [B, Hq, D]
    pages_read: torch.Tensor   # [B, Hkv] int32
    tau_bound: torch.Tensor | None = None  # [B, Hq] certified upper bound on the unread mass (certified only)
    page_lse: torch.Tensor | None = None  # [B, Hq, P] log of each page's unnormalised mass; -inf if not read
    lse: torch.Tensor | None = None       # [B, Hq] log of the total mass read (m + log l after the merge)
