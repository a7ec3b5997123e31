"""Key shadow: pure-torch reference (fp32 math). The quantizer is also what the cache runs on append.

A page's shadow holds, per (page, KV head), unsigned `bits`-bit codes of every token's key with the
page's element-wise key minimum as zero point and a per-channel step:
    step_i = up((kmax_i - kmin_i) / (2^bits - 1))  (rounded up to the cache dtype)
    code_{t,i} = round((k_{t,i} - kmin_i) / step_i)  in [0, 2^bits - 1]
    k^_{t,i} = kmin_i + code_{t,i} * step_i,  |k_{t,i} - k^_{t,i}| <= step_i / 2
so q.k_t <= q.k^_t + sum_i |q_i| step_i / 2 for every query q (see README.md).
int8 codes are stored one per byte; int4 codes two per byte (channel 2j in the low nibble).
"""
import torch


def levels(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 8 or 4, got {bits!r}")
    return (1 << bits) - 1


def code_dim(head_dim: int, bits: int) -> int:
    """Bytes of codes per token: D for int8, D/2 for int4."""
    return head_dim if bits == 8 else head_dim // 2


def quantize_pages(k_pages, key_min, key_max, bits: int, step_dtype: torch.dtype):
    """Quantize whole pages against their current min/max.

    k_pages [U, Hkv, S, D] (cache dtype); key_min/key_max [U, Hkv, D] over the written tokens.
    Returns (codes [U, Hkv, S, code_dim] uint8, step [U, Hkv, D] step_dtype). Slots past the written
    tokens get clamped codes; scoring masks them.
    """
    n = levels(bits)
    kmin = key_min.float()
    exact = (key_max.float() - kmin) / n  # [U, Hkv, D]
    step = exact.to(step_dtype)
    low = step.float() < exact  # rounding to the storage dtype went down: take the next value up
    step = torch.where(low, torch.nextafter(step, torch.full_like(step, float("inf"))), step)
    st = step.float()[:, :, None, :]
    safe = torch.where(st > 0, st, torch.ones_like(st))
    codes = ((k_pages.float() - kmin[:, :, None, :]) / safe).round().clamp(0, n)
    codes = torch.where(st > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, step


def unpack_codes(codes, bits: int):
    """[..., code_dim] uint8 -> [..., D] fp32 code values."""
    if bits == 8:
        return codes.float()
    lo, hi = codes & 0xF, codes >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2).float()


def dequantize(codes, step, key_min, bits: int):
    """k^ = kmin + code * step: codes [N, Hkv, S, cd], step/key_min [N, Hkv, D] -> [N, Hkv, S, D] fp32."""
    return key_min.float()[:, :, None, :] + unpack_codes(codes, bits) * step.float()[:, :, None, :]


def shadow_scores(q, codes, step, key_min, page_table, seq_lens, sm_scale: float, bits: int):
    """Sound per-page logit bound from the shadow, max over the page's valid tokens and the GQA group:
    U_p = sm_scale * max_{g, t} (q_g . k^_t + sum_i |q_{g,i}| step_i / 2).

    q [B, Hq, D]; codes [pages, Hkv, S, cd] uint8; step/key_min [pages, Hkv, D]; page_table [B, P];
    seq_lens [B]. Returns [B, Hkv, P] fp32, -inf past a request's pages.
    """
    B, Hq, D = q.shape
    Hkv, S = codes.shape[1], codes.shape[2]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    table = page_table.long().clamp(min=0)
    P = table.shape[1]
    khat = dequantize(codes[table.flatten()], step[table.flatten()], key_min[table.flatten()], bits)
    khat = khat.view(B, P, Hkv, S, D)
    logits = torch.einsum("bhgd,bphsd->bhgps", qg, khat)  # [B, Hkv, G, P, S]
    half = step[table].float().transpose(1, 2) / 2  # [B, Hkv, P, D]
    radius = torch.einsum("bhgd,bhpd->bhgp", qg.abs(), half)  # [B, Hkv, G, P]
    pos = torch.arange(P * S, device=q.device).view(P, S)
    valid = pos[None] < seq_lens.long()[:, None, None]  # [B, P, S]
    logits = (logits + radius[..., None]).masked_fill(~valid[:, None, None], float("-inf"))
    return logits.amax(dim=(2, 4)) * sm_scale  # [B, Hkv, P]
