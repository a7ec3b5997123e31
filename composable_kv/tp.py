"""Tensor-parallel decode: the same policies on a model whose attention heads are sharded over ranks.

transformers' tensor-parallel loading (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``)
column-shards the q/k/v projections of Llama/Mistral/Qwen2 and row-shards ``o_proj`` (and the MLP
likewise), so each rank's attention function receives only its own heads: ``[B, Hq/N, T, D]`` and
``[B, Hkv/N, T, D]``. :class:`~composable_kv.hf.PolicySession` asks :func:`rank_local_shape` for the
head counts, so each rank builds its paged cache and page summaries for its local KV heads and runs
the compiled pipeline on them. Every stage decides per (request, KV head) -- budgets, ART's stop --
so sparse decode adds no communication: the only collectives are the all-reduces after ``o_proj`` and
``down_proj`` (and the embedding's and ``lm_head``'s own). The decode layers are the fused ones
(:class:`~composable_kv.decoder.FusedDecoder` on this rank's shards, ``--layers fused``; ``auto`` on GPUs) or
transformers' modules (``--layers modules``), whose hooks do the same all-reduces.

Launch (each rank prints nothing but rank 0)::

    torchrun --nproc-per-node 2 -m composable_kv.tp --model MODEL_DIR --policy quest_art \\
        --batch 8 --context 2048 --new-tokens 32

Without ``torchrun`` the same command runs on one process (the baseline to compare with).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .distributed import (TensorParallelError, is_distributed, print0, rank, rank_local_shape,  # noqa: F401
                          world_size)
from .errors import CkvError

__all__ = [
    "TensorParallelError",
    "generate",
    "init_distributed",
    "is_distributed",
    "load_model_tp",
    "print0",
    "rank",
    "rank_local_shape",
    "reduce_step_stats",
    "save_random_llama",
    "world_size",
]


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------

def init_distributed() -> None:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPU); no-op if joined.

    On GPUs each rank binds ``cuda:LOCAL_RANK`` first.
    """
    if is_distributed():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise TensorParallelError(
            "tensor parallelism needs a process group: launch with `torchrun --nproc-per-node N ...` "
            "(RANK/WORLD_SIZE are not set).")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        torch.distributed.init_process_group("gloo")


# --------------------------------------------------------------------------------------------
# Model: loading and this rank's shape
# --------------------------------------------------------------------------------------------

def _check_divisible(config, n: int) -> None:
    cfg = getattr(config, "text_config", None) or config
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    sizes = {"num_attention_heads": n_q, "num_key_value_heads": n_kv}
    inter = getattr(cfg, "intermediate_size", None)
    if inter is not None:
        sizes["intermediate_size"] = inter
    bad = {k: v for k, v in sizes.items() if v % n}
    if bad:
        raise TensorParallelError(
            f"cannot shard over {n} ranks: " + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f" not divisible by {n}; every rank must hold whole KV heads (and their query heads). "
            f"Use a rank count that divides num_key_value_heads={n_kv}.")


def _hf_folder(model, dtype) -> Path:
    """A Hugging Face model folder for ``model``; a GGUF (or the default model) is de-quantized once, on rank 0."""
    import hashlib

    from . import assets

    folder, gguf = assets._split_model_path(assets.resolve_model_path(model))
    if gguf is None:
        return folder
    if rank() == 0:
        assets.load_model(folder / gguf, dtype=dtype)  # writes the converted safetensors folder
    if is_distributed():
        torch.distributed.barrier()
    # Same naming as assets.load_model's cache of converted GGUFs.
    digest = hashlib.sha256(str((folder / gguf).resolve()).encode()).hexdigest()[:12]
    converted = assets.cache_dir() / "converted" / f"{Path(gguf).stem}-{digest}-{str(dtype).removeprefix('torch.')}"
    if not (converted / "config.json").is_file():
        raise TensorParallelError(f"{folder / gguf}: the de-quantized copy {converted} was not written; "
                                  "check that the cache folder is writable (CKV_CACHE_DIR).")
    return converted


def load_model_tp(model=None, *, dtype: torch.dtype | None = None, tp_plan="auto"):
    """Load ``model`` (HF folder, GGUF, or None for the default model) sharded over the ranks of ``torchrun``.

    Uses transformers' ``from_pretrained(tp_plan=...)``; with one process and no ``torchrun`` it
    loads the whole model on ``cuda`` (or CPU) instead. float32 on CPU, bfloat16 on GPU by default.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    distributed = "RANK" in os.environ or is_distributed()
    if distributed:
        init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = _hf_folder(model, dtype)
    if not distributed:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    _check_divisible(AutoConfig.from_pretrained(folder), world_size())
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, tp_plan=tp_plan).eval()


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def reduce_step_stats(steps) -> None:
    """Sum each step's per-rank read statistics over the ranks, in place (every rank gets the totals)."""
    if not steps or not is_distributed():
        return
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([[s.pages_read, s.kv_bytes_read, s.dense_kv_bytes] for s in steps],
                     dtype=torch.long, device=device)  # [steps, 3, B]
    torch.distributed.all_reduce(t)
    for s, row in zip(steps, t.tolist()):
        s.pages_read, s.kv_bytes_read, s.dense_kv_bytes = row


def generate(model, tokenizer, prompts, policy, max_new_tokens: int = 32, **kwargs):
    """:func:`composable_kv.hf.generate` on a sharded model, with the read statistics summed over ranks.

    Call it on every rank with the same arguments; every rank returns the same tokens.
    """
    from . import hf

    out = hf.generate(model, tokenizer, prompts, policy, max_new_tokens, **kwargs)
    reduce_step_stats(out.steps)
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if is_distributed():
        torch.distributed.barrier()


def _timed_decode(model, pipeline, prompts: list[list[int]], new_tokens: int, layers: str = "auto") -> dict:
    """Greedy decode with prefill and decode timed apart; returns tokens, seconds and read fraction.

    The first decode step (kernel compiles, CUDA-graph capture) is not timed: tokens/s counts the
    steps after it, as a served decode runs."""
    from . import hf

    session = hf.PolicySession(model, pipeline, max_total_tokens=max(map(len, prompts)) + new_tokens,
                               batch_size=len(prompts), layers=layers)
    try:
        _sync(session.device)
        t0 = time.perf_counter()
        logits = session.prefill(prompts)  # [B, V]
        _sync(session.device)
        t1 = time.perf_counter()
        generated, t_first = [], t1
        for step in range(new_tokens):
            nxt = logits.argmax(-1)
            generated.append(nxt)
            if step < new_tokens - 1:
                logits = session.decode(nxt)
            if step == 0:
                _sync(session.device)
                t_first = time.perf_counter()
        tokens = torch.stack(generated, 1).tolist()  # [B, new_tokens]
        _sync(session.device)
        t2 = time.perf_counter()
    finally:
        session.close()
    reduce_step_stats(session.steps)
    read = sum(sum(s.kv_bytes_read) for s in session.steps)
    dense = sum(sum(s.dense_kv_bytes) for s in session.steps)
    steps = len(session.steps)
    timed = steps - 1
    return {"tokens": tokens, "prefill_s": t1 - t0, "decode_s": t2 - t_first, "decode_steps": timed,
            "first_step_s": t_first - t1, "decode_path": session.decode_path, "decode_layers": session.layers,
            "decode_tokens_per_s": len(prompts) * timed / (t2 - t_first) if timed > 0 else float("nan"),
            "kv_read_fraction": read / dense if dense else float("nan")}


def save_random_llama(path, *, seed: int = 0, dtype=torch.float32, device="cpu", **config) -> Path:
    """Save a randomly initialised Llama (``config`` overrides LlamaConfig fields) to ``path``.

    ``device="cuda"`` initialises a wide model in seconds instead of minutes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**({"eos_token_id": None, "bos_token_id": None, "pad_token_id": 0} | config))
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype).eval().save_pretrained(path)
    return Path(path)


def _prompts(args, model) -> tuple[list[list[int]], object]:
    if args.prompts_json:
        return [[int(t) for t in p] for p in json.loads(Path(args.prompts_json).read_text())], None
    if args.prompt:
        from . import assets

        tokenizer = assets.load_tokenizer(args.model)
        return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in args.prompt], tokenizer
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    return torch.randint(1, vocab, (args.batch, args.context), generator=g).tolist(), None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m composable_kv.tp",
        description="Greedy decode with a policy on a tensor-parallel model; rank 0 prints tokens/s and tokens.")
    p.add_argument("--model", default=None, help="HF model folder or .gguf (default: the default model)")
    p.add_argument("--policy", action="append", default=None,
                   help="policy YAML or shipped name (repeatable; default: quest_art)")
    p.add_argument("--prompt", action="append", default=None, help="text prompt (repeatable; needs a tokenizer)")
    p.add_argument("--prompts-json", default=None, help="JSON file: a list of token-id lists")
    p.add_argument("--batch", type=int, default=8, help="random prompts: how many (without --prompt)")
    p.add_argument("--context", type=int, default=1024, help="random prompts: tokens each")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--backend", choices=["auto", "reference", "triton"], default="auto",
                   help="pipeline backend (auto: fused Triton on GPU)")
    p.add_argument("--layers", choices=["auto", "fused", "modules"], default="auto",
                   help="decode layers (composable_kv.decoder; auto: fused on GPU, modules on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed short decodes per policy first (kernel compiles)")
    p.add_argument("--show", type=int, default=2, help="sequences whose tokens rank 0 prints")
    p.add_argument("--json", default=None, help="rank 0 writes the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import composable_kv as ckv

    from . import hf
    from .decoder import choose_layers

    args = build_parser().parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = load_model_tp(args.model, dtype=dtype)
        choose_layers(args.layers, model, next(model.parameters()).device)  # a refusal: one line, before decoding
        prompts, tokenizer = _prompts(args, model)
        policies = args.policy or ["quest_art"]
        pipes = [hf.compile_policy(p) for p in policies]
        pipes = [ckv.compile(p.config, backend=args.backend) for p in pipes]
    except (CkvError, FileNotFoundError) as e:
        print0(f"error: {e}")
        return 2
    shape = rank_local_shape(model, hf.ModelShape.of(model))
    device = next(model.parameters()).device
    print0(f"{world_size()} rank(s) on {device.type}; per rank {shape.num_q_heads} query / {shape.num_kv_heads} "
           f"KV heads; {len(prompts)} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens")
    results = []
    for name, pipe in zip(policies, pipes):
        for _ in range(args.warmup):
            _timed_decode(model, pipe, [p[:64] for p in prompts], min(3, args.new_tokens), args.layers)
        r = _timed_decode(model, pipe, prompts, args.new_tokens, args.layers)
        r = {"policy": str(name), "policy_name": pipe.name} | r
        results.append(r)
        print0(f"{pipe.name}: {r['decode_tokens_per_s']:.1f} tokens/s decode ({r['decode_steps']} steps x "
               f"{len(prompts)} seqs in {r['decode_s']:.3f} s after a first step of {r['first_step_s']:.2f} s; "
               f"{r['decode_path']} path, {r['decode_layers']} layers), prefill {r['prefill_s']:.3f} s, "
               f"KV read {r['kv_read_fraction']:.3f} of dense")
        for b, toks in enumerate(r["tokens"][:args.show]):
            text = f"  {tokenizer.decode(toks)!r}" if tokenizer is not None else ""
            print0(f"  [{b}] {toks}{text}")
    if args.json and rank() == 0:
        meta = {"world_size": world_size(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "q_heads_per_rank": shape.num_q_heads, "kv_heads_per_rank": shape.num_kv_heads,
                "batch": len(prompts), "context": max(map(len, prompts)), "new_tokens": args.new_tokens}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
