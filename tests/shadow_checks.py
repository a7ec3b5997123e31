"""Key-shadow checks shared by the interpret (CPU) and gpu test modules."""
import torch

from composable_kv.kernels.key_shadow import reference as shadow_ref
from composable_kv.kernels.key_shadow import triton as shadow_tk
from composable_kv.kernels.page_score import reference as score_ref
from composable_kv.kernels.page_select import reference as select_ref

from helpers import build_cache
from kernel_checks import close


def shadow_cache(lens, *, bits, group, head_dim, dtype=torch.float32, device="cpu", q_scale=1.0, seed=0,
                 num_kv_heads=2):
    name = f"key_shadow_int{bits}"
    cache, ids, _, _ = build_cache(lens, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, seed=seed,
                                   device=device, summaries=(name, "key_minmax"))
    g = torch.Generator().manual_seed(seed + 11)
    q = (torch.randn(len(lens), num_kv_heads * group, head_dim, generator=g) * q_scale).to(dtype).to(device)
    table, seq_lens = cache.padded_page_table(ids)
    return cache, q, table, seq_lens


def _args(cache, bits):
    return cache.shadow_codes[bits][0], cache.shadow_step[bits][0], cache.key_min[0]


def check_shadow_scores(lens, *, bits, group, head_dim, dtype=torch.float32, device="cpu", q_scale=1.0,
                        tol=1e-4):
    """Kernel == reference, and the reference bounds the exact page max from above."""
    cache, q, table, seq_lens = shadow_cache(lens, bits=bits, group=group, head_dim=head_dim, dtype=dtype,
                                             device=device, q_scale=q_scale)
    sm = head_dim ** -0.5
    cpu = [t.cpu() for t in _args(cache, bits)]
    ref = shadow_ref.shadow_scores(q.cpu(), *cpu, table.cpu(), seq_lens.cpu(), sm, bits)
    tri = shadow_tk.shadow_scores(q, *_args(cache, bits), table, seq_lens, sm, bits)
    close(ref, tri, tol * max(1.0, q_scale))
    exact = score_ref.exact_page_max_scores(q.cpu(), cache.k[0].cpu(), table.cpu(), seq_lens.cpu(), sm)
    fin = torch.isfinite(exact)
    slack = 1e-5 * max(1.0, q_scale) * head_dim
    assert bool((ref[fin] >= exact[fin] - slack).all()), (ref - exact)[fin].min()
    return ref, exact


def check_shadow_select(lens, budget, *, bits, group, head_dim, num_splits=1, device="cpu", n_cand=None, seed=0):
    """shadow_select == reference selection over the shadow scores (from a candidate list or all pages)."""
    cache, q, table, seq_lens = shadow_cache(lens, bits=bits, group=group, head_dim=head_dim, device=device,
                                             seed=seed)
    S = cache.page_size
    B, Hkv, P = len(lens), cache.num_kv_heads, table.shape[1]
    sm = head_dim ** -0.5
    num_pages = (seq_lens.cpu() + S - 1) // S
    scores = shadow_ref.shadow_scores(q.cpu(), *[t.cpu() for t in _args(cache, bits)], table.cpu(),
                                      seq_lens.cpu(), sm, bits)
    valid = (torch.arange(P)[None] < num_pages[:, None])  # [B, P]
    forced = valid & ((torch.arange(P)[None] == (num_pages - 1)[:, None]) | (torch.arange(P)[None] == 0))
    cand = valid[:, None].expand(B, Hkv, P)
    cand_order = cand_count = None
    if n_cand is not None:  # a previous selector's list: the n_cand best by a random key, forced included
        g = torch.Generator().manual_seed(seed + 5)
        rnd = torch.rand(B, Hkv, P, generator=g).masked_fill(~cand, float("-inf"))
        cand_order, cand_count = select_ref.select_pages(rnd, forced[:, None].expand(B, Hkv, P), cand, n_cand)
        cand = select_ref.order_to_mask(cand_order, P)
    f3 = forced[:, None].expand(B, Hkv, P)
    o1, c1 = select_ref.select_pages(scores, f3, cand, budget)
    tail1 = select_ref.strided_tail_lse(scores.gather(-1, o1.long().clamp(min=0)),
                                        select_ref.page_token_counts(o1, seq_lens.cpu(), S), c1, num_splits)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    o2, c2, tail2 = shadow_tk.shadow_select(
        q, *_args(cache, bits), table, seq_lens, forced.to(device), dev(cand_order), dev(cand_count), bits=bits,
        num_kv_heads=Hkv, page_size=S, sm_scale=sm, budget_pages=budget, certified=True, num_splits=num_splits,
        max_kept=budget + 2)
    assert torch.equal(c1, c2.cpu()), (c1, c2)
    assert torch.equal(o1, o2.cpu()), (o1, o2)
    live = torch.arange(P)[None, None] < c1[..., None]
    close(tail1[live], tail2.cpu()[live], 1e-4)
