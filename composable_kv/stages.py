"""The stage protocol, the selector template and the stage registry.

A stage is a dataclass registered by name. Three kinds:
  * an admission stage (optional, first) decides what is written: which tokens a (request, KV head)
    keeps at all (composable_kv.admission runs it on the write path);
  * selectors force pages (sink, window) or score pages and keep the best under a budget;
  * the terminal stage reads the chosen pages (`attend` reads all, `art` stops early).
A new selector subclasses `ScoringSelector` and writes only `score()`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .ints import cdiv

if TYPE_CHECKING:
    from .pipeline import LayerContext, SelectionState, StepPlan



def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None):
    """A stage parameter: default, one-line help, and the range or choices the validator enforces."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Stage:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    graph_safe: ClassVar[bool] = True  # False: the stage syncs with the host per layer (no CUDA-graph capture)

    def check(self) -> None:
        """Cross-field checks; raise ValueError("<field>: <message>") to refuse."""

    def required_summaries(self) -> frozenset[str]:
        return frozenset()

    def summary_bytes_per_page(self, cache) -> int:
        """Bytes this stage reads per (page, KV head) besides the K/V pages the terminal reads."""
        return 0

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]


class SelectorStage(Stage):
    """Base of selectors. Override `plan_forced` (position-based, once per step) and/or `apply`."""

    kind: ClassVar[str] = "selector"
    fusable: ClassVar[bool] = False  # True only for built-ins that the Triton pipeline fuses

    def plan_forced(self, plan: "StepPlan") -> torch.Tensor | None:
        """Pages forced from positions alone, shared by all layers and heads: [B, P] bool or None."""
        return None

    def apply(self, ctx: "LayerContext", state: "SelectionState") -> None:
        """Per layer: narrow `state` (forced pages, candidates, order key, bounds)."""


@dataclass
class ScoringSelector(SelectorStage):
    """Template: a subclass writes `score(ctx) -> [B, Hkv, P]`; the base keeps the forced pages plus
    the best-scoring candidates up to `budget_tokens`, and hands the scores on as the read order."""

    budget_tokens: int = param(2048, "tokens kept per (request, KV head), forced pages included", min=0)
    score_is_bound: ClassVar[bool] = False  # True if score >= every scaled q.k in the page

    def score(self, ctx: "LayerContext") -> torch.Tensor:
        raise NotImplementedError(f"stage {self.name!r} must implement score(ctx) -> [B, Hkv, P]")

    def budget_pages(self, page_size: int) -> int:
        return cdiv(self.budget_tokens, page_size)

    def apply(self, ctx, state) -> None:
        scores = self.score(ctx)
        expected = (ctx.batch_size, ctx.num_kv_heads, ctx.max_pages)
        if tuple(scores.shape) != expected:
            raise ValueError(f"stage {self.name!r}: score() returned shape {tuple(scores.shape)}, "
                             f"expected [B, Hkv, P] = {list(expected)}")
        state.narrow(scores.float(), self.budget_pages(ctx.page_size), is_bound=self.score_is_bound)


class TerminalStage(Stage):
    kind: ClassVar[str] = "terminal"


class AdmissionStage(Stage):
    """Base of admission stages: they lead a stack and act on the write path, not on the read."""

    kind: ClassVar[str] = "admission"


_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register a Stage dataclass under `cls.name`."""
    if not dataclasses.is_dataclass(cls):
        cls = dataclass(cls)
    if not (isinstance(cls, type) and issubclass(cls, (AdmissionStage, SelectorStage, TerminalStage))):
        raise TypeError(f"{cls!r}: a stage must subclass AdmissionStage, SelectorStage, ScoringSelector "
                        f"or TerminalStage")
    if not cls.name or not cls.name.isidentifier():
        raise TypeError(f"{cls.__name__}: set a class attribute `name` (an identifier), got {cls.name!r}")
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"stage name {cls.name!r} is already registered by "
                         f"{old.__module__}.{old.__qualname__}; pick another name")
    _REGISTRY[cls.name] = cls
    return cls


def registered_stages() -> dict[str, type[Stage]]:
    return dict(sorted(_REGISTRY.items()))


def get_stage_class(name: str) -> type[Stage]:
    return _REGISTRY[name]
