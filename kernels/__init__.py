"""Kernels, one folder per op: `reference.py` (pure torch, fp32 math, the oracle) beside `triton.py`.

A Triton kernel never imports its reference; tests compare the two.
"""
import os

import torch


def backend_for(device: torch.device) -> str:
    """Which implementation runs on `device`: "triton" on CUDA or under TRITON_INTERPRET=1, else "reference"."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"
