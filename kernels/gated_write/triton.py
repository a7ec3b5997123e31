"""Write-gated KV's decode-time write as one Triton kernel a layer; same signature and results as ``reference.py``.

Grid (B, H): one program per (request, KV head) triple. A triple's pages, ring and state belong to it alone,
so programs never touch the same memory (the trash page is never written here). Inside a program every load
comes before any store to the same memory, and the kernel runs one warp, so no barrier is needed.
"""
import torch
import triton
import triton.language as tl

from .. import _interpret_compat  # noqa: F401  (TRITON_INTERPRET with NumPy >= 2.3)
from .gate_weights import GateWeights

GATE_ALL, GATE_GIVEN, GATE_MLP = 0, 1, 2  # admit every token / g > threshold from an input / the MLP in the kernel


def _pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


@triton.jit
def _gate_mlp(kg_ptr, cos_ptr, sin_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, mu_ptr, sig_ptr, h,
              D: tl.constexpr, DP: tl.constexpr, HID: tl.constexpr, HIDP: tl.constexpr):
    """g of one post-RoPE key (kg_ptr: its D values; cos/sin: its position's) with head h's MLP, fp32."""
    d = tl.arange(0, DP)
    md = d < D
    HALF: tl.constexpr = D // 2
    kg = tl.load(kg_ptr + d, mask=md, other=0.0).to(tl.float32)
    lo = d < HALF
    xr = tl.load(kg_ptr + tl.where(lo, d + HALF, d - HALF), mask=md, other=0.0).to(tl.float32)
    rot = tl.where(lo, -xr, xr)  # rotate_half(k) = [-k2, k1]
    c = tl.load(cos_ptr + d, mask=md, other=0.0)
    s = tl.load(sin_ptr + d, mask=md, other=0.0)
    kpre = kg * c - rot * s  # RoPE undone
    F: tl.constexpr = 2 * D
    xa = (kpre - tl.load(mu_ptr + h * F + d, mask=md, other=0.0)) / tl.load(sig_ptr + h * F + d, mask=md, other=1.0)
    xb = (kg - tl.load(mu_ptr + h * F + D + d, mask=md, other=0.0)) / tl.load(sig_ptr + h * F + D + d, mask=md,
                                                                              other=1.0)
    j = tl.arange(0, HIDP)
    mj = j < HID
    w1 = w1_ptr + h * F * HID + d[:, None] * HID + j[None, :]
    mw = md[:, None] & mj[None, :]
    hid = (tl.sum(xa[:, None] * tl.load(w1, mask=mw, other=0.0), axis=0)
           + tl.sum(xb[:, None] * tl.load(w1 + D * HID, mask=mw, other=0.0), axis=0)
           + tl.load(b1_ptr + h * HID + j, mask=mj, other=0.0))
    act = 0.5 * hid * (1.0 + tl.math.erf(hid * 0.7071067811865476))  # exact GELU
    logit = tl.sum(act * tl.load(w2_ptr + h * HID + j, mask=mj, other=0.0), axis=0) + tl.load(b2_ptr + h)
    return 1.0 / (1.0 + tl.exp(-logit))


@triton.jit
def _gated_write_kernel(k_ptr, v_ptr, kg_ptr, pos_ptr, rows_ptr, tab_ptr,
                        kept_ptr, ng_ptr, rslot_ptr, radmit_ptr, slotpos_ptr,
                        kc_ptr, vc_ptr, kmin_ptr, kmax_ptr, vn_ptr,
                        g_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, mu_ptr, sig_ptr, cos_ptr, sin_ptr, gout_ptr,
                        touched_ptr,
                        stride_kb, stride_kh, stride_vb, stride_vh, stride_gkb, stride_gkh, stride_gb, stride_cb,
                        stride_tab, threshold, trash_page, W,
                        H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, S: tl.constexpr, SB: tl.constexpr,
                        HID: tl.constexpr, HIDP: tl.constexpr, WBLOCK: tl.constexpr, GATE: tl.constexpr,
                        HAS_MINMAX: tl.constexpr, HAS_VNORM: tl.constexpr, WRITE_G: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, DP)
    md = d < D
    CT: tl.constexpr = kc_ptr.dtype.element_ty

    # -- the new token's admission (read when it leaves the window)
    if GATE == 2:
        gval = _gate_mlp(kg_ptr + b * stride_gkb + h * stride_gkh, cos_ptr + b * stride_cb, sin_ptr + b * stride_cb,
                         w1_ptr, b1_ptr, w2_ptr, b2_ptr, mu_ptr, sig_ptr, h, D, DP, HID, HIDP)
        adm_new = gval > threshold
        if WRITE_G:
            tl.store(gout_ptr + b * H + h, gval)
    elif GATE == 1:
        adm_new = tl.load(g_ptr + b * stride_gb + h).to(tl.float32) > threshold
    else:
        adm_new = tl.load(pos_ptr + b) >= 0  # always true

    # -- the ring step (reference.ring_step)
    row = tl.load(rows_ptr + b)
    p = tl.load(pos_ptr + b).to(tl.int64)
    st = row * H + h
    kept = tl.load(kept_ptr + st)
    g0 = tl.load(ng_ptr + st)
    ring = st * W
    ri = p % W
    full = p >= W
    s_o = tl.load(rslot_ptr + ring + ri)  # the leaver's slot (-1: the window was never full)
    admitted = (tl.load(radmit_ptr + ring + ri) != 0) & full
    dropped = full & (admitted == 0)
    swap = admitted & (s_o != g0)  # the leaver swaps places with the window token at slot g0
    dst = tl.where(dropped, s_o, kept)
    n_new = g0 + admitted.to(tl.int64)
    fin = admitted & (n_new % S == 0)  # page g0 // S is now fully global: exact summaries

    # -- the writes, one row each: 0 the leaver to slot g0, 1 the token there to the leaver's slot (both only
    # on a swap), 2 the new token to dst; 3 writes no slot (its page: the finalized one, page of g0)
    tb = tab_ptr + (b * H + h) * stride_tab
    so = tl.maximum(s_o, 0)
    slot_a = tl.load(tb + so // S).to(tl.int64) * S + so % S    # pool slot of the leaver
    slot_b = tl.load(tb + g0 // S).to(tl.int64) * S + g0 % S    # pool slot of triple slot g0
    slot_n = tl.load(tb + dst // S).to(tl.int64) * S + dst % S
    i = tl.arange(0, 4)
    dst_slot = tl.where(i == 0, slot_b, tl.where(i == 1, slot_a, slot_n))  # [4]; row 3: slot_b's page only
    src_slot = tl.where(i == 0, slot_a, slot_b)                              # rows 0, 1
    moved = tl.where(i < 2, swap, False)
    writes = moved | (i == 2)
    page = tl.where(i == 3, slot_b, dst_slot) // S
    put = writes | tl.where(fin, i == 3, False)  # rows whose page's summaries are stored
    # every load before any store: sources, new token, the finalized page, summaries
    rowm = moved[:, None] & md[None, :]
    new = (i == 2)[:, None]
    kn = tl.load(k_ptr + b * stride_kb + h * stride_kh + d, mask=md, other=0.0).to(CT)  # the new token
    vn = tl.load(v_ptr + b * stride_vb + h * stride_vh + d, mask=md, other=0.0).to(CT)
    kr = tl.where(new, kn[None, :], tl.load(kc_ptr + src_slot[:, None] * D + d[None, :], mask=rowm, other=0.0))
    vr = tl.where(new, vn[None, :], tl.load(vc_ptr + src_slot[:, None] * D + d[None, :], mask=rowm, other=0.0))
    pr = tl.where(i == 2, p.to(tl.int32), tl.load(slotpos_ptr + src_slot, mask=moved, other=0))

    if HAS_MINMAX or HAS_VNORM:
        # same[r, j]: write j lands in row r's page; each row's page takes min/max over those writes
        same = (page[:, None] == page[None, :]) & writes[None, :]
        on_fin = tl.where(fin, page == slot_b // S, False)  # rows whose page was just finalized
        # the finalized page after the writes: its S tokens with the written slots replaced, exact min/max
        ex_min = tl.full([DP], float("inf"), tl.float32)
        ex_max = tl.full([DP], float("-inf"), tl.float32)
        ex_vn = tl.full([], 0.0, tl.float32)
        if fin:
            for r0 in tl.static_range(0, S, SB):
                slot = (slot_b // S) * S + r0 + tl.arange(0, SB)  # [SB]
                # read each slot where its token comes from: a swapped slot from the other swap slot
                src = tl.where(tl.where(swap, slot == slot_b, False), slot_a,
                               tl.where(tl.where(swap, slot == slot_a, False), slot_b, slot))
                is_new = (slot == slot_n)[:, None]  # never on a finalized page (dst >= n_global); kept general
                mt = (slot[:, None] >= 0) & md[None, :]
                if HAS_MINMAX:
                    kt = tl.load(kc_ptr + src[:, None] * D + d[None, :], mask=mt, other=0.0)
                    kt = tl.where(is_new, kn[None, :], kt).to(tl.float32)
                    ex_min = tl.minimum(ex_min, tl.min(kt, axis=0))
                    ex_max = tl.maximum(ex_max, tl.max(kt, axis=0))
                if HAS_VNORM:
                    vt = tl.load(vc_ptr + src[:, None] * D + d[None, :], mask=mt, other=0.0)
                    vt = tl.where(is_new, vn[None, :], vt).to(tl.float32)
                    ex_vn = tl.maximum(ex_vn, tl.max(tl.sqrt(tl.sum(vt * vt, axis=1)), axis=0))
        sm = put[:, None] & md[None, :]
        if HAS_MINMAX:
            kf = kr.to(tl.float32)[None, :, :]  # [1, 4, DP]
            sp = page[:, None] * D + d[None, :]
            lo = tl.minimum(tl.load(kmin_ptr + sp, mask=sm, other=0.0).to(tl.float32),
                            tl.min(tl.where(same[:, :, None], kf, float("inf")), axis=1))
            hi = tl.maximum(tl.load(kmax_ptr + sp, mask=sm, other=0.0).to(tl.float32),
                            tl.max(tl.where(same[:, :, None], kf, float("-inf")), axis=1))
            lo = tl.where(on_fin[:, None], ex_min[None, :], lo)
            hi = tl.where(on_fin[:, None], ex_max[None, :], hi)
        if HAS_VNORM:
            vf = vr.to(tl.float32)
            norms = tl.sqrt(tl.sum(vf * vf, axis=1))  # [4]
            vnorm = tl.maximum(tl.load(vn_ptr + page, mask=put, other=0.0),
                               tl.max(tl.where(same, norms[None, :], 0.0), axis=1))
            vnorm = tl.where(on_fin, ex_vn, vnorm)

    # the window token at slot g0 takes the leaver's slot in the ring (found by its slot: the ring is small)
    if swap:
        for c in range(0, W, WBLOCK):
            idx = c + tl.arange(0, WBLOCK)
            held = tl.load(rslot_ptr + ring + idx, mask=idx < W, other=-1)
            tl.store(rslot_ptr + ring + idx, tl.zeros([WBLOCK], tl.int64) + s_o, mask=(idx < W) & (held == g0))

    # -- stores: K/V and positions of the written slots, summaries of their pages, the state
    wm = writes[:, None] & md[None, :]
    tl.store(kc_ptr + dst_slot[:, None] * D + d[None, :], kr, mask=wm)
    tl.store(vc_ptr + dst_slot[:, None] * D + d[None, :], vr, mask=wm)
    tl.store(slotpos_ptr + dst_slot, pr, mask=writes)
    if HAS_MINMAX:
        tl.store(kmin_ptr + sp, lo.to(CT), mask=sm)
        tl.store(kmax_ptr + sp, hi.to(CT), mask=sm)
    if HAS_VNORM:
        tl.store(vn_ptr + page, vnorm, mask=put)
    tl.store(kept_ptr + st, kept + (dropped == 0).to(tl.int64))
    tl.store(ng_ptr + st, n_new)
    tl.store(rslot_ptr + ring + ri, dst)
    tl.store(radmit_ptr + ring + ri, adm_new)
    tl.store(touched_ptr + (b * H + h) * 4 + i, tl.where(put, page, trash_page))


def gated_write(k, v, positions, rows, tables, kept, n_global, ring_slot, ring_admit, slot_pos, k_pages, v_pages,
                key_min=None, key_max=None, value_norm=None, *, trash_page: int, threshold: float = 0.0, g=None,
                gate: GateWeights | None = None, cos=None, sin=None, k_gate=None, g_out=None) -> torch.Tensor:
    B, H, D = k.shape
    S, W = k_pages.shape[2], ring_slot.shape[-1]
    for name, t in (("kept", kept), ("n_global", n_global), ("ring_slot", ring_slot), ("ring_admit", ring_admit),
                    ("slot_pos", slot_pos), ("k_pages", k_pages), ("v_pages", v_pages), ("key_min", key_min),
                    ("key_max", key_max), ("value_norm", value_norm)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"gated_write: {name} must be contiguous (the cache's state), got strides {t.stride()}")
    if k.stride(2) != 1 or v.stride(2) != 1 or tables.stride(1) != 1:
        raise ValueError("gated_write: k, v and tables need contiguous last dims")
    positions, rows = positions.contiguous(), rows.contiguous()  # read at +b: no-ops for the cache's tensors
    g = None if g is None else g.contiguous()
    touched = torch.empty(B, H, 4, dtype=torch.int64, device=k.device)
    mode = GATE_MLP if gate is not None else GATE_GIVEN if g is not None else GATE_ALL
    kg = k if k_gate is None else k_gate
    hid = 1
    if mode == GATE_MLP:
        gate = GateWeights(*(t.contiguous() for t in gate))
        hid = gate.w1.shape[-1]
        if kg.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(0) != cos.stride(0):
            raise ValueError("gated_write: k_gate, cos and sin need contiguous last dims (cos and sin alike)")
    minmax, vnorm = key_min is not None, value_norm is not None
    w = gate if mode == GATE_MLP else (k,) * 6
    _gated_write_kernel[(B, H)](
        k, v, kg, positions, rows, tables, kept, n_global, ring_slot, ring_admit, slot_pos, k_pages, v_pages,
        key_min if minmax else k_pages, key_max if minmax else k_pages, value_norm if vnorm else k_pages,
        g if mode == GATE_GIVEN else k, *w, cos if mode == GATE_MLP else k, sin if mode == GATE_MLP else k,
        g_out if g_out is not None else k, touched,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), kg.stride(0), kg.stride(1),
        g.stride(0) if mode == GATE_GIVEN else 0, cos.stride(0) if mode == GATE_MLP else 0, tables.stride(0),
        float(threshold), int(trash_page), W,
        H=H, D=D, DP=_pow2(D), S=S, SB=min(S, 16), HID=hid, HIDP=_pow2(hid), WBLOCK=min(_pow2(W), 512),
        GATE=mode, HAS_MINMAX=minmax, HAS_VNORM=vnorm, WRITE_G=mode == GATE_MLP and g_out is not None, num_warps=1)
    return touched
