"""composable-kv: sparse-attention decode policies declared as YAML stage stacks.

    pipe = composable_kv.compile("configs/quest_art.yaml")
    cache = composable_kv.PagedKVCache(..., summaries=pipe.required_summaries)
    pipe.plan(cache, seq_ids)            # once per decode step
    res = pipe.run(q, cache, layer)      # per layer: res.out [B, Hq, D], res.pages_read [B, Hkv]
"""
from pathlib import Path as _Path

# From a clone, policies/ and kernels/ sit beside this package at the repo root; mount them as
# composable_kv.policies / composable_kv.kernels. An installed wheel already has them inside.
_repo_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "policies").is_dir() and (_repo_root / "policies" / "__init__.py").is_file():
    __path__.append(str(_repo_root))  # type: ignore[name-defined]  # noqa: F821

from .errors import CacheFullError, CkvError, ConfigError, TensorContractError  # noqa: E402
from .cache import PagedKVCache, AppendSlots  # noqa: E402
from .stages import (  # noqa: E402
    SelectorStage, ScoringSelector, TerminalStage, Stage, register_stage, registered_stages, get_stage_class,
)
from .config import PolicyConfig, load_policy  # noqa: E402
from .pipeline import DecodePipeline, DecodeResult, compile  # noqa: E402
from . import policies as _builtin_policies  # noqa: E402,F401  (registers the built-in stages)

__all__ = [
    "AppendSlots", "CacheFullError", "CkvError", "ConfigError", "DecodePipeline", "DecodeResult",
    "PagedKVCache", "PolicyConfig", "ScoringSelector", "SelectorStage", "Stage", "TensorContractError",
    "TerminalStage", "compile", "get_stage_class", "load_policy", "register_stage", "registered_stages",
]
__version__ = "0.1.0"
