"""Paged decode over an ordered page list, with ART's run-time stop: pure-torch reference.

One function covers dense decode (every page, natural order, no stop) and ART (pages in list order,
stability, certified or calibrated stop checked every `chunk_pages` pages). Split-KV: split s of S reads list
positions s, s+S, s+2S, ... and applies the stop to its own pages; the splits merge by LSE.
See README.md in this folder for the rules and why the certified stop stays valid across splits.
"""
import math

import torch

from .output import DecodeOut

NEG_INF = float("-inf")


def paged_decode(q, k_cache, v_cache, page_table, seq_lens, order, count, *, sm_scale: float,
                 rule=None, tail_lse=None, bound_terms=None, num_splits: int = 1,
                 page_mass: bool = False) -> DecodeOut:
    """q [B, Hq, D]; k_cache/v_cache [num_pages_total, Hkv, S, D]; page_table [B, P] physical ids;
    seq_lens [B]; order [B, Hkv, N] positions into page_table (-1 pad); count [B, Hkv].
    tail_lse [B, Hkv, N] from page_select.strided_tail_lse(..., num_splits) for the certified and calibrated stops;
    bound_terms [B, Hkv, N] from page_select.tail_terms (U_b + log n_b per listed position) for the calibrated one.
    page_mass: also return page_lse [B, Hq, P] (log sum_{t in page} e^{s_t}, -inf for pages not read)
    and lse [B, Hq]; page p's softmax mass is exp(page_lse - lse).
    """
    B, Hq, D = q.shape
    Hkv, page_size = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    dev = q.device
    S = num_splits
    N = order.shape[-1]
    n_per = max(1, math.ceil(N / S))
    kind = rule.kind if rule is not None else None  # rule: the stop-rule fields (composable_kv.stages.StopRule)
    C = rule.chunk_pages if kind else n_per
    if kind in ("certified", "calibrated") and tail_lse is None:
        raise ValueError(f"{kind} stop needs tail_lse (page_select.strided_tail_lse)")
    if kind == "calibrated" and bound_terms is None:
        raise ValueError("calibrated stop needs bound_terms (page_select.tail_terms)")
    calibrate = getattr(rule, "calibrate", "all") if kind == "calibrated" else "all"
    thr = math.log(rule.delta / (1 - rule.delta)) if kind in ("certified", "calibrated") else 0.0

    def split_view(x, fill):  # [B, Hkv, N] -> [B, Hkv, S, n_per]
        x = torch.nn.functional.pad(x, (0, n_per * S - N), value=fill)
        return x.view(B, Hkv, n_per, S).transpose(2, 3)

    slot = torch.arange(N, device=dev)
    pos = torch.where(slot < count[..., None], order.long(), torch.full_like(order.long(), -1))
    pos_s = split_view(pos, -1)  # [B, Hkv, S, n_per]
    tail_s = split_view(tail_lse.float(), NEG_INF) if tail_lse is not None else None
    terms_s = split_view(bound_terms.float(), NEG_INF) if kind == "calibrated" else None

    seq_lens = seq_lens.long()
    num_pages = (seq_lens + page_size - 1) // page_size  # [B]
    qg = q.float().view(B, Hkv, G, D)
    heads = torch.arange(Hkv, device=dev).view(1, Hkv, 1, 1)
    tok = torch.arange(page_size, device=dev)

    m = torch.full((B, Hkv, S, G), NEG_INF, device=dev)
    l = torch.zeros(B, Hkv, S, G, device=dev)
    acc = torch.zeros(B, Hkv, S, G, D, device=dev)
    active = torch.ones(B, Hkv, S, dtype=torch.bool, device=dev)
    pages_read = torch.zeros(B, Hkv, S, dtype=torch.int32, device=dev)
    prev_o = torch.zeros(B, Hkv, S, G, D, device=dev)
    stable_run = torch.zeros(B, Hkv, S, dtype=torch.int32, device=dev)
    seen = torch.zeros(B, Hkv, S, dtype=torch.bool, device=dev)
    rem = torch.full((B, Hkv, S), NEG_INF, device=dev)  # LSE of the unread tail at the stop
    calib = torch.full((B, Hkv, S, G), NEG_INF, device=dev)  # max over read pages of log(mass) - (U + log n)
    P = page_table.shape[1]
    page_lse = torch.full((B, Hkv, G, P + 1), NEG_INF, device=dev) if page_mass else None  # column P: discard

    for c0 in range(0, n_per, C):
        p = pos_s[..., c0:c0 + C]  # [B, Hkv, S, c]
        live = (p >= 0) & active[..., None]
        if not live.any():
            break
        phys = page_table.long().gather(1, p.clamp(min=0).flatten(1)).view_as(p)
        k = k_cache[phys, heads].float()  # [B, Hkv, S, c, page, D]
        v = v_cache[phys, heads].float()
        in_page = torch.where(p == (num_pages - 1).view(B, 1, 1, 1),
                              (seq_lens - (num_pages - 1) * page_size).view(B, 1, 1, 1),
                              torch.full_like(p, page_size))
        tok_ok = live[..., None] & (tok < in_page[..., None])  # [B, Hkv, S, c, page]
        logits = torch.einsum("bhgd,bhscpd->bhsgcp", qg, k) * sm_scale
        logits = logits.masked_fill(~tok_ok[:, :, :, None], NEG_INF)
        chunk_max = logits.amax(dim=(-1, -2))  # [B, Hkv, S, G]
        m_new = torch.maximum(m, chunk_max)
        safe_m = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - safe_m)
        w = torch.exp(logits - safe_m[..., None, None])  # [B, Hkv, S, G, c, page]
        l = l * alpha + w.sum(dim=(-1, -2))
        acc = acc * alpha[..., None] + torch.einsum("bhsgcp,bhscpd->bhsgd", w, v)
        m = m_new
        o = acc / l.clamp(min=1e-30)[..., None]  # [B, Hkv, S, G, D] the running output
        if kind and rule.acc_bf16:  # kept in bf16 between chunks, as a bf16 accumulator would
            o = o.to(torch.bfloat16).float()
            acc = o * l[..., None]
        if page_mass or kind == "calibrated":
            lse_c = torch.logsumexp(logits, dim=-1)  # [B, Hkv, S, G, c] log mass of each page read
        if kind == "calibrated":
            ratio = lse_c - terms_s[..., c0:c0 + C][:, :, :, None]  # [B, Hkv, S, G, c]
            full = tok_ok.sum(-1) == page_size  # [B, Hkv, S, c] only full pages calibrate
            chunk_c = ratio.masked_fill(~full[:, :, :, None], NEG_INF).amax(-1)  # [B, Hkv, S, G]
            if calibrate == "recent":  # the last chunk's slack, where it has a full page
                calib = torch.where(chunk_c > NEG_INF, chunk_c, calib)
            elif calibrate == "all" or c0 == 0:  # once: the first chunk's
                calib = torch.maximum(calib, chunk_c)
        if page_mass:
            dst = torch.where(live, p, torch.full_like(p, P))  # [B, Hkv, S, c]
            dst = dst[:, :, :, None].expand_as(lse_c).transpose(2, 3).flatten(3)  # [B, Hkv, G, S*c]
            page_lse.scatter_(-1, dst, lse_c.transpose(2, 3).flatten(3))
        read_now = live.any(-1)
        pages_read += live.sum(-1).to(torch.int32)
        seen |= read_now

        more = pos_s[..., c0 + C:] >= 0 if c0 + C < n_per else torch.zeros_like(live[..., :1])
        has_more = more.any(-1) & active
        if kind == "stability":
            on, pn = o.norm(dim=-1), prev_o.norm(dim=-1)
            d_mag = (on - pn).abs() / pn.clamp(min=1e-30)
            cos = (o * prev_o).sum(-1) / (on * pn).clamp(min=1e-30)
            stable = ((d_mag <= rule.scale_tol) & (1 - cos <= rule.direction_tol)).all(-1)
            stable = stable & (stable_run >= 0) & (c0 > 0)
            stable_run = torch.where(read_now, torch.where(stable, stable_run + 1, 0), stable_run)
            prev_o = torch.where(read_now[..., None, None], o, prev_o)
            active = active & ~(has_more & (stable_run >= rule.patience))
        elif calibrate == "once":
            if c0 == 0:
                stop_at = once_stop_slot(m, l, calib, tail_s, pos_s, C, thr)  # [B, Hkv, S]
            active = active & ~(has_more & (c0 + C >= stop_at))
        elif kind in ("certified", "calibrated"):
            nxt = tail_s[..., c0 + C] if c0 + C < n_per else torch.full_like(m[..., 0], NEG_INF)
            log_z = m + torch.log(l.clamp(min=1e-30))  # [B, Hkv, S, G]
            # calibrated: c <= 0 for a sound bound; the clamp keeps rounding from making it stop later than certified
            # no full page seen yet (calib -inf): the certificate's estimate (c = 0)
            c = torch.where(calib > NEG_INF, calib.clamp(max=0.0), torch.zeros_like(calib))
            est = nxt[..., None] + c if kind == "calibrated" else nxt[..., None]  # per head
            stop = has_more & (est - log_z <= thr).all(-1)
            rem = torch.where(stop, nxt, rem)
            active = active & ~stop
        active = active & has_more

    res = _merge_splits(m, l, acc, pages_read, rem if kind == "certified" else None, B, Hq, D)
    if page_mass:
        res.page_lse = page_lse[..., :P].reshape(B, Hq, P)
        res.lse = torch.logsumexp(m + torch.log(l), dim=2).reshape(B, Hq)
    return res


def once_stop_slot(m, l, calib, tail_s, pos_s, C: int, thr: float):
    """`calibrate: once`: after the first chunk, each split's stop slot from the bounds alone. With c the first
    chunk's slack (<= 0; 0 without a full page), Z_1 = e^(m + log l) its mass and T_e = tail_s[..., e] (the LSE
    of U_j + log n_j over the split's slots j >= e): the first chunk end e (a multiple of C) with slots left
    where T_e + c - log Z_1 <= thr for every head; else the split's length (no stop). The pages read after the
    first chunk are not counted in Z (a lower estimate of the read mass: counting them at their bound + c, the
    first chunk's best-page slack, overstated them and stopped far too early; benchmarks/art/README.md).
    m, l, calib [B, Hkv, S, G]; tail_s, pos_s [B, Hkv, S, n_per]."""
    n_per = pos_s.shape[-1]
    if n_per <= C:  # one chunk: nothing to stop before
        return torch.full(m.shape[:3], n_per, dtype=torch.long, device=m.device)
    ends = torch.arange(C, n_per, C, device=m.device)  # [K] chunk ends, as slots of the split
    c = torch.where(calib > NEG_INF, calib.clamp(max=0.0), torch.zeros_like(calib))  # [B, Hkv, S, G]
    log_z = m + torch.log(l.clamp(min=1e-30))
    cand = pos_s[..., ends] >= 0  # [B, Hkv, S, K] slots left at e
    t_e = tail_s[..., ends].masked_fill(~cand, NEG_INF)
    est = t_e[:, :, :, None] + (c - log_z)[..., None]  # [B, Hkv, S, G, K]
    stop = cand & (est <= thr).all(-2)
    return torch.where(stop, ends, torch.full_like(ends, n_per)).amin(-1)


def _merge_splits(m, l, acc, pages_read, rem, B, Hq, D) -> DecodeOut:
    """LSE-merge the splits. m, l [B, Hkv, S, G]; acc [B, Hkv, S, G, D]."""
    M = m.amax(dim=2, keepdim=True)
    safe_M = torch.where(torch.isinf(M), torch.zeros_like(M), M)
    scale = torch.exp(m - safe_M)  # [B, Hkv, S, G]
    L = (l * scale).sum(2)  # [B, Hkv, G]
    out = (acc * scale[..., None]).sum(2) / L.clamp(min=1e-30)[..., None]
    tau = None
    if rem is not None:
        log_z = torch.logsumexp(m + torch.log(l.clamp(min=1e-30)), dim=2)  # [B, Hkv, G]
        rem_all = torch.logsumexp(rem, dim=2)  # [B, Hkv]
        tau = torch.sigmoid(rem_all[..., None] - log_z).reshape(B, Hq)
        tau = torch.where(torch.isnan(tau), torch.zeros_like(tau), tau)
    return DecodeOut(out.reshape(B, Hq, D), pages_read.sum(-1).to(torch.int32), tau)
