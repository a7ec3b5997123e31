"""KV admission on the write path (Write-Gated KV): the pipeline over the gated cache, and the session.

The cache (`gated_cache.py`) keeps one page list per (layer, request, KV head) triple, laid out as
`[admitted tokens | ring window]`, and updates it with device ops of fixed shapes.

Reading. `q [B, Hq, D]` is viewed as `[B*Hkv, G, D]` and the policy's selectors + terminal run
unchanged with Hkv=1 over the triples of the layer (fused Triton path included), on the triples' page
tables and kept lengths (device tensors; `DecodePipeline.plan_tables` builds each layer's plan on the
device). The window is the tail of every sequence, so before the first scoring stage we insert
`sink_window(0, W)`: the window's pages are forced and the scorer (Quest, ...) picks among the global
pages. Without a scorer every kept page is read, so attention is exact over window + admitted tokens.
Layers in `dense_layers` keep every token (no gate) and read densely.

Cost. A decode step has no host plan and no host sync: the gate MLP, the ring update, the moves and the
page finalization are one Triton kernel a layer (`kernels/gated_write`; its torch reference, about a
hundred small device ops, on the reference backend), so the decode runtime runs write_gate on its
`device` / `graph` paths (graph support ALWAYS).
"""
from __future__ import annotations

import dataclasses

import torch

from composable_kv.config import PolicyConfig
from composable_kv.errors import TensorContractError
from composable_kv.pipeline import DecodePipeline, DecodeResult, StepPlan
from composable_kv.stages import ScoringSelector, get_stage_class
from composable_kv.policies.write_gate.gated_cache import (  # noqa: F401 (rotate_half, unrope: re-exported)
    GatedKVCache, GateFn, RopeFn, rotate_half, unrope)


def model_rope(model) -> RopeFn:
    """positions -> (cos, sin) from the model's rotary embedding module (Llama/Mistral/Qwen2 family)."""
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        raise ValueError(f"write_gate: {type(model).__name__} has no *RotaryEmbedding module; the gate reads "
                         f"pre-RoPE keys, which we recover by undoing RoPE")
    param = next(model.parameters())

    def rope(positions: torch.Tensor):
        x = torch.zeros(1, dtype=torch.float32, device=param.device)
        cos, sin = rotary(x, positions.to(param.device)[None])
        return cos[0].float(), sin[0].float()  # [T, D]
    return rope


class GatedPipeline:
    """Runs a policy that leads with an admission stage over a `GatedKVCache`.

    Same calls as `DecodePipeline`: `plan(cache, seq_ids)` once per step, `run(q, cache, layer)` per
    layer, `kv_bytes_read(res, cache, layer)`. Inside, q [B, Hq, D] -> [B*Hkv, G, D] and the inner
    pipeline (the policy without its admission stage, window pages forced) runs with Hkv = 1.
    """

    def __init__(self, pipeline: DecodePipeline):
        cfg, stage = pipeline.config, pipeline.admission
        if stage is None:
            raise ValueError(f"policy {pipeline.name!r} has no admission stage; use its DecodePipeline directly")
        self.outer, self.stage, self.name = pipeline, stage, pipeline.name
        self.page_size, self.dense_layers = pipeline.page_size, pipeline.dense_layers
        self.requested_backend = pipeline.requested_backend
        stages = [s for s in cfg.stages if s.kind != "admission"]
        first_scorer = next((i for i, s in enumerate(stages) if isinstance(s, ScoringSelector)), None)
        if first_scorer is not None:
            window = get_stage_class("sink_window")(sink_tokens=0, window_tokens=stage.window_tokens)
            stages.insert(first_scorer, window)
        inner = dataclasses.replace(cfg, dense_layers=[], stages=stages)
        self.sparse = DecodePipeline(inner, backend=pipeline.requested_backend)
        dense_cfg = dataclasses.replace(cfg, name=f"{cfg.name}/dense", dense_layers=[],
                                        stages=[get_stage_class("attend")()])
        self.dense = DecodePipeline(dense_cfg, backend=pipeline.requested_backend)
        self.required_summaries = self.sparse.required_summaries
        self.selectors = self.sparse.selectors
        observers = [s.name for s in self.selectors if s.observes_prefill]
        if observers:
            raise ValueError(f"policy {self.name!r}: admission stage {stage.name!r} does not stack with selectors "
                             f"that index the prefill ({observers}) yet; their per-sequence state would need "
                             f"the gated cache's layout")
        self._seq_ids: list[int] | None = None
        self._num_splits: int | None = None
        self._last: DecodePipeline | None = None

    @property
    def config(self) -> PolicyConfig:
        return self.outer.config

    @property
    def admission(self):
        return self.stage

    def describe(self, device="cuda") -> str:
        write = ("one Triton kernel a layer (kernels/gated_write)" if self.outer.backend_for(torch.device(device))
                 == "triton" else "the torch reference ops (kernels/gated_write/reference.py)")
        return "\n".join([f"admission: {self.stage.describe()}; dense layers {sorted(self.dense_layers)} keep "
                          f"every token; decode write (gate, ring window, page moves, summaries): {write}",
                          "inner pipeline (Hkv=1, one sequence per layer x request x KV head):",
                          self.sparse.describe(device)])

    def make_cache(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, *, dtype, device,
                   gate: GateFn | None = None, rope: RopeFn | None = None) -> GatedKVCache:
        """The gated cache; its decode write runs on the policy's backend for `device` (triton: one kernel a layer)."""
        return GatedKVCache(num_layers, num_kv_heads, head_dim, num_pages, self.page_size, dtype, device,
                            self.required_summaries, window_tokens=self.stage.window_tokens,
                            threshold=self.stage.threshold, gate=gate, rope=rope,
                            gated_layers=[i for i in range(num_layers) if i not in self.dense_layers],
                            write_backend=self.outer.backend_for(torch.device(device)))

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, GatedKVCache):
            raise TensorContractError(f"policy {self.name!r} (admission stage {self.stage.name!r}) reads a "
                                      f"GatedKVCache (GatedPipeline.make_cache), got {type(cache).__name__}")

    def plan(self, cache: GatedKVCache, seq_ids: list[int]) -> None:
        """Once per step on the host path (after `cache.reserve`): which requests the step decodes."""
        self._check_cache(cache)
        self._seq_ids = list(seq_ids)

    def plan_tables(self, cache: GatedKVCache, page_table: torch.Tensor, seq_lens: torch.Tensor,
                    seq_ids: list[int], num_splits: int | None = None) -> StepPlan:
        """The decode runtime's per-step call (device path): the requests, and the split count its graph
        keeps. The per-layer plans come from the triples' tables in `run`. -> layer 0's plan."""
        self._check_cache(cache)
        self._seq_ids = list(seq_ids)
        if num_splits is not None:
            self._num_splits = num_splits
        return self._layer_plan(cache, 0)

    def _pipe(self, layer: int) -> DecodePipeline:
        return self.dense if layer in self.dense_layers else self.sparse

    def _layer_plan(self, cache: GatedKVCache, layer: int) -> StepPlan:
        """The layer's plan over its triples, from device tables (no host sync). The split count is fixed
        the first time (from the table shape, the same for every layer) so a captured graph keeps it."""
        batch = cache.batch(self._seq_ids)
        plan = self._pipe(layer).plan_tables(cache.pool, batch.tables[layer], cache.kept_lengths(layer, self._seq_ids),
                                             batch.head_ids, self._num_splits)
        self._num_splits = plan.num_splits
        return plan

    def run(self, q: torch.Tensor, cache: GatedKVCache, layer: int, sm_scale: float | None = None) -> DecodeResult:
        if self._seq_ids is None:
            raise RuntimeError("call pipeline.plan(cache, seq_ids) once per decode step before run()")
        B, Hq, D = q.shape
        H = cache.num_kv_heads
        if B != len(self._seq_ids) or Hq % H or D != cache.head_dim:
            raise TensorContractError(f"q: expected [B={len(self._seq_ids)}, Hq (a multiple of {H}), "
                                      f"D={cache.head_dim}], got {list(q.shape)}")
        self._layer_plan(cache, layer)
        pipe = self._last = self._pipe(layer)
        res = pipe.run(q.reshape(B * H, Hq // H, D), cache.pool, 0, sm_scale=sm_scale)
        tau = None if res.tau_bound is None else res.tau_bound.reshape(B, Hq)
        return DecodeResult(res.out.reshape(B, Hq, D), res.pages_read.reshape(B, H), tau)

    def kv_bytes_read(self, res: DecodeResult, cache: GatedKVCache, layer: int | None = None) -> torch.Tensor:
        """Bytes read for the last `run` per request [B]: K/V pages plus the summaries scored."""
        B, H = res.pages_read.shape
        inner = DecodeResult(res.out, res.pages_read.reshape(B * H, 1), None)
        return self._last.kv_bytes_read(inner, cache.pool, 0).reshape(B, H).sum(-1)


def model_tag(model) -> str:
    """Names a model's gate weights by family and shape: `<model_type>-<L>L-<Hkv>kv-<D>d-<hidden>`."""
    cfg = getattr(model.config, "text_config", None) or model.config
    n_q = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    return f"{cfg.model_type}-{cfg.num_hidden_layers}L-{n_kv}kv-{head_dim}d-{cfg.hidden_size}"


def gated_session(pipeline: DecodePipeline, model, shape, num_pages: int, dtype, device):
    """For hf.PolicySession: (GatedPipeline, GatedKVCache) with the stage's trained gate and the model's RoPE.

    `num_pages` is the dense cache's page count (pages of Hkv heads); the pool gets as many (page, head)
    units per layer (+1: the cache's trash page), so no admission pattern can run out of pages."""
    from composable_kv.policies.write_gate.gate import GateMLP

    gp = GatedPipeline(pipeline)
    gate = GateMLP.load(gp.stage.weights_path(model_tag(model)), num_layers=shape.num_layers,
                        num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim).to(device)
    cache = gp.make_cache(shape.num_layers, shape.num_kv_heads, shape.head_dim,
                          num_pages * shape.num_layers * shape.num_kv_heads + 1, dtype=dtype, device=device,
                          gate=gate, rope=model_rope(model))
    return gp, cache
