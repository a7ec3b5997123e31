"""The decode kernels' page-mass side output against the reference (shared by interpret and gpu tests)."""
import torch

from composable_kv.kernels.paged_decode import reference as decode_ref
from composable_kv.kernels.paged_decode import triton as decode_tk

from kernel_checks import RULES, decode_inputs, make


def normalised(res):
    return (res.page_lse - res.lse[..., None]).exp()  # [B, Hq, P]


def check_page_mass(lens, group, head_dim, rule_name, num_splits, budget=None, *, device="cpu",
                    dtype=torch.float32, q_scale=1.0, seed=0, tol=2e-5):
    cache, q, table, seq_lens, order, count, tail, sm = decode_inputs(
        lens, group, head_dim, budget, device=device, dtype=dtype, q_scale=q_scale, seed=seed,
        num_splits=num_splits)
    rule = RULES[rule_name]
    r1 = decode_ref.paged_decode(q.cpu(), cache.k[0].cpu(), cache.v[0].cpu(), table.cpu(), seq_lens.cpu(), order,
                                 count, sm_scale=sm, rule=rule, tail_lse=tail, num_splits=num_splits,
                                 page_mass=True)
    r2 = decode_tk.paged_decode(q, cache.k[0], cache.v[0], table, seq_lens, order.to(device), count.to(device),
                                sm_scale=sm, rule=rule, tail_lse=tail.to(device), num_splits=num_splits,
                                page_mass=True)
    B, Hq = q.shape[:2]
    P = table.shape[1]
    assert r2.page_lse.shape == (B, Hq, P) and r2.lse.shape == (B, Hq)
    m1, m2 = normalised(r1), normalised(r2).cpu()
    assert not torch.isnan(m2).any()
    if torch.equal(r1.pages_read, r2.pages_read.cpu()):
        torch.testing.assert_close(m2, m1, rtol=tol, atol=tol)
        torch.testing.assert_close(r2.lse.cpu(), r1.lse, rtol=tol, atol=tol * max(1.0, q_scale))
    # the masses of the pages read sum to 1 per query head; pages not listed (or not read) are 0
    torch.testing.assert_close(m2.sum(-1), torch.ones(B, Hq), rtol=1e-4, atol=1e-4)
    listed = torch.zeros(B, cache.num_kv_heads, P + 1, dtype=torch.bool)
    idx = torch.where(torch.arange(order.shape[-1]) < count[..., None], order.long(), P)
    listed.scatter_(-1, idx.clamp(min=0), True)
    listed = listed[..., :P].repeat_interleave(group, dim=1)  # [B, Hq, P]
    assert (m2[~listed] == 0).all()
    return r1, r2


def check_dense_page_mass(lens, group, head_dim, num_splits, *, device="cpu", seed=0, tol=2e-5):
    """Natural-order (dense) decode: the side output equals softmax(q.k) summed per page."""
    cache, q, table, seq_lens = make(lens, group=group, head_dim=head_dim, device=device, seed=seed)
    sm = head_dim ** -0.5
    B, Hq = q.shape[:2]
    P = table.shape[1]
    mass = (torch.full((B, Hq, P), float("-inf"), device=device), torch.empty(B, Hq, device=device))
    decode_tk.launch_decode(q, cache.k[0], cache.v[0], table, seq_lens, None, None, sm_scale=sm, rule=None,
                            num_splits=num_splits, natural=True, page_mass=mass)
    got = (mass[0] - mass[1][..., None]).exp().cpu()
    S, Hkv = cache.page_size, cache.num_kv_heads
    for b, n in enumerate(lens):
        k = cache.k[0][table[b].long()].cpu().transpose(1, 2).reshape(P * S, Hkv, head_dim)[:n]  # [n, Hkv, D]
        k = k.float().repeat_interleave(group, dim=1)
        w = (torch.einsum("hd,thd->ht", q[b].float().cpu(), k) * sm).softmax(-1)  # [Hq, n]
        want = torch.nn.functional.pad(w, (0, P * S - n)).view(Hq, P, S).sum(-1)
        torch.testing.assert_close(got[b], want, rtol=tol, atol=tol)
