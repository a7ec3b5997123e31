"""Fused decode layers: the decode step of a Llama-family model in a few kernels a layer.

Through transformers' modules a decode layer is ~50 small kernels (norms in five ops, rotary in eight,
the K/V write and the page summaries in four) around its GEMMs; at B=16 they cost as much as the
attention a sparse policy saves. :class:`FusedDecoder` runs the same layer, reading the model's own
weights (nothing is copied or changed), as

    add+RMSNorm -> q/k/v GEMMs -> rotary + K/V page write + summaries (one kernel) -> attention
    -> o GEMM -> add+RMSNorm -> gate/up GEMMs -> SiLU*up -> down GEMM

The K/V write goes through the session's cache, ``cache.rope_write(layer, slots, q, k, v, cos, sin, ops)
-> rotated q``: a ``PagedKVCache`` runs the one-kernel ``rope_write`` op, an admission stage's cache
(write_gate's gated cache) runs rotary alone and then its own write; ``cache.fused_write`` names which.

Tensor parallel (``composable_kv.tp``, transformers' ``tp_plan="auto"``): each rank holds column shards of
q/k/v and gate/up (its own heads, its own MLP columns) and row shards of o and down. It runs the same ops on
its local heads, writing its own KV heads into its own cache, and all-reduces the o and down outputs (two
all-reduces a layer, on the group the weights are sharded over), so the residual and the RMSNorms are the
same on every rank. The embedding and ``lm_head`` run as the model's modules, with their own collectives.
Unsharded is the same code with no all-reduce.

Families: Llama, Mistral and Qwen2 (RMSNorm, rotary, GQA, SwiGLU, optional q/k/v biases, sliding
windows). The ops round where transformers' modules do (``kernels/decoder_ops``); the tests compare
the step with the modules' step. ``PolicySession(layers=...)`` chooses it: ``auto`` takes it on CUDA
for a supported family, and ``describe()`` says which ran. Prefill always runs the model's modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .distributed import local, shard_group
from .errors import CkvError
from .kernels import backend_for

LAYER_PATHS = ("auto", "fused", "modules")
FAMILIES = ("llama", "mistral", "qwen2")
# a decode layer's projections: short name -> submodule. Tensor parallel: COLUMN ones split their output rows
# (this rank's heads / MLP columns), ROW ones their input columns (partial sums, all-reduced).
COLUMN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj"}
ROW = {"o": "self_attn.o_proj", "down": "mlp.down_proj"}


class DecodeLayersError(CkvError, ValueError):
    """The decode layers asked for cannot run this model."""


def _text_config(model):
    return getattr(model.config, "text_config", None) or model.config


def unsupported_reason(model) -> str | None:
    """Why FusedDecoder cannot run ``model`` (None: it can)."""
    cfg = _text_config(model)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model_type {kind!r} is not one of the fused families {list(FAMILIES)}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} (the fused MLP is SwiGLU with silu)"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} does not have the model.embed_tokens/layers/norm/rotary_emb + lm_head layout"
    for name, p in model.named_parameters():
        if not p.is_floating_point() or type(local(p.data)) is not torch.Tensor:
            return f"parameter {name} is not a plain float tensor (quantized weights)"
    return _sharding_reason(model)


def _placements(t) -> tuple:
    """A parameter's shard placements; () when every rank holds all of it (plain or replicated)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor) or all(p.is_replicate() for p in t.placements):
        return ()
    return tuple(t.placements)


def _sharding_reason(model) -> str | None:
    """Why the model's tensor-parallel sharding is not the one the fused layers run (None: it is, or unsharded)."""
    from torch.distributed.tensor import Shard

    if shard_group(model) is None:
        return None
    own_collectives = {id(p) for m in (model.model.embed_tokens, model.lm_head) for p in m.parameters()}
    want = {f"{mod}.{kind}": (Shard(0),) for mod in COLUMN.values() for kind in ("weight", "bias")}
    want |= {f"{mod}.weight": (Shard(1),) for mod in ROW.values()}
    for name, p in model.named_parameters():
        if id(p) in own_collectives:
            continue  # the embedding and lm_head run as modules, with their own collectives
        key = ".".join(name.split(".")[-3:])  # e.g. self_attn.q_proj.weight
        got, need = _placements(p), want.get(key, ())
        if got != need:
            return (f"parameter {name} is {f'sharded {got}' if got else 'whole on every rank'}, the fused layers need "
                    f"{need or 'it whole'}: q/k/v/gate/up split by output rows and o/down by input "
                    "columns, everything else whole (transformers' tp_plan='auto')")
    return None


def choose_layers(requested: str, model, device: torch.device) -> tuple[str, str]:
    """(path, why): ``fused`` (FusedDecoder) or ``modules`` (transformers' own layers)."""
    if requested not in LAYER_PATHS:
        raise DecodeLayersError(f"layers: expected one of {list(LAYER_PATHS)}, got {requested!r}")
    reason = unsupported_reason(model)
    if requested == "fused":
        if reason is not None:
            raise DecodeLayersError(f"layers='fused' cannot run {type(model).__name__}: {reason}; "
                                    "use layers='modules' (or 'auto')")
        return "fused", "asked for"
    if requested == "modules":
        return "modules", "asked for"
    if reason is not None:
        return "modules", reason
    if device.type != "cuda":
        return "modules", f"fused layers are Triton kernels and this model is on {device.type}"
    return "fused", f"{_text_config(model).model_type} family on CUDA"


def _ops(device: torch.device):
    if backend_for(device) == "triton":
        from .kernels.decoder_ops import triton as ops
    else:
        from .kernels.decoder_ops import reference as ops
    return ops


@dataclass
class _Layer:
    proj: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # COLUMN and ROW names -> this rank's (weight, bias)
    scaling: float
    norm1: torch.nn.Module
    norm2: torch.nn.Module
    window: int | None  # the layer's sliding window in tokens (None: full attention)


class FusedDecoder:
    """One decode step of ``model`` (one token per sequence) with the fused ops; see the module doc."""

    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason is not None:
            raise DecodeLayersError(f"FusedDecoder cannot run {type(model).__name__}: {reason}")
        cfg = _text_config(model)
        inner = model.model
        self.model, self.inner = model, inner
        self.ops = _ops(next(model.parameters()).device)
        self.group = shard_group(model)  # None: unsharded, no all-reduce
        self.layers = [
            _Layer(self._proj(layer), layer.self_attn.scaling, layer.input_layernorm, layer.post_attention_layernorm,
                   self._window(cfg, layer.self_attn))
            for layer in inner.layers]

    @staticmethod
    def _proj(layer) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """COLUMN and ROW names -> this rank's (weight, bias): the model's own tensors (its shards), not copies."""
        mods = {n: layer.get_submodule(path) for n, path in (COLUMN | ROW).items()}
        return {n: (local(m.weight), local(m.bias)) for n, m in mods.items()}

    @staticmethod
    def _window(cfg, attn) -> int | None:
        if cfg.model_type == "mistral":  # transformers passes config.sliding_window to every Mistral layer
            return getattr(cfg, "sliding_window", None)
        return getattr(attn, "sliding_window", None)  # Qwen2: per layer type; Llama: none

    def _row(self, x: torch.Tensor, proj: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """A ROW projection: x [B, in/N] -> [B, H], this rank's partial sum all-reduced over the shard group."""
        w, b = proj
        if self.group is None:
            return F.linear(x, w, b)  # [B, H]: the module's own call, rounding included
        y = F.linear(x, w)  # [B, H]
        torch.distributed.all_reduce(y, group=self.group)
        return y if b is None else y + b  # the bias once, after the sum (as transformers' row-wise layer)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, slots,
                attend: Callable[[int, torch.Tensor, float, int | None], torch.Tensor]) -> torch.Tensor:
        """input_ids/positions [B, 1] -> next-token logits [B, V] fp32 (every rank: all of V).

        Writes each layer's new K/V to ``slots`` through ``cache.rope_write`` (see the module doc);
        ``attend(layer, q [B, Hq, D], scaling, window) -> [B, Hq, D]`` is the session's decode attention."""
        ops = self.ops
        dev = cache.device
        input_ids, positions = input_ids.to(dev), positions.to(dev)  # the host path plans them on the CPU
        residual = self.inner.embed_tokens(input_ids[:, 0])  # [B, H]
        cos, sin = self.inner.rotary_emb(residual[:, None], positions)  # [B, 1, D]
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()
        delta = None
        for i, L in enumerate(self.layers):
            p = L.proj
            x = ops.add_rms_norm(residual, delta, L.norm1.weight, L.norm1.variance_epsilon)  # [B, H]: every rank alike
            q = cache.rope_write(i, slots, F.linear(x, *p["q"]), F.linear(x, *p["k"]), F.linear(x, *p["v"]),
                                 cos, sin, ops)  # [B, Hq/N, D]: this rank's heads
            out = attend(i, q.to(cache.dtype), L.scaling, L.window)  # [B, Hq/N, D]
            delta = self._row(out.to(q.dtype).flatten(1), p["o"])  # [B, H]
            x = ops.add_rms_norm(residual, delta, L.norm2.weight, L.norm2.variance_epsilon)
            delta = self._row(ops.silu_mul(F.linear(x, *p["gate"]), F.linear(x, *p["up"])), p["down"])  # [B, H]
        norm = self.inner.norm
        x = ops.add_rms_norm(residual, delta, norm.weight, norm.variance_epsilon)
        return self.model.lm_head(x).float()  # [B, V]


__all__ = ["DecodeLayersError", "FAMILIES", "FusedDecoder", "LAYER_PATHS", "choose_layers", "unsupported_reason"]
