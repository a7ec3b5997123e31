"""k-means representative keys in torch (the oracle; see README.md): of contiguous spans of keys, and of the
decode window ltri closes as a span (`window_reps`; triton.close_windows does the whole close in the table)."""
import torch


def kmeans_reps(keys: torch.Tensor, token_span: torch.Tensor, first: torch.Tensor, size: torch.Tensor, R: int,
                iters: int = 2) -> torch.Tensor:
    """R k-means centroids per span and head (init: evenly spaced tokens; `iters` Lloyd steps, Euclidean).

    keys [H, N, D]; token_span [N] the span of each token (-1: none); span s's tokens are the
    contiguous keys[:, first[s] : first[s] + size[s]]. -> [H, NS, R, D] fp32 (NS = len(first))."""
    H, N, D = keys.shape
    NS = first.shape[0]
    dev = keys.device
    keys = keys.float()
    init = ((torch.arange(R, device=dev)[None, :] + 0.5) * size[:, None] / R).long()  # [NS, R]
    cent = keys[:, (first[:, None] + init).clamp(0, max(N - 1, 0))]  # [H, NS, R, D]
    real = token_span >= 0
    span = token_span.clamp(min=0)  # [N]
    for _ in range(iters):
        norms = (cent * cent).sum(-1)  # [H, NS, R]
        dist = norms[:, span] - 2 * torch.einsum("hnd,hnrd->hnr", keys, cent[:, span])  # [H, N, R]
        slot = span * R + dist.argmin(-1)  # [H, N]
        ones = real.to(keys.dtype).expand(H, N)
        count = keys.new_zeros(H, NS * R).scatter_add_(1, slot, ones)  # [H, NS*R]
        total = keys.new_zeros(H, NS * R, D).scatter_add_(1, slot[..., None].expand(H, N, D), keys * ones[..., None])
        mean = (total / count.clamp(min=1)[..., None]).view(H, NS, R, D)
        cent = torch.where(count.view(H, NS, R, 1) > 0, mean, cent)
    return cent


def window_reps(rows, page_table, seq_lens, k_pages, covered, window_pages: int, page_size: int, R: int):
    """The decode window of each request: its `window_pages` pages from `covered[rows[b]]` on, and whether it is
    full (`closing`: seq_lens[b] // page_size >= covered + window_pages). -> (reps [B, Hkv, R, D] fp32: R
    k-means centroids of the window's keys per KV head, computed for every request; closing [B] bool).

    rows [B] (table rows); page_table [B, P] int32; seq_lens [B]; k_pages [pages, Hkv, S, D]; covered [N]."""
    W, S = window_pages, page_size
    B, P = page_table.shape
    Hkv, D = k_pages.shape[1], k_pages.shape[3]
    dev = rows.device
    cov = covered[rows]  # [B]
    closing = seq_lens.long() // S >= cov + W  # [B]
    pages = (cov[:, None] + torch.arange(W, device=dev)).clamp(max=P - 1)  # [B, W]
    keys = k_pages[page_table.long().gather(1, pages)]  # [B, W, Hkv, S, D]
    keys = keys.permute(2, 0, 1, 3, 4).reshape(Hkv, B * W * S, D)
    n = W * S
    token_span = torch.arange(B, device=dev)[:, None].expand(B, n).reshape(-1)  # [B*n]
    reps = kmeans_reps(keys, token_span, torch.arange(B, device=dev) * n, torch.full((B,), n, device=dev), R)
    return reps.transpose(0, 1), closing
