"""The decode runtime: one decode step of a whole model over static buffers, replayed as a CUDA graph.

A :class:`~composable_kv.hf.PolicySession` on a graph-safe policy reserves every page its sequences
can reach at prefill (``PagedKVCache.reserve_ahead``), so the page table ``[B, P]`` is fixed for the
session. A step then needs nothing from the host: inside the step, on the device,

* positions = the lengths before the step; the new token's page and slot come from the page table;
* ``DecodePipeline.plan_tables`` builds the plan (valid / forced pages, splits) from the tables;
* the model runs (every layer's projections, our attention, the MLP, the logits);
* read statistics add up in device buffers, and the lengths advance.

On CUDA the first step runs eagerly (compiles the kernels, warms the allocator) and is then captured
once as a CUDA graph; every later step is one ``graph.replay()``. On the CPU the same step runs
eagerly (``decode_path="device"``): the CPU tests check it against the host-planned path.

Paths (``PolicySession.decode_path``), chosen once when the session is built:
  graph  : the device step replayed from a CUDA graph (CUDA, graph-safe stages);
  device : the same step, eager (CPU, or asked for);
  host   : per step, ``cache.reserve`` + ``pipeline.plan`` on the host, then an eager forward: stages that
           sync with the host (ltri, attention_predictor) run here.
"""
from __future__ import annotations

import dataclasses

import torch

from .errors import CkvError

DECODE_PATHS = ("auto", "graph", "device", "host")


class DecodePathError(CkvError, ValueError):
    """The decode path asked for cannot run this policy on this device."""


def choose_decode_path(requested: str, pipeline, device: torch.device) -> tuple[str, str]:
    """(path, why) for a session; a path that cannot run is refused, never silently replaced."""
    if requested not in DECODE_PATHS:
        raise DecodePathError(f"decode_path: expected one of {list(DECODE_PATHS)}, got {requested!r}")
    host_only = [f"stage {name!r} syncs with the host" for name in pipeline.host_synced_stages]
    if requested in ("graph", "device") and host_only:
        raise DecodePathError(f"decode_path={requested!r} cannot run policy {pipeline.name!r}: "
                              f"{'; '.join(host_only)}; use decode_path='host' (or 'auto')")
    if requested == "graph" and device.type != "cuda":
        raise DecodePathError(f"decode_path='graph' needs a CUDA model, this one is on {device}; "
                              "use 'device' or 'auto'")
    if requested != "auto":
        return requested, "asked for"
    if host_only:
        return "host", "; ".join(host_only)
    if device.type == "cuda":
        return "graph", "graph-safe stages on CUDA"
    return "device", f"no CUDA graphs on {device.type}"


class StaticPlan:
    """Plan buffers of a fixed shape [B, P_max] that a captured graph reads; refilled from host plans.

    For runs whose page tables change every step (the long run's arrivals and departures)."""

    def __init__(self, plan, max_pages: int):
        B, dev = plan.batch_size, plan.page_table.device
        self.plan = dataclasses.replace(
            plan, page_table=torch.zeros(B, max_pages, dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(B, dtype=torch.int32, device=dev),
            num_pages=torch.zeros(B, dtype=torch.int32, device=dev),
            valid=torch.zeros(B, max_pages, dtype=torch.bool, device=dev),
            forced=torch.zeros(B, max_pages, dtype=torch.bool, device=dev))
        self.load(plan)

    def load(self, plan) -> None:
        s, P = self.plan, plan.page_table.shape[1]
        if P > s.page_table.shape[1] or plan.num_splits != s.num_splits or plan.any_forcing != s.any_forcing:
            raise RuntimeError(f"step plan does not fit the static buffers (pages {P} > "
                               f"{s.page_table.shape[1]} or num_splits / forcing changed)")
        for name in ("page_table", "valid", "forced"):
            dst = getattr(s, name)
            dst[:, P:].zero_()
            dst[:, :P].copy_(getattr(plan, name))
        s.seq_lens.copy_(plan.seq_lens)
        s.num_pages.copy_(plan.num_pages)
        s.seq_ids = list(plan.seq_ids)


class DeviceStep:
    """A session's decode step over static buffers; on CUDA captured once and replayed.

    The step calls ``session.forward_decode(input_ids [B, 1], positions [B, 1], slots) -> logits [B, V]``;
    the session's attention writes the new K/V to ``slots`` and runs the pipeline on the plan built here.
    """

    def __init__(self, session, graph: bool):
        cache, seq_ids = session.cache, session.seq_ids
        self.session = session
        self.graph_mode = graph
        self.page_table, lens = cache.padded_page_table(seq_ids)  # [B, P] every page reserved ahead
        self.capacity = self.page_table.shape[1] * cache.page_size
        self.seq_lens = lens.clone()  # [B] int32, lengths before the step; the step advances them
        B, dev = len(seq_ids), cache.device
        self.input_ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.step_pages = torch.zeros(B, dtype=torch.long, device=dev)  # [B] summed over layers, KV heads
        self.step_bytes = torch.zeros(B, dtype=torch.long, device=dev)
        self.num_splits = session.pipeline.plan_tables(cache, self.page_table, lens + 1, seq_ids).num_splits
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [B, V] fp32, rewritten by every replay
        self.steps_run = 0

    def _body(self) -> torch.Tensor:
        s = self.session
        pos = self.seq_lens.long()  # [B]
        self.positions.copy_(pos[:, None])
        new_lens = self.seq_lens + 1
        slots = s.cache.decode_slots(s.seq_ids, self.page_table, pos)
        s.pipeline.plan_tables(s.cache, self.page_table, new_lens, s.seq_ids, self.num_splits)
        self.step_pages.zero_()
        self.step_bytes.zero_()
        logits = s.forward_decode(self.input_ids, self.positions, slots)  # [B, V] fp32
        self.seq_lens.copy_(new_lens)
        return logits

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step for tokens [B] (any device) -> logits [B, V] (a static buffer: copy to keep it)."""
        self.input_ids.copy_(tokens.view(-1, 1), non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        elif not self.graph_mode:
            self.logits = self._body()
        else:
            self.logits = self._warm_then_capture()
        self.steps_run += 1
        return self.logits

    def _warm_then_capture(self) -> torch.Tensor:
        # The first step runs for real on a side stream (kernel compilation, cuBLAS and allocator warm-up),
        # then one capture records the step without running it: the next step replays it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = self._body().clone()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()
        self.logits.copy_(first)
        return self.logits


def window_positions(seq_lens: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `window` positions of each request: (positions clamped at 0 [B, W], real [B, W] bool)."""
    pos = seq_lens.long()[:, None] - window + torch.arange(window, device=seq_lens.device)[None]
    return pos.clamp(min=0), pos >= 0


def window_decode(q, k_pages, v_pages, page_table, seq_lens, window: int, scale: float) -> torch.Tensor:
    """Exact attention of q [B, Hq, D] over each request's last `window` tokens of the paged cache.

    seq_lens [B] counts the new token. Device ops with fixed shapes (CUDA-graph safe). -> [B, Hq, D]."""
    S = k_pages.shape[2]
    pos, real = window_positions(seq_lens, window)  # [B, W]
    page = page_table.long().gather(1, pos // S)  # [B, W]
    k = k_pages[page, :, pos % S].transpose(1, 2)  # [B, Hkv, W, D]
    v = v_pages[page, :, pos % S].transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].to(k.dtype), k, v, attn_mask=real[:, None, None, :], scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])  # [B, Hq, 1, D]
    return out[:, :, 0]


def window_prefill(q, k, v, window: int, scale: float | None, chunk: int = 1024) -> torch.Tensor:
    """Causal attention limited to the last `window` keys (key j seen by query i iff i - window < j <= i).

    q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D]. Query chunks keep memory linear in T."""
    T = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if T <= window:
        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    out = torch.empty_like(q)
    for i0 in range(0, T, chunk):
        i1 = min(T, i0 + chunk)
        j0 = max(0, i0 - window + 1)
        qpos = torch.arange(i0, i1, device=q.device)[:, None]
        kpos = torch.arange(j0, i1, device=q.device)[None]
        mask = (kpos <= qpos) & (kpos > qpos - window)  # [C, C + W]
        out[:, :, i0:i1] = sdpa(q[:, :, i0:i1], k[:, :, j0:i1], v[:, :, j0:i1], attn_mask=mask, scale=scale,
                                enable_gqa=gqa)
    return out
