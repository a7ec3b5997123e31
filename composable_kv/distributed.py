"""Ranks and sharded shapes: what the decode code needs to know about tensor parallelism.

A small module of its own, so that ``hf`` and ``decoder`` need not import ``tp`` (which imports them).
"""
from __future__ import annotations

import dataclasses

import torch

from .errors import CkvError


class TensorParallelError(CkvError, ValueError):
    """The model cannot be sharded the way composable_kv.tp needs (heads must split evenly)."""


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a sharded (DTensor) parameter, as a plain tensor on the same storage; others as is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_group(model):
    """The process group ``model``'s weights are sharded over (transformers' ``tp_plan``), None if unsharded."""
    from torch.distributed.tensor import DTensor

    sharded = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    if sharded is None:
        return None
    mesh = sharded.device_mesh
    if mesh.ndim != 1:
        raise TensorParallelError(f"the model is sharded over a {mesh.ndim}-D device mesh; "
                                  "composable_kv runs tensor parallelism over one dimension (tp_plan='auto')")
    return mesh.get_group()


def _local_rows(weight) -> int:
    return local(weight).shape[0]


def rank_local_shape(model, shape):
    """``shape`` (a :class:`~composable_kv.hf.ModelShape`) with this rank's query/KV head counts.

    Read from the local shard of the first attention layer's ``q_proj``/``k_proj`` weight, so it
    follows whatever plan sharded the model; an unsharded model keeps ``shape`` as is.
    """
    attn = next((m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")), None)
    if attn is None or not is_distributed():
        return shape
    q_rows, k_rows = _local_rows(attn.q_proj.weight), _local_rows(attn.k_proj.weight)
    d = shape.head_dim
    if q_rows % d or k_rows % d:
        raise TensorParallelError(
            f"this rank holds {q_rows} q_proj / {k_rows} k_proj output rows, not a whole number of "
            f"heads of {d}: the heads must split evenly over the {world_size()} ranks.")
    return dataclasses.replace(shape, num_q_heads=q_rows // d, num_kv_heads=k_rows // d)
