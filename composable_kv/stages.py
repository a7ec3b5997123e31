"""The stage protocol, the selector template and the stage registry.

A stage is a dataclass registered by name. Three kinds:
  * an admission stage (optional, first) decides what is written: which tokens a (request, KV head)
    keeps at all; it supplies its own cache and pipeline wrapper (`AdmissionStage.build_session`);
  * selectors force pages (sink, window) or score pages and keep the best under a budget;
  * the terminal stage reads the chosen pages; its `stop_rule()` says whether and how it stops early.
A new selector subclasses `ScoringSelector` and writes only `score()`.

Every hook a stage may take part in is declared here with a no-op default, and core code calls the
hooks, never a stage's name: observing the prefill's q/k, observing the decode's page mass, the
summaries it reads and their bytes, whether it can be captured in a CUDA graph (`graph_support`), and,
for a stage the Triton path implements, its part of the fused launch (`fused_part`).
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .ints import cdiv

if TYPE_CHECKING:
    from .pipeline import LayerContext, SelectionState, StepPlan


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class GraphSupport(_StrEnum):
    """Whether a stage's per-layer work can be captured in the decode step's CUDA graph."""
    ALWAYS = "always"  # device ops only, fixed shapes
    NEVER = "never"    # syncs with the host every layer: the session runs it on the host path


class ScoreKind(enum.IntEnum):
    """What the fused score_select kernel computes per page (kernels/page_select/triton.py SCORE)."""
    NONE = 0   # no scores: kept pages in natural order
    BOX = 1    # Quest's box bound from key_min / key_max
    EXACT = 2  # the exact page max of q.k (reads every key)


class StopKind(_StrEnum):
    """How a terminal stage stops early (the decode kernels implement these; None reads every kept page)."""
    STABILITY = "stability"    # the ART paper's heuristic: the running output stopped changing
    CERTIFIED = "certified"    # sound: the unread softmax mass is provably <= delta
    CALIBRATED = "calibrated"  # heuristic, not certified: the certified tail scaled by the ratio of mass
                               # to bound observed on the pages already read, estimated <= delta

    @property
    def certified(self) -> bool:
        """The stop carries a guarantee on the unread mass (tau_bound <= delta)."""
        return self is StopKind.CERTIFIED

    @property
    def uses_bounds(self) -> bool:
        """The stop reads per-page logit upper bounds of the unread pages (the strided tail LSE)."""
        return self in (StopKind.CERTIFIED, StopKind.CALIBRATED)


@dataclass
class StopRule:
    """A terminal stage's stop, as the decode kernels read it (they take any object with these fields)."""
    kind: StopKind | None = None     # None: read every kept page
    chunk_pages: int = 4             # pages read between two checks
    scale_tol: float = 1e-7          # stability: relative change of ||o||
    direction_tol: float = 1e-3      # stability: 1 - cos(o_t, o_{t-1})
    patience: int = 5                # stability: stable checks in a row before stopping
    delta: float = 0.01              # certified: bound on the softmax mass not read; calibrated: its estimate
    acc_bf16: bool = False           # the running output acc/l is rounded to bf16 after every chunk
    calibrate: str = "all"           # calibrated: the slack c from every full page read ("all"), the last chunk's
                                     # ("recent"), or the first chunk's, the stop point then set from the bounds
                                     # ("once")

    def __post_init__(self):
        if self.kind is not None:
            self.kind = StopKind(self.kind)
        if self.calibrate not in ("all", "recent", "once"):
            raise ValueError(f"calibrate: expected 'all', 'recent' or 'once', got {self.calibrate!r}")


@dataclass(frozen=True)
class FusedPart:
    """A selector's part of the fused Triton launch; composable_kv.fused assembles a stack's parts."""
    forced_pages: int = 0          # a forcing stage: at most this many pages forced per request
    score: ScoreKind = ScoreKind.NONE  # a scorer: what score_select computes
    budget_tokens: int = 0         # a scorer or re-ranker: tokens kept per (request, KV head)
    rerank_bits: int = 0           # a re-ranker of the kept pages by an int8/int4 key shadow (8 or 4)


class StageState:
    """A stage's run-time state for one cache (`Stage.new_state`): the cache holds it, so it lives and dies
    with the cache, and `cache.free(seq_id)` calls `free_sequence` so per-sequence rows go with it."""

    def free_sequence(self, seq_id: int) -> None:
        """Forget `seq_id` (its pages went back to the pool)."""


def _inherits(stage, base: type, *methods: str) -> bool:
    """`stage` runs `base`'s own code for `methods` (a subclass that overrides one is not fusable as base)."""
    return all(getattr(type(stage), m) is getattr(base, m) for m in methods)



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
    graph_support: ClassVar[GraphSupport] = GraphSupport.ALWAYS

    def check(self) -> None:
        """Cross-field checks; raise ValueError("<field>: <message>") to refuse."""

    def required_summaries(self) -> frozenset[str]:
        """Page summaries it reads (composable_kv.summaries); the cache keeps exactly these."""
        return frozenset()

    def summary_bytes_per_page(self, cache, layer: int | None = None) -> int:
        """Bytes this stage reads per (page, KV head) in `layer` besides the K/V pages the terminal reads;
        layer None: the mean over the sparse layers (a step's total is that times their count)."""
        return 0

    def new_state(self, cache) -> StageState | None:
        """Run-time state for one cache, made on first use (`cache.stage_state(stage)`); None keeps none."""
        return None

    def observe_prefill(self, cache, seq_ids: list[int], layer: int, query: torch.Tensor, key: torch.Tensor,
                        valid: torch.Tensor | None, sm_scale: float | None) -> None:
        """Prefill of sequences `seq_ids`, one layer: key [g, Hkv, T, D] post-RoPE, query [g, Hq, Tq, D] the
        prompt's LAST Tq <= T queries (post-RoPE; Tq = T in a forward, Tq >= prefill_queries() in a replayed
        prefill), valid [g, T] bool (None: every token is real). For stages that build per-sequence state
        from the prompt."""

    def prefill_queries(self) -> int | None:
        """How many of the prompt's last queries `observe_prefill` reads (None: all of them). With a number,
        a prefill recorded by another session (hf.PrefillCache) replays for this stage without the model."""
        return None

    def observe_page_mass(self, ctx: "LayerContext", page_lse: torch.Tensor, lse: torch.Tensor) -> None:
        """After a decode of a sparse layer, its page-mass side output: page_lse [B, Hq, P] (log of each page's
        unnormalised softmax mass, -inf where not read) and lse [B, Hq]; the mass is exp(page_lse - lse)
        (kernels/page_history/reference.page_mass)."""

    def describe(self, device: torch.device | str | None = None) -> str | None:
        """A line for the policy's `describe()`: what this stage's own work runs as on `device` (None: the
        stage line says enough)."""
        return None

    def trained_weights(self, model_name: str) -> tuple[Path, str] | None:
        """(the weights file this stage loads for `model_name`, the command that trains it) for a learned stage;
        None for a stage that learns nothing."""
        return None

    @property
    def clock_periods(self) -> tuple[int, ...]:
        """Step periods of work this stage does on some decode steps only (a CNN every k steps, a dense
        calibration every N): its cost repeats after their least common multiple. Empty: the same every step."""
        return ()

    @property
    def observes_prefill(self) -> bool:
        return type(self).observe_prefill is not Stage.observe_prefill

    @property
    def observes_page_mass(self) -> bool:
        return type(self).observe_page_mass is not Stage.observe_page_mass

    @property
    def graph_safe(self) -> bool:
        return self.graph_support is GraphSupport.ALWAYS

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]


class SelectorStage(Stage):
    """Base of selectors. Override `plan_forced` (position-based, once per step) and/or `apply`."""

    kind: ClassVar[str] = "selector"
    scores_kept_only: ClassVar[bool] = False  # reads its summary only for the pages the previous scorer kept

    def fused_part(self, page_size: int) -> FusedPart | None:
        """Its part of the fused Triton launch, or None: it runs as Python (pipeline.select)."""
        return None

    def covers(self, plan: "StepPlan") -> bool:
        """It keeps every page of this step's table without reading a summary (its budget holds them all)."""
        return False

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

    def stop_rule(self) -> StopRule:
        """How the decode stops early (the kernels implement the kinds); the default reads every kept page."""
        return StopRule()

    @property
    def natural_order(self) -> bool:
        """Read the kept pages in page order instead of best-first."""
        return False


class AdmissionStage(Stage):
    """Base of admission stages: they lead a stack and act on the write path, not on the read."""

    kind: ClassVar[str] = "admission"
    graph_support: ClassVar[GraphSupport] = GraphSupport.NEVER  # plans its head-major cache on the host

    def build_session(self, pipeline, model, shape, num_pages: int, dtype, device):
        """(pipeline, cache) for hf.PolicySession: the stage's own cache and the pipeline wrapper over it."""
        raise NotImplementedError(f"admission stage {self.name!r} must implement build_session()")

    def describe(self, device: torch.device | str | None = None) -> str:
        return self.name


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


def unregister_stage(name: str) -> None:
    """Remove a stage from the registry (a notebook redefining one, a test cleaning up after itself)."""
    if name not in _REGISTRY:
        raise KeyError(f"stage {name!r} is not registered (registered: {sorted(_REGISTRY)})")
    del _REGISTRY[name]


def registered_stages() -> dict[str, type[Stage]]:
    return dict(sorted(_REGISTRY.items()))


def get_stage_class(name: str) -> type[Stage]:
    return _REGISTRY[name]
