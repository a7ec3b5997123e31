"""The policy a vLLM engine serves: read from CKV_POLICY, validated before the engine starts.

Plain functions (no vLLM import), so the refusals are tested on any machine. vLLM runs prefill in its
own kernels, writes every token to its own cache and replays decode from CUDA graphs; a stage that
needs anything else is refused here, with one line naming the stage and what to serve instead.
"""
from __future__ import annotations

import functools
import os

import torch

from ...config import PolicyConfig, load_policy
from ...errors import CkvError
from ...pipeline import DecodePipeline

ENV = "CKV_POLICY"
PREFILL_ENV = "CKV_VLLM_PREFILL"  # which dense kernel runs the prefill part of a step: auto | flash_attn | triton
PREFILL_KERNELS = ("auto", "flash_attn", "triton")
MIN_PAGE_SIZE = 16  # vLLM's prefill kernels (FlashAttention's paged KV, Triton) read blocks of a multiple of 16


class ServingPolicyError(CkvError, ValueError):
    """A policy (or a model) that the vLLM backend cannot serve."""


def servability_problems(config: PolicyConfig) -> list[str]:
    """Why vLLM cannot serve `config` (empty when it can)."""
    problems = []
    for s in config.stages:
        if s.kind == "admission":
            problems.append(f"admission stage {s.name!r} decides which tokens are written, but vLLM writes "
                            f"every token to its own paged cache; serve the stack without it")
        elif not s.graph_safe:
            problems.append(f"stage {s.name!r} syncs with the host every layer (graph_support={s.graph_support}), "
                            f"and vLLM replays decode from CUDA graphs")
        elif s.observes_prefill:
            problems.append(f"stage {s.name!r} builds its state from the prefill's queries and keys, and the "
                            f"prefill runs in vLLM's own kernels")
        elif s.observes_page_mass:
            problems.append(f"stage {s.name!r} reads the decode's page-mass side output, which the backend "
                            f"does not keep")
    if config.page_size < MIN_PAGE_SIZE:
        problems.append(f"page_size {config.page_size}: vLLM's prefill kernels need pages of a multiple of "
                        f"{MIN_PAGE_SIZE} tokens; use page_size >= {MIN_PAGE_SIZE}")
    return problems


def check_servable(config: PolicyConfig) -> None:
    problems = servability_problems(config)
    if problems:
        raise ServingPolicyError(f"policy {config.name!r} ({config.source or 'dict'}) cannot be served by "
                                 f"vLLM: " + "; ".join(problems))


def load_serving_policy(policy=None) -> DecodePipeline:
    """The pipeline for `policy` (a path, a shipped name or a dict), else for $CKV_POLICY; refused if unservable."""
    if policy is None:
        policy = os.environ.get(ENV, "").strip()
        if not policy:
            raise ServingPolicyError(f"{ENV} is not set: set it to a YAML policy path or a shipped policy name "
                                     f"(e.g. {ENV}=configs/quest_art.yaml) before starting vLLM with "
                                     f"attention_backend='CUSTOM'")
    config = load_policy(policy)  # a ConfigError names the file, the line and the key
    check_servable(config)
    return DecodePipeline(config, backend="auto")


@functools.lru_cache(maxsize=None)
def _pipeline_for(policy: str) -> DecodePipeline:
    return load_serving_policy(policy)


def serving_pipeline() -> DecodePipeline:
    """The engine's pipeline for the current $CKV_POLICY, loaded once per process and value."""
    policy = os.environ.get(ENV, "").strip()
    if not policy:
        load_serving_policy()  # raises the unset-variable error
    return _pipeline_for(policy)


def prefill_kernel(fa_version: int | None) -> tuple[str, str]:
    """-> (kernel, the line's words for it): the kernel that runs prefill, from $CKV_VLLM_PREFILL and the
    FlashAttention version vLLM offers on this GPU (`fa_utils.get_flash_attn_version()`; None or 2 where it has
    no FA3 / FA4).

    auto (the default) takes FlashAttention 3 / 4 where vLLM has it, else vLLM's Triton `unified_attention`;
    flash_attn insists on it, triton never uses it. The bundle on the GPU machine keeps FA3, not FA2."""
    asked = os.environ.get(PREFILL_ENV, "").strip().lower() or "auto"
    if asked not in PREFILL_KERNELS:
        raise ServingPolicyError(f"{PREFILL_ENV}={asked!r}: choose one of {', '.join(PREFILL_KERNELS)} "
                                 f"(auto: FlashAttention 3/4 where vLLM has it, else vLLM's Triton kernel)")
    has_fa = fa_version in (3, 4)
    if asked == "flash_attn" and not has_fa:
        raise ServingPolicyError(f"{PREFILL_ENV}=flash_attn, but vLLM offers FlashAttention "
                                 f"{fa_version or 'none'} here, not 3 or 4: set {PREFILL_ENV}=triton (or auto)")
    if asked == "triton":
        return "triton", f"vLLM's Triton unified_attention ({PREFILL_ENV}=triton)"
    if not has_fa:
        return "triton", f"vLLM's Triton unified_attention (no FlashAttention 3/4 here, {PREFILL_ENV}=auto)"
    return "flash_attn", f"FlashAttention {fa_version} ({PREFILL_ENV}={asked})"


def combination_problem(pipeline: DecodePipeline, *, dtype, kv_cache_dtype: str | None,
                        block_size: int | None) -> str | None:
    """The line vLLM prints when it validates the CUSTOM backend for a layer (AttentionBackend.supports_combination):
    what of the engine's dtype / KV-cache dtype / --block-size the policy cannot serve, and the fix; None if fine."""
    problems = []
    if block_size is not None and block_size % pipeline.page_size:
        problems.append(f"--block-size {block_size} is not a multiple of the policy's page_size {pipeline.page_size}: "
                        f"pass --block-size {pipeline.page_size} (or leave it out)")
    kv_dtype = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16}.get(kv_cache_dtype)
    if kv_dtype is not None and kv_dtype != dtype:
        problems.append(f"--kv-cache-dtype {kv_cache_dtype} differs from the model's {str(dtype).split('.')[-1]}: "
                        f"the decode reads K/V in the query's dtype; pass --kv-cache-dtype auto")
    return "; ".join(problems) or None


def check_model(pipeline: DecodePipeline, *, num_layers: int, block_size: int, hybrid: bool = False) -> None:
    """Refuse a model or engine setting the policy does not fit (called when vLLM builds the backend).

    block_size is the kernel block size vLLM chose for the layers (their KV tensors' block_size)."""
    problems = []
    bad = sorted(i for i in pipeline.dense_layers if i >= num_layers)
    if bad:
        problems.append(f"dense_layers {bad} are past the model's {num_layers} layers; list layers 0..{num_layers - 1}")
    if block_size != pipeline.page_size:
        problems.append(f"vLLM's KV block size is {block_size} but the policy's page_size is {pipeline.page_size}; "
                        f"pass block_size={pipeline.page_size} to vLLM (or change the policy's page_size)")
    if hybrid:
        problems.append("it is a hybrid model (attention with mamba / linear-attention layers): vLLM copies its "
                        "partially hit prefix-cache blocks block to block, around the write that keeps the page "
                        "summaries; serve it with another backend")
    if problems:
        raise ServingPolicyError(f"policy {pipeline.name!r} cannot run this vLLM model: " + "; ".join(problems))
