"""Compile a policy into a DecodePipeline: `plan()` once per decode step, `run()` per layer.

Generic path (any selector, incl. user-written ones): selectors narrow a SelectionState, then the
terminal stage reads the chosen pages through the paged-decode op. The fused Triton path
(composable_kv.fused) handles stacks made only of built-in stages in at most 3 launches (4 when a
key_shadow re-ranks after quest/topk).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .cache import PagedKVCache
from .config import PolicyConfig, load_policy
from .contracts import check_finite, check_int, check_seq_ids, check_sm_scale, check_tensor, value_checks_on
from .errors import TensorContractError
from .stages import ScoringSelector, SelectorStage, StopKind, StopRule
from .summaries import KEY_MINMAX
from .kernels import backend_for as kernel_backend_for
from .kernels.page_score import reference as score_ref
from .kernels.page_select import reference as select_ref
from .kernels.paged_decode import reference as decode_ref
from .kernels.paged_decode.output import DecodeOut
from .ints import cdiv

BACKENDS = ("auto", "reference", "triton")


DecodeResult = DecodeOut  # pipeline.run's output: out [B, Hq, D] in q's dtype, pages_read [B, Hkv], tau_bound


@dataclass
class StepPlan:
    """Per decode step, shared by all layers."""
    seq_ids: list[int]
    page_size: int
    page_table: torch.Tensor   # [B, P] int32 physical page ids (0 past a request's pages)
    seq_lens: torch.Tensor     # [B] int32
    num_pages: torch.Tensor    # [B] int32
    valid: torch.Tensor        # [B, P] bool
    forced: torch.Tensor       # [B, P] bool: sink/window pages and every request's last page
    any_forcing: bool          # a forcing stage ran (else an unscored selection keeps every page)
    num_splits: int

    @property
    def batch_size(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]


@dataclass
class LayerContext:
    """What a selector sees for one layer: the query, the cache and the step's plan."""
    q: torch.Tensor  # [B, Hq, D]
    cache: PagedKVCache
    layer: int
    plan: StepPlan
    sm_scale: float
    backend: str = "reference"  # the pipeline's backend on q's device: which kernels the helpers below launch

    batch_size = property(lambda self: self.q.shape[0])
    num_q_heads = property(lambda self: self.q.shape[1])
    num_kv_heads = property(lambda self: self.cache.num_kv_heads)
    group_size = property(lambda self: self.q.shape[1] // self.cache.num_kv_heads)
    max_pages = property(lambda self: self.plan.max_pages)
    page_size = property(lambda self: self.plan.page_size)

    def q_grouped(self) -> torch.Tensor:
        B, Hq, D = self.q.shape
        return self.q.float().view(B, self.num_kv_heads, Hq // self.num_kv_heads, D)  # [B, Hkv, G, D]

    def token_mask(self) -> torch.Tensor:
        P, S = self.max_pages, self.page_size
        pos = torch.arange(P * S, device=self.q.device).view(P, S)
        return pos[None] < self.plan.seq_lens.long()[:, None, None]  # [B, P, S]

    def keys(self) -> torch.Tensor:
        """Keys of every page, zero past a request's length: [B, Hkv, P, S, D] fp32."""
        k = self.cache.k[self.layer][self.plan.page_table.long()].float()  # [B, P, Hkv, S, D]
        k = k * self.token_mask()[:, :, None, :, None]
        return k.transpose(1, 2)

    @property
    def page_score(self):
        """The page-score kernels (kernels/page_score) of this backend: Triton, or the torch reference (whose
        [B, Hkv, G, P, D] temporaries cost milliseconds a layer at 32k on a GPU)."""
        if self.backend == "triton":
            from .kernels.page_score import triton as score_tk
            return score_tk
        return score_ref

    @property
    def page_select(self):
        """select_pages / narrow_pages / strided_tail_lse of this backend (kernels/page_select): one Triton
        launch each, or the torch reference (a dozen sort, gather and scatter launches each)."""
        if self.backend == "triton":
            from .kernels.page_select import triton as select_tk
            return select_tk
        return select_ref

    def quest_bound(self) -> torch.Tensor:
        """Quest's box bound on every page, max over the group: [B, Hkv, P] fp32, scaled."""
        c = self.cache
        return self.page_score.quest_scores(self.q, c.key_min[self.layer], c.key_max[self.layer],
                                            self.plan.page_table, self.plan.num_pages, self.sm_scale)

    def quest_bound_listed(self, order: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Quest's box bound on the listed pages only, in list order: [B, Hkv, N] fp32, scaled, -inf from count on."""
        c = self.cache
        return self.page_score.quest_scores_listed(self.q, c.key_min[self.layer], c.key_max[self.layer],
                                                   self.plan.page_table, self.plan.num_pages, order, count,
                                                   self.sm_scale)


class SelectionState:
    """Pages still in play for one layer. All masks [B, Hkv, P]."""

    def __init__(self, plan: StepPlan, num_kv_heads: int, page_select=select_ref):
        self.page_select = page_select  # LayerContext.page_select: the backend's selection kernels
        B, P = plan.valid.shape
        self.num_pages = plan.num_pages  # [B]
        self.valid = plan.valid[:, None, :].expand(B, num_kv_heads, P)
        self.forced = plan.forced[:, None, :].expand(B, num_kv_heads, P)  # shared over the heads until a stage
        self.candidates = self.valid  # replaces them (stages never write into them)
        self.forced_only = plan.any_forcing  # unscored: keep only forced pages if a stage forced some
        self.scored = False
        self.order_key: torch.Tensor | None = None
        self.bounds: torch.Tensor | None = None
        self.selected: tuple[torch.Tensor, torch.Tensor] | None = None  # the last narrow's (order, count)

    def narrow(self, scores: torch.Tensor, budget_pages: int, *, is_bound: bool) -> None:
        """Keep the forced pages and the best-scoring candidates, up to the budget. Its kept pages, best-first,
        are the read order when the stage that narrows is the last selector (DecodePipeline.select): a stage
        calls it last in its apply."""
        order, count, kept = self.page_select.narrow_pages(scores, self.forced, self.candidates, self.num_pages,
                                                           budget_pages)
        self.take(order, count, kept, self.forced, scores, scores if is_bound else None)

    def take(self, order, count, kept, forced, order_key, bounds=None) -> None:
        """A stage's own selection (what narrow computes): order [B, Hkv, P] int32 best-first (-1 past count
        [B, Hkv]), kept and forced [B, Hkv, P] bool, order_key [B, Hkv, P] fp32 (higher: read earlier),
        bounds: order_key when it is a sound bound, else None."""
        self.forced = forced
        self.candidates = kept
        self.scored = True
        self.order_key = order_key
        self.bounds = bounds
        self.selected = order, count

    def keep_all_candidates(self) -> None:
        """A scoring stage whose budget holds every candidate keeps them all, without scores."""
        self.forced_only = False

    def kept(self) -> torch.Tensor:
        if self.scored:
            return (self.candidates | self.forced) & self.valid
        return (self.forced if self.forced_only else self.valid) & self.valid


class DecodePipeline:
    def __init__(self, config: PolicyConfig, backend: str = "auto", validate: bool | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        self.config = config
        self.name = config.name
        self.page_size = config.page_size
        self.dense_layers = frozenset(config.dense_layers)
        self.selectors: list[SelectorStage] = [s for s in config.stages if s.kind == "selector"]
        # An admission stage (write path) needs a GatedKVCache; policies/write_gate/admission.py runs it.
        self.admission = next((s for s in config.stages if s.kind == "admission"), None)
        self.terminal = config.stages[-1]
        self.requested_backend = backend
        self.validate = validate  # NaN/Inf check of q: None = on for CPU q or the reference backend
        self._plan: StepPlan | None = None

    # -- static facts -------------------------------------------------------------------------
    @functools.cached_property
    def fused_spec(self):
        """How the Triton path runs this stack (composable_kv.fused.FusedSpec), decided once."""
        from . import fused
        return fused.make_spec(self)

    @property
    def stop_rule(self) -> StopRule:
        return self.terminal.stop_rule()

    @property
    def needs_box_bound(self) -> bool:
        """A terminal that stops early needs an order or a sound bound that no selector provides."""
        if self.stop_rule.kind is None:
            return False
        scorers = [s for s in self.selectors if isinstance(s, ScoringSelector)]
        if not scorers:  # the box bound orders the pages, unless the terminal reads them in natural order
            return self.stop_rule.kind.uses_bounds or not self.terminal.natural_order
        return self.stop_rule.kind.uses_bounds and not scorers[-1].score_is_bound

    @property
    def orders_within_splits(self) -> bool:
        """No selector: ART reads every page by the box bound, and each split orders only its own pages
        (p = s mod S; kernels/page_select/README.md, "split-local order") instead of one global sort."""
        return not self.selectors and self.needs_box_bound and not self.terminal.natural_order

    @property
    def required_summaries(self) -> frozenset[str]:
        need = set()
        for s in self.config.stages:
            need |= s.required_summaries()
        if self.needs_box_bound:
            need.add(KEY_MINMAX)
        return frozenset(need)

    def is_dense_layer(self, layer: int) -> bool:
        return layer in self.dense_layers or self.reads_everything

    @property
    def reads_everything(self) -> bool:
        """No selector and no early stop: every layer is a dense read."""
        return not self.selectors and self.stop_rule.kind is None

    def backend_for(self, device: torch.device) -> str:
        if self.requested_backend != "auto":
            return self.requested_backend
        return kernel_backend_for(device)

    @property
    def host_synced_stages(self) -> list[str]:
        return [s.name for s in self.config.stages if not s.graph_safe]

    @property
    def graph_safe(self) -> bool:
        """run() can be captured in a CUDA graph (no stage syncs with the host)."""
        return not self.host_synced_stages

    def describe(self, device: str | torch.device = "cuda") -> str:
        device = torch.device(device)
        backend = self.backend_for(device)
        lines = [f"policy {self.name!r}: page_size={self.page_size}, dense_layers={sorted(self.dense_layers)}",
                 "stages: " + " -> ".join(s.name for s in self.config.stages),
                 *([f"admission: {self.admission.describe(device)}"] if self.admission is not None else []),
                 f"summaries kept on append: {sorted(self.required_summaries) or 'none'}",
                 *[f"{st.name}: {line}" for st in self.config.stages
                   if st.kind != "admission" and (line := st.describe(device))]]
        if backend == "reference":
            lines.append("path: reference (pure torch, fp32 math; every stage is a torch op)")
        else:
            from . import fused
            lines += fused.describe(self)
        lines.append("CUDA graphs: capturable" if self.graph_safe else
                     f"CUDA graphs: not capturable (stages {self.host_synced_stages} sync with the host "
                     "every layer); run eagerly")
        return "\n".join(lines)

    # -- per step -----------------------------------------------------------------------------
    def plan(self, cache: PagedKVCache, seq_ids: list[int], num_splits: int | None = None) -> StepPlan:
        """Once per decode step (after `cache.reserve`): page tables and forced pages for all layers."""
        if self.admission is not None:
            raise TensorContractError(f"policy {self.name!r} leads with the admission stage "
                                      f"{self.admission.name!r}: decode it through policies/write_gate/admission.py "
                                      f"(GatedPipeline over a GatedKVCache), not a plain PagedKVCache")
        if not isinstance(cache, PagedKVCache):
            raise TensorContractError(f"plan: cache expected a PagedKVCache, got {type(cache).__name__}")
        seq_ids = check_seq_ids("plan", seq_ids, cache.sequences())
        if num_splits is not None:
            check_int("plan", "num_splits", num_splits, 1)
        if cache.page_size != self.page_size:
            raise TensorContractError(f"cache.page_size is {cache.page_size} but policy {self.name!r} "
                                      f"has page_size {self.page_size}; build the cache with the policy's")
        missing = self.required_summaries - cache.summaries
        if missing:
            raise TensorContractError(f"policy {self.name!r} needs page summaries {sorted(missing)} that the "
                                      f"cache does not keep; build it with summaries=pipeline.required_summaries")
        page_table, seq_lens = cache.padded_page_table(seq_ids)
        return self.plan_tables(cache, page_table, seq_lens, seq_ids, num_splits)

    def plan_tables(self, cache: PagedKVCache, page_table: torch.Tensor, seq_lens: torch.Tensor,
                    seq_ids: list[int], num_splits: int | None = None) -> StepPlan:
        """The step plan from device tables alone: page_table [B, P] int32, seq_lens [B] int32.

        Device ops only (no host sync), so the decode runtime builds the plan inside its CUDA graph.
        P may exceed every request's page count (pages reserved ahead); pages past a request's length
        are not valid and never read."""
        S = self.page_size
        num_pages = cdiv(seq_lens, S)
        P = page_table.shape[1]
        pos = torch.arange(P, device=page_table.device)
        valid = pos[None] < num_pages[:, None]
        forced = pos[None] == (num_pages - 1)[:, None]
        plan = StepPlan(list(seq_ids), S, page_table, seq_lens, num_pages, valid, forced, False,
                        num_splits or 1)
        for sel in self.selectors:
            f = sel.plan_forced(plan)
            if f is not None:
                plan.forced |= f & valid
                plan.any_forcing = True
        if num_splits is None:
            plan.num_splits = self._default_splits(cache, plan)
        self._plan = plan
        return plan

    def use_plan(self, plan: StepPlan) -> None:
        """Make `plan` (e.g. one over static graph buffers) the plan that run() reads."""
        self._plan = plan

    @property
    def current_plan(self) -> StepPlan | None:
        return self._plan

    def _default_splits(self, cache: PagedKVCache, plan: StepPlan) -> int:
        if self.backend_for(cache.device) == "reference":
            return 1
        from . import fused
        return fused.default_num_splits(cache, plan)

    def run(self, q: torch.Tensor, cache: PagedKVCache, layer: int, sm_scale: float | None = None) -> DecodeResult:
        plan = self._plan
        if plan is None:
            raise RuntimeError("call pipeline.plan(cache, seq_ids) once per decode step before run()")
        self._check_q(q, cache, layer, plan)
        if q.is_cuda and not self.graph_safe and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"policy {self.name!r} cannot be captured in a CUDA graph: stages "
                               f"{self.host_synced_stages} sync with the host every layer; run it eagerly")
        sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else check_sm_scale("run", sm_scale)
        ctx = LayerContext(q, cache, layer, plan, sm_scale, self.backend_for(q.device))
        if ctx.backend == "triton":
            from . import fused
            if any(s.covers(plan) for s in self.selectors):  # the fused kernels would score: go generic
                return self.run_generic(ctx, fused._generic_decode)
            return fused.run_layer(self, ctx)
        return self.run_generic(ctx, decode_ref.paged_decode)

    def _check_q(self, q, cache, layer, plan):
        B = plan.batch_size
        check_tensor("run", "q", q)
        if q.dim() != 3 or q.shape[0] != B or q.shape[2] != cache.head_dim:
            raise TensorContractError(f"q: expected [B={B}, Hq, D={cache.head_dim}], got {list(q.shape)}")
        if q.shape[1] % cache.num_kv_heads or q.shape[1] == 0:
            raise TensorContractError(f"q: {q.shape[1]} query heads is not a multiple of the cache's "
                                      f"{cache.num_kv_heads} KV heads")
        if q.device != cache.device:
            raise TensorContractError(f"q is on {q.device} but the cache is on {cache.device}")
        check_int("run", "layer", layer)
        if not 0 <= layer < cache.num_layers:
            raise TensorContractError(f"layer: expected 0 <= layer < {cache.num_layers}, got {layer}")
        if value_checks_on(self.validate, q.device, reference=self.backend_for(q.device) == "reference"):
            check_finite("run", "q", q, "b, head, d")

    # -- the generic path ---------------------------------------------------------------------
    def select(self, ctx: LayerContext):
        """Run the selectors; return (order [B, Hkv, N], count [B, Hkv], bounds-in-order or None)."""
        plan = ctx.plan
        B, Hkv, P = plan.batch_size, ctx.num_kv_heads, plan.max_pages
        if self.is_dense_layer(ctx.layer):
            order = torch.arange(P, device=ctx.q.device, dtype=torch.int32).expand(B, Hkv, P)
            order = torch.where(plan.valid[:, None], order, torch.full_like(order, -1))
            return order.contiguous(), plan.num_pages[:, None].expand(B, Hkv).to(torch.int32), None
        state = SelectionState(plan, Hkv, ctx.page_select)
        for sel in self.selectors:
            state.selected = None
            sel.apply(ctx, state)
        box = ctx.quest_bound() if self.needs_box_bound and not state.scored else None  # the box orders the pages
        order_key = state.order_key if state.scored else box
        bounds = state.bounds if state.bounds is not None else box
        if state.selected is not None and not self.terminal.natural_order \
                and self.stop_rule.kind is not StopKind.CALIBRATED:
            # the last selector narrowed: its kept pages, best-first by its scores, are this read order
            order, count = state.selected
        elif order_key is None or self.terminal.natural_order:  # natural order
            order_key = -torch.arange(P, device=ctx.q.device, dtype=torch.float32).expand(B, Hkv, P)
            order, count = self._order_kept(ctx, state, order_key)
        elif self.stop_rule.kind is StopKind.CALIBRATED:  # the request's last page first (paged_decode/README.md)
            last = torch.arange(P, device=ctx.q.device) == (plan.num_pages - 1)[:, None]  # [B, P]
            order, count = self._order_kept(ctx, state, order_key.masked_fill(last[:, None], float("inf")))
        else:
            order, count = self._order_kept(ctx, state, order_key)
        bounds_in_order = None
        if self.stop_rule.kind is not None and self.stop_rule.kind.uses_bounds:
            if bounds is not None:
                bounds_in_order = bounds.gather(-1, order.long().clamp(min=0))
            elif self.needs_box_bound:  # a scorer whose scores bound nothing ordered the pages: box the listed ones
                bounds_in_order = ctx.quest_bound_listed(order, count)
            else:  # the scorer covered every page unscored: no bound, the stop cannot fire
                bounds_in_order = torch.full(order.shape, float("inf"), device=ctx.q.device)
        return order, count, bounds_in_order

    def _order_kept(self, ctx: LayerContext, state: SelectionState, order_key: torch.Tensor):
        """The kept pages best-first by order_key [B, Hkv, P]: (order [B, Hkv, P], count [B, Hkv])."""
        plan = ctx.plan
        if self.orders_within_splits:
            return select_ref.order_within_splits(order_key, plan.num_pages, plan.num_splits)
        keep = state.kept()
        return ctx.page_select.select_pages(order_key.masked_fill(~keep, float("-inf")), keep, keep, None)

    def run_generic(self, ctx: LayerContext, decode_fn) -> DecodeResult:
        order, count, bounds_in_order = self.select(ctx)
        rule = StopRule() if self.is_dense_layer(ctx.layer) else self.stop_rule
        tail = terms = None
        if rule.kind is not None and rule.kind.uses_bounds:
            tokens = ctx.page_select.page_token_counts(order, ctx.plan.seq_lens, ctx.page_size)
            tail = ctx.page_select.strided_tail_lse(bounds_in_order, tokens, count, ctx.plan.num_splits)
            if rule.kind is StopKind.CALIBRATED:
                terms = select_ref.tail_terms(bounds_in_order, tokens, count)
        c = ctx.cache
        observers = [] if self.is_dense_layer(ctx.layer) else [s for s in self.selectors if s.observes_page_mass]
        res = decode_fn(ctx.q, c.k[ctx.layer], c.v[ctx.layer], ctx.plan.page_table, ctx.plan.seq_lens,
                        order, count, sm_scale=ctx.sm_scale, rule=rule, tail_lse=tail, bound_terms=terms,
                        num_splits=ctx.plan.num_splits, **({"page_mass": True} if observers else {}))
        for s in observers:  # the decode's page-mass side output: [B, Hq, P] log mass per page, [B, Hq] lse
            s.observe_page_mass(ctx, res.page_lse, res.lse)
        return DecodeResult(res.out.to(ctx.q.dtype), res.pages_read, res.tau_bound)

    # -- accounting ---------------------------------------------------------------------------
    def kv_bytes_read(self, res: DecodeResult, cache: PagedKVCache, layer: int | None = None) -> torch.Tensor:
        """Bytes read for one layer per request [B]: K/V pages read plus the page summaries scored."""
        sparse = layer is None or not self.is_dense_layer(layer)
        return self.bytes_for(cache, res.pages_read.sum(-1), int(sparse), layer)

    def bytes_for(self, cache: PagedKVCache, pages: torch.Tensor, sparse_layers: int,
                  layer: int | None = None) -> torch.Tensor:
        """Bytes read per request [B] float64: `pages` [B] K/V pages read (any layers) plus the page
        summaries that `sparse_layers` non-dense layers scored under the current plan (layer: the one
        layer they were read in; None: a whole step's sparse layers)."""
        page_kv = 2 * cache.page_size * cache.head_dim * cache.dtype.itemsize
        total = pages.to(torch.float64) * page_kv
        return total + self.summary_bytes(cache, layer) * sparse_layers if sparse_layers else total

    def summary_bytes(self, cache: PagedKVCache, layer: int | None = None) -> torch.Tensor:
        """Summary bytes a non-dense layer reads per request [B] float64 (all KV heads), current plan;
        layer None: the mean over the sparse layers."""
        plan = self._plan
        pages = plan.num_pages.to(torch.float64)  # [B] pages a selector may score
        scored = torch.zeros_like(pages)  # [B] summary bytes per KV head
        n_forced = plan.forced.sum(-1).to(torch.float64)
        for s in self.selectors:
            if s.covers(plan):  # keeps every page without reading a summary
                continue
            # a re-ranker (key_shadow) reads its summary only for the pages the previous scorer kept
            in_play = pages if s.scores_kept_only else plan.num_pages.to(torch.float64)
            scored += in_play * s.summary_bytes_per_page(cache, layer)
            if isinstance(s, ScoringSelector):
                pages = torch.minimum(pages, n_forced.clamp(min=s.budget_pages(cache.page_size)))
        if self.needs_box_bound:  # key min/max: of the listed pages when a scorer ordered them, else of every page
            boxed = pages if any(isinstance(s, ScoringSelector) for s in self.selectors) else plan.num_pages
            scored += boxed.to(torch.float64) * 2 * cache.head_dim * cache.dtype.itemsize
        return scored * cache.num_kv_heads


def compile(policy, backend: str = "auto", validate: bool | None = None) -> DecodePipeline:
    """Compile a policy (YAML path, dict or PolicyConfig) into a DecodePipeline.

    validate: NaN/Inf check of q in run() (a host sync): None = on for CPU q and the reference backend,
    off on CUDA unless CKV_VALIDATE=1 (composable_kv/contracts.py)."""
    config = policy if isinstance(policy, PolicyConfig) else load_policy(policy)
    return DecodePipeline(config, backend=backend, validate=validate)
