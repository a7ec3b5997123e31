"""Integrations of composable-kv into serving engines (vllm/: an attention-backend plugin for vLLM)."""
