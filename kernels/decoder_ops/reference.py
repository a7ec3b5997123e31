"""The decoder layer's small ops in pure torch, op for op as transformers' Llama-family modules.

These are the oracle for ``triton.py`` and the CPU path of ``composable_kv.decoder``. Each rounds to the
model dtype exactly where transformers does, so a bf16 model gets the same values as its own modules.
"""
import torch
import torch.nn.functional as F


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """``residual += delta`` in place (skipped when delta is None), then RMSNorm(residual) * weight.

    residual, delta [B, H]; weight [H] -> [B, H] in the dtype ``weight * x`` promotes to."""
    if delta is not None:
        residual.add_(delta)
    x = residual.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(residual.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin``: x [B, H, D], cos/sin [B, 1, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary alone (for a cache that writes K/V itself): q [B, Hq*D], k [B, Hkv*D], cos/sin [B, D]
    -> rotated (q [B, Hq, D], k [B, Hkv, D]) in q's and k's dtypes; the same values as ``rope_write``."""
    B, D = cos.shape
    c, s = cos[:, None], sin[:, None]  # [B, 1, D]
    return _rotate(q.view(B, -1, D), c, s), _rotate(k.view(B, -1, D), c, s)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor, offsets: torch.Tensor,
               key_min: torch.Tensor | None = None, key_max: torch.Tensor | None = None,
               value_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary on q and k, then the new token's K/V into its page slot and the page summaries updated.

    One token per request, each in its own page: q [B, Hq*D], k/v [B, Hkv*D] (the projections' output),
    cos/sin [B, D]; k_pages/v_pages [N, Hkv, S, D]; page_ids/offsets [B] int; key_min/key_max
    [N, Hkv, D], value_norm [N, Hkv] fp32 (each optional). Returns the rotated q [B, Hq, D]."""
    B, D = cos.shape
    Hkv = k_pages.shape[1]
    c, s = cos[:, None], sin[:, None]  # [B, 1, D]
    q_rot = _rotate(q.view(B, -1, D), c, s)  # [B, Hq, D]
    k_rot = _rotate(k.view(B, Hkv, D), c, s).to(k_pages.dtype)  # [B, Hkv, D]
    v = v.view(B, Hkv, D).to(v_pages.dtype)
    pages, offs = page_ids.long(), offsets.long()
    k_pages[pages, :, offs] = k_rot
    v_pages[pages, :, offs] = v
    if key_min is not None:
        key_min[pages] = torch.minimum(key_min[pages], k_rot)
        key_max[pages] = torch.maximum(key_max[pages], k_rot)
    if value_norm is not None:
        value_norm[pages] = torch.maximum(value_norm[pages], v.float().norm(dim=-1))
    return q_rot


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up``: gate/up [B, I] -> [B, I]."""
    return F.silu(gate) * up
