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

Families: Llama, Mistral and Qwen2 (RMSNorm, rotary, GQA, SwiGLU, optional q/k/v biases, sliding
windows). The ops round where transformers' modules do (``kernels/decoder_ops``); the tests compare
the step with the modules' step. ``PolicySession(layers=...)`` chooses it: ``auto`` takes it on CUDA
for a supported family, and ``describe()`` says which ran. Prefill always runs the model's modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import CkvError
from .kernels import backend_for

LAYER_PATHS = ("auto", "fused", "modules")
FAMILIES = ("llama", "mistral", "qwen2")


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
    from .distributed import is_distributed
    if is_distributed():
        return "the model is sharded for tensor parallelism (its modules do the all-reduces)"
    for name, p in model.named_parameters():
        if not p.is_floating_point() or type(p.data) is not torch.Tensor:
            return f"parameter {name} is not a plain float tensor (quantized or sharded weights)"
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
    attn: torch.nn.Module
    mlp: torch.nn.Module
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
        self.layers = [
            _Layer(layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm,
                   self._window(cfg, layer.self_attn))
            for layer in inner.layers]

    @staticmethod
    def _window(cfg, attn) -> int | None:
        if cfg.model_type == "mistral":  # transformers passes config.sliding_window to every Mistral layer
            return getattr(cfg, "sliding_window", None)
        return getattr(attn, "sliding_window", None)  # Qwen2: per layer type; Llama: none

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, slots,
                attend: Callable[[int, torch.Tensor, float, int | None], torch.Tensor]) -> torch.Tensor:
        """input_ids/positions [B, 1] -> next-token logits [B, V] fp32.

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
            a = L.attn
            x = ops.add_rms_norm(residual, delta, L.norm1.weight, L.norm1.variance_epsilon)  # [B, H]
            q = cache.rope_write(i, slots, a.q_proj(x), a.k_proj(x), a.v_proj(x), cos, sin, ops)  # [B, Hq, D]
            out = attend(i, q.to(cache.dtype), a.scaling, L.window)  # [B, Hq, D]
            delta = a.o_proj(out.to(q.dtype).flatten(1))
            x = ops.add_rms_norm(residual, delta, L.norm2.weight, L.norm2.variance_epsilon)
            m = L.mlp
            delta = m.down_proj(ops.silu_mul(m.gate_proj(x), m.up_proj(x)))
        norm = self.inner.norm
        x = ops.add_rms_norm(residual, delta, norm.weight, norm.variance_epsilon)
        return self.model.lm_head(x).float()  # [B, V]


__all__ = ["DecodeLayersError", "FAMILIES", "FusedDecoder", "LAYER_PATHS", "choose_layers", "unsupported_reason"]
