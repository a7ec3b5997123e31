"""Shared builders for tests: a filled paged cache, a plain dense attention oracle, tiny models, and the
guards a decode step is checked under."""
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

import composable_kv as ckv


def build_cache(lens, *, num_layers=1, num_kv_heads=2, head_dim=16, page_size=16, extra_pages=4,
                summaries=("key_minmax", "value_norm"), dtype=torch.float32, seed=0, k_scale=1.0,
                device="cpu"):
    """A cache holding one sequence per entry of `lens`; returns (cache, seq_ids, keys, values)
    where keys[i] / values[i] are [num_layers, len, Hkv, D] as appended."""
    g = torch.Generator().manual_seed(seed)
    pages = sum(-(-n // page_size) for n in lens) + extra_pages
    cache = ckv.PagedKVCache(num_layers, num_kv_heads, head_dim, pages, page_size=page_size, dtype=dtype,
                             device=device, summaries=frozenset(summaries))
    ids, keys, values = [], [], []
    for n in lens:
        sid = cache.add_sequence()
        k = (torch.randn(num_layers, n, num_kv_heads, head_dim, generator=g) * k_scale).to(dtype)
        v = torch.randn(num_layers, n, num_kv_heads, head_dim, generator=g).to(dtype)
        cache.append([sid], [n], k.to(device), v.to(device))
        ids.append(sid)
        keys.append(k)
        values.append(v)
    return cache, ids, keys, values


def dense_attention(q, keys, values, layer=0, sm_scale=None):
    """Plain softmax attention per request, GQA by repeat: q [B, Hq, D] -> [B, Hq, D] fp32."""
    B, Hq, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    outs = []
    for b in range(B):
        k, v = keys[b][layer].float(), values[b][layer].float()  # [T, Hkv, D]
        G = Hq // k.shape[1]
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        logits = torch.einsum("hd,thd->ht", q[b].float(), k) * sm_scale
        outs.append(torch.einsum("ht,thd->hd", logits.softmax(-1), v))
    return torch.stack(outs)


def tiny_llama(max_positions: int = 256, seed: int = 0):
    """A tiny random Llama (3 layers, 4 q / 2 KV heads of 16, vocab 96) for HF-path tests; no download."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=max_positions, initializer_range=0.2, eos_token_id=None,
                      bos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def assert_replays_without_sync(session, prompts, steps: int = 8):
    """Prefill, one eager step (then the step is captured), `steps` replays under CUDA's sync check
    (any device-to-host sync raises); every step read something. Closes the session."""
    logits = session.prefill(prompts)
    logits = session.decode(logits.argmax(-1))
    assert session.graph_captured
    active = torch.ones(len(prompts), dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            logits = session.decode(logits.argmax(-1), active=active)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(session.steps) == steps + 1 and all(st.kv_bytes_read[0] > 0 for st in session.steps)
    session.close()


class no_host_sync(TorchFunctionMode):
    """Inside `with no_host_sync():` a tensor read that syncs with the host (item, tolist, bool, nonzero, a
    boolean-mask index: what a CUDA graph cannot capture and what stalls the stream) raises. Reads made by the
    Triton interpreter, which stands in for the GPU on the CPU, are allowed. A torch function mode: nothing
    on torch.Tensor is patched, so nothing leaks into later tests."""

    SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu",
             "masked_select", "unique", "argwhere"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS and not _in_triton_interpreter():
            raise AssertionError(f"host sync in decode: Tensor.{name}")
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            keys = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys) \
                    and not _in_triton_interpreter():
                raise AssertionError(f"host sync in decode: {name} with a bool mask")
        return func(*args, **(kwargs or {}))


def stage_state_tensors(cache) -> list[torch.Tensor]:
    """Every tensor held by the stages' run-time states on `cache` (history rings, clocks, span indices)."""
    found, seen = [], set()

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif id(x) in seen:
            return
        elif isinstance(x, dict):
            seen.add(id(x))
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            seen.add(id(x))
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            seen.add(id(x))
            for v in vars(x).values():
                walk(v)

    for _, state in cache._stage_states.values():
        walk(state)
    return found


def _in_triton_interpreter() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if f"{os.sep}triton{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False
