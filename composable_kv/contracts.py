"""Tensor contracts at the public boundary (pipeline.run / plan, cache.append / write, hf.generate).

Two kinds of checks:
  * structure (type, dtype, device, shape, head counts, ints): host metadata only, always on, no sync;
  * values (NaN / Inf): reading values needs a device->host sync, which stalls the stream and cannot be
    captured in a CUDA graph. They run where that costs nothing: tensors on the CPU and the reference
    backend. On CUDA they are opt-in: `PagedKVCache(..., validate=True)`, `ckv.compile(..., validate=True)`,
    or CKV_VALIDATE=1 in the environment (CKV_VALIDATE=0 turns them off everywhere).
Every refusal is a TensorContractError naming the argument, what was expected and what was found.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from .errors import TensorContractError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def value_checks_on(explicit: bool | None, device: torch.device, reference: bool = False) -> bool:
    """Whether NaN/Inf checks run: the explicit flag, else CKV_VALIDATE, else only where no sync is paid."""
    if explicit is not None:
        return bool(explicit)
    env = os.environ.get("CKV_VALIDATE")
    if env in ("0", "1"):
        return env == "1"
    return reference or torch.device(device).type == "cpu"


def check_int(where: str, name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TensorContractError(f"{where}: {name} expected an int, got {value!r} ({type(value).__name__})")
    if (lo is not None and value < lo) or (hi is not None and value >= hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'})"
        raise TensorContractError(f"{where}: {name} expected an int in {rng}, got {value}")
    return int(value)


def check_tensor(where: str, name: str, t, *, shape=None, dims: str = "", dtypes=FLOAT_DTYPES,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
    """`shape`: a tuple of ints or None (any), with `dims` naming each axis, e.g. "B, Hq, D"."""
    if not isinstance(t, torch.Tensor):
        raise TensorContractError(f"{where}: {name} expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        names = [d.strip() for d in dims.split(",")] if dims else [f"dim{i}" for i in range(len(shape))]
        want = "[" + ", ".join(n if s is None else f"{n}={s}" for n, s in zip(names, shape)) + "]"
        if t.dim() != len(shape) or any(s is not None and s != got for s, got in zip(shape, t.shape)):
            raise TensorContractError(f"{where}: {name} expected shape {want}, got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TensorContractError(f"{where}: {name} dtype is {t.dtype}, expected {dtype}; cast with .to({dtype})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TensorContractError(f"{where}: {name} dtype is {t.dtype}, expected one of "
                                  f"{[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise TensorContractError(f"{where}: {name} is on {t.device}, expected {device} (the cache's device)")


def check_finite(where: str, name: str, t: torch.Tensor, dims: str = "") -> None:
    """Refuse NaN / Inf, naming how many and the first position (syncs with the device)."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    first = [int(i) for i in bad.nonzero()[0].tolist()]
    kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
    at = ", ".join(f"{n.strip()}={i}" for n, i in zip(dims.split(","), first)) if dims else str(first)
    raise TensorContractError(f"{where}: {name} holds {int(bad.sum())} non-finite values ({kind} first at "
                              f"[{at}]); expected finite values")


def check_sm_scale(where: str, sm_scale) -> float:
    """A finite real > 0 (a negative scale would flip the page bounds that selection and the certified
    stop rely on)."""
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real) or not math.isfinite(sm_scale) \
            or sm_scale <= 0:
        raise TensorContractError(f"{where}: sm_scale expected a finite float > 0 (usually head_dim ** -0.5), "
                                  f"got {sm_scale!r}")
    return float(sm_scale)


def check_seq_ids(where: str, seq_ids, live) -> list[int]:
    if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
        raise TensorContractError(f"{where}: seq_ids expected a list of sequence ids, got {type(seq_ids).__name__}")
    ids = list(seq_ids)
    if not ids:
        raise TensorContractError(f"{where}: seq_ids is empty; expected at least one sequence")
    for i, s in enumerate(ids):
        check_int(where, f"seq_ids[{i}]", s)
        if s not in live:
            raise TensorContractError(f"{where}: seq_ids[{i}] = {s} is not in the cache (live: {sorted(live)[:16]})")
    return ids


def check_token_ids(where: str, token_lists, vocab_size: int | None) -> None:
    """Prompts as lists of ints in [0, vocab_size)."""
    for b, ids in enumerate(token_lists):
        for i, t in enumerate(ids):
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                raise TensorContractError(f"{where}: prompts[{b}][{i}] = {t} is outside the vocabulary "
                                          f"[0, {vocab_size})")
