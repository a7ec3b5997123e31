"""Serve a composable-kv policy in vLLM 0.26.0: an attention backend registered as vLLM's CUSTOM backend.

    CKV_POLICY=configs/quest_art.yaml  python -c "from vllm import LLM; LLM(model, attention_backend='CUSTOM')"
    CKV_POLICY=configs/quest_art.yaml  vllm serve MODEL --attention-backend CUSTOM

`register` is the `vllm.general_plugins` entry point (pyproject.toml); vLLM's load_general_plugins calls it
in every process it starts (front end, engine core, workers), once per process, and does not catch what it
raises. The backend itself (backend.py) imports vLLM; adapter.py and policy.py do not. Notes: README.md here.
"""
from __future__ import annotations

import os

VLLM_VERSION = "0.26.0"  # the version the backend is written against (the `vllm` extra pins it)
BACKEND_PATH = "composable_kv.integrations.vllm.backend.CkvAttentionBackend"


def register() -> None:
    """Register the backend as AttentionBackendEnum.CUSTOM; with CKV_POLICY set, validate the policy now,
    so a bad policy stops vLLM at start-up with one line instead of at the first forward."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .policy import ENV, serving_pipeline
    if os.environ.get(ENV, "").strip():
        serving_pipeline()
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
