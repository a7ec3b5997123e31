"""Measured launch settings for paged_decode, per GPU.

`benchmarks/kernel_sweep.py --parts art_decode --tune` times the decode at several BLOCK_PAGES on one GPU
and records the fastest in tuned.json, keyed by the GPU's name and the launch's kind. launch_decode takes
the recorded value when its caller names none; a GPU or kind with no record keeps launch_decode's
built-in rule. BLOCK_PAGES does not change which pages are read or where a stop rule checks (it
divides the check interval), only how many pages one step of the loop loads; nor does where dense + ART
orders its pages (key + "/order": "decode" or "separate", launch_decode's `order_from`).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

TUNED = Path(__file__).with_name("tuned.json")


def key(head_dim_padded: int, elt_bytes: int, page: int, split: bool, ruled: bool) -> str:
    """A launch kind: "dense" is any read without a stop rule (natural order or a page list), "art" one with."""
    return f"D{head_dim_padded}/{elt_bytes}B/page{page}/{'split' if split else 'single'}/{'art' if ruled else 'dense'}"


@lru_cache(maxsize=None)
def _table(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


@lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def value(dev: torch.device, k: str):
    """The recorded value of key k on CUDA device dev, or None."""
    if dev.type != "cuda":
        return None
    return _lookup(dev.index if dev.index is not None else torch.cuda.current_device(), k)


@lru_cache(maxsize=None)
def _lookup(index: int, k: str):
    return _table(str(TUNED)).get(_device_name(index), {}).get(k)


def block_pages(dev: torch.device, k: str) -> int | None:
    """The recorded BLOCK_PAGES for launch kind k on CUDA device dev, or None."""
    v = value(dev, k)
    return int(v) if v else None


def order_in_decode(dev: torch.device, head_dim_padded: int, elt_bytes: int, page: int, split: bool) -> bool:
    """Dense + ART on this GPU orders its pages inside the decode launch (launch_decode's order_from) rather
    than in score_select before it: recorded as key + "/order" = "decode" (else "separate")."""
    return value(dev, key(head_dim_padded, elt_bytes, page, split, True) + "/order") == "decode"


def record(gpu: str, entries: dict[str, int | str], path: Path = TUNED) -> None:
    """Merge {key: value} for GPU `gpu` into the table at path: a launch kind's BLOCK_PAGES, and for ART
    kinds (key + "/order") "decode" or "separate"."""
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(gpu, {}).update(entries)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _table.cache_clear()
    _lookup.cache_clear()
