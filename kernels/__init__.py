"""Kernels, one folder per op: `reference.py` (pure torch, fp32 math, the oracle) beside `triton.py`.

A Triton kernel never imports its reference; tests compare the two.
"""
