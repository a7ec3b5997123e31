"""Write-gated KV's decode-time write in pure torch (fp32 gate): the oracle for ``triton.py`` and the CPU path.

One new token per request and KV head ("triple" = (request, KV head) of one layer); see README.md for the
layout and the math. Every op has a fixed shape: a triple with nothing to move writes to the trash slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gate_weights import GateWeights


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrope(k_post: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE key from the post-RoPE one (RoPE is a rotation): k_post [T, H, D], cos/sin [T, D]."""
    cos, sin = cos[:, None].to(k_post.dtype), sin[:, None].to(k_post.dtype)
    return k_post * cos - rotate_half(k_post) * sin


def gate_mlp(x: torch.Tensor, w: GateWeights) -> torch.Tensor:
    """x = concat(k_pre, k_post) [T, H, 2D] fp32 -> g [T, H] = sigmoid(w2 . gelu(W1 (x - mu) / sigma + b1) + b2)."""
    x = (x - w.mu) / w.sigma
    h = F.gelu(torch.einsum("thf,hfk->thk", x, w.w1) + w.b1)
    return torch.sigmoid(torch.einsum("thk,hk->th", h, w.w2) + w.b2)


def gate_values(k_post: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: GateWeights) -> torch.Tensor:
    """The gate of post-RoPE keys k_post [T, H, D] at rotary cos/sin [T, D] fp32 -> g [T, H] fp32."""
    kf = k_post.float()
    return gate_mlp(torch.cat([unrope(kf, cos, sin), kf], dim=-1), w)


@dataclass
class RingStep:
    """One new token for each triple of a layer: the moves and the next state. All [B, H] unless noted."""
    dst: torch.Tensor        # slot the new token takes
    swap: torch.Tensor       # bool: the admitted leaver at slot `s_o` swaps with the token at slot `g0`
    s_o: torch.Tensor        # slot of the token leaving the window (-1: none yet)
    g0: torch.Tensor         # n_global before the step
    finalize: torch.Tensor   # bool: page n_global // S - 1 just became fully global
    kept: torch.Tensor
    n_global: torch.Tensor
    ring_slot: torch.Tensor  # [B, H, W]
    ring_admit: torch.Tensor  # [B, H, W]


def ring_step(kept, n_global, ring_slot, ring_admit, pos, admit_new, page_size: int) -> RingStep:
    """kept, n_global [B, H] int64, ring_slot [B, H, W] int64, ring_admit [B, H, W] bool, pos [B] int64 (the
    new token's position = the request's length before it), admit_new [B, H] bool (its gate decision)."""
    B, H, W = ring_slot.shape
    ri = (pos % W).view(B, 1, 1).expand(B, H, 1)   # ring index of the leaver and of the new token
    full = (pos >= W).view(B, 1)                  # the window holds W tokens: one leaves
    s_o = ring_slot.gather(2, ri)[..., 0]
    admitted = ring_admit.gather(2, ri)[..., 0] & full
    dropped = full & ~admitted
    swap = admitted & (s_o != n_global)
    holder = (ring_slot == n_global[..., None]) & swap[..., None]  # the window token at slot n_global ...
    ring_slot = torch.where(holder, s_o[..., None], ring_slot)      # ... takes the leaver's slot
    dst = torch.where(dropped, s_o, kept)
    ring_slot = ring_slot.scatter(2, ri, dst[..., None])
    ring_admit = ring_admit.scatter(2, ri, admit_new[..., None])
    n_new = n_global + admitted.long()
    return RingStep(dst, swap, s_o, n_global, admitted & (n_new % page_size == 0), kept + (~dropped).long(),
                    n_new, ring_slot, ring_admit)


def gated_write(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, tables: torch.Tensor,
                kept: torch.Tensor, n_global: torch.Tensor, ring_slot: torch.Tensor, ring_admit: torch.Tensor,
                slot_pos: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                key_min: torch.Tensor | None = None, key_max: torch.Tensor | None = None,
                value_norm: torch.Tensor | None = None, *, trash_page: int, threshold: float = 0.0,
                g: torch.Tensor | None = None, gate: GateWeights | None = None, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, k_gate: torch.Tensor | None = None,
                g_out: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's decode write, in place: the gate of the new token, the ring window, the move of the token
    leaving it, the new token's K/V, and the key min/max and value norm of every page written.

    k, v [B, H, D] in the cache dtype; positions [B] int64; rows [B] int64 (the requests' state rows);
    tables [B * H, P] int32 (the triples' page tables, request-major); the layer's state kept, n_global [R, H]
    int64, ring_slot [R, H, W] int64, ring_admit [R, H, W] bool; slot_pos [N * S] int32; k_pages/v_pages
    [N, 1, S, D]; key_min/key_max [N, 1, D], value_norm [N, 1] fp32 (each optional).
    The admission of the new token, one of: `g` [B, H] (admit iff g > threshold); `gate` (the layer's MLP)
    with cos/sin [B, D] fp32 and `k_gate` [B, H, D] (the post-RoPE key the gate reads, default k); neither
    (admit every token). g_out [B, H] fp32 takes the gate's values when `gate` is given.
    -> touched [B, H, 4] int64: the pages written (swap destination, swap source, new token, finalized page;
    `trash_page` where none), for the summaries this op does not keep (key shadows)."""
    B, H, D = k.shape
    S = k_pages.shape[2]
    trash = trash_page * S
    if gate is not None:
        gv = gate_values(k if k_gate is None else k_gate, cos, sin, gate)
        if g_out is not None:
            g_out.copy_(gv)
        admit = gv > threshold
    elif g is not None:
        admit = g > threshold
    else:
        admit = torch.ones(B, H, dtype=torch.bool, device=k.device)
    st = ring_step(kept[rows], n_global[rows], ring_slot[rows], ring_admit[rows], positions, admit, S)
    tables = tables.view(B, H, -1)

    def flat(slot):  # [B, H] triple slots -> pool slots (page * S + offset) int64
        return tables.gather(-1, (slot // S)[..., None]).squeeze(-1).long() * S + slot % S

    kf, vf = k_pages.view(-1, D), v_pages.view(-1, D)
    a, b = flat(st.s_o.clamp(min=0)), flat(st.g0)  # [B, H]; s_o < 0: no leaver
    tr = torch.full_like(a, trash)
    dst = torch.cat([torch.where(st.swap, b, tr), torch.where(st.swap, a, tr), flat(st.dst)]).flatten()
    src = torch.cat([a, b]).flatten()
    k_rows = torch.cat([kf[src], k.reshape(B * H, D)])[:, None]  # [3BH, 1, D]
    v_rows = torch.cat([vf[src], v.reshape(B * H, D)])[:, None]
    pos_rows = torch.cat([slot_pos[src], positions[:, None].expand(B, H).to(torch.int32).flatten()])
    pages, offs = dst // S, dst % S
    k_pages[pages, :, offs] = k_rows
    v_pages[pages, :, offs] = v_rows
    slot_pos[dst] = pos_rows
    if key_min is not None:
        idx = pages[:, None, None].expand_as(k_rows)
        key_min.scatter_reduce_(0, idx, k_rows, "amin")
        key_max.scatter_reduce_(0, idx, k_rows, "amax")
    if value_norm is not None:
        norms = v_rows.float().norm(dim=-1)  # [3BH, 1]
        value_norm.scatter_reduce_(0, pages[:, None].expand_as(norms), norms, "amax")
    # a page that just became fully global: exact summaries from its S tokens
    fin = tables.gather(-1, ((st.n_global // S - 1).clamp(min=0))[..., None]).squeeze(-1).long()
    fin = torch.where(st.finalize, fin, trash_page)  # [B, H]
    if key_min is not None:
        kp = k_pages[fin.flatten()]  # [BH, 1, S, D]
        key_min[fin.flatten()] = kp.amin(2)
        key_max[fin.flatten()] = kp.amax(2)
    if value_norm is not None:
        value_norm[fin.flatten()] = v_pages[fin.flatten()].float().norm(dim=-1).amax(-1)
    kept[rows] = st.kept
    n_global[rows] = st.n_global
    ring_slot[rows] = st.ring_slot
    ring_admit[rows] = st.ring_admit
    return torch.cat([pages.view(3, B, H).permute(1, 2, 0), fin[..., None]], -1)
