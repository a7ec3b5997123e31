"""Key min/max page summaries after a batch of K writes, in torch: the semantics the Triton kernel follows."""
import torch


def minmax_write(slot_mapping: torch.Tensor, key: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor,
                 page_size: int, trash_page: int) -> None:
    """slot_mapping [T] (page * page_size + offset; -1: padding, summarised into `trash_page`), key [T, Hkv, D];
    key_min / key_max [pages, Hkv, D], updated in place: a page a token opens (offset 0) restarts from that
    token's keys, every other page takes the min / max with its tokens' keys."""
    slot = slot_mapping.long()  # [T]
    real = slot >= 0
    page = torch.where(real, torch.div(slot, page_size, rounding_mode="floor"), trash_page)  # [T]
    fresh = torch.where(real & (slot - page * page_size == 0), page, trash_page)  # [T]
    key_min.index_fill_(0, fresh, torch.finfo(key_min.dtype).max)
    key_max.index_fill_(0, fresh, torch.finfo(key_max.dtype).min)
    idx = page[:, None, None].expand_as(key)
    k = key.to(key_min.dtype)
    key_min.scatter_reduce_(0, idx, k, "amin")
    key_max.scatter_reduce_(0, idx, k, "amax")
