from dataclasses import dataclass
from pathlib import Path

import torch


from composable_kv.kernels import backend_for
from composable_kv.kernels.predictor_cnn import reference as cnn_ref
from composable_kv.policies.attention_predictor.predictor import (PageHistory, default_weights_path, history_kernels,
                                                                 kernel_weights, load_weights, prefill_page_mass)
from composable_kv.seq_rows import SequenceRows
from composable_kv.stages import GraphSupport, ScoringSelector, StageState, param, register_stage
from composable_kv.ints import cdiv


@register_stage
@dataclass
class AttentionPredictor(ScoringSelector):
    """AttentionPredictor: a small CNN reads the last `history_steps` steps of block-pooled attention
    (one mass per page per step, from the decode kernel's page-mass side output; pages a step did not
    read count 0) and scores the pages for the next step. The history starts from the prefill: the
    prompt's last H queries' attention pooled per page (exact causal softmax). The sink and recent
    pages are forced; every `calibrate_every`-th step a sequence reads every page (a dense calibration
    step) to refresh its history, the prefill counting as step 0 (decode steps N-1, 2N-1, ... are
    dense). `calibrate_first` (default) makes the first decode step dense too; without it the first
    step predicts from the prefill history alone. A sequence whose prefill was not observed (empty
    history) calibrates on its first decode step whatever the setting.
    Cheaper settings: per_kv_head (one history and
    one CNN row per KV head instead of per query head), fewer history_steps, run_every > 1 (reuse the
    last prediction in between).

    Device-only (graph-safe): the history is a fixed-shape ring buffer per layer with a row per sequence
    (policies/attention_predictor/predictor.py: PageHistory) in the cache's StageState, written in place
    from the decode's page mass; the CNN runs once per layer over every (request, head) row; the
    calibration clock is a device tensor. A finished sequence's row is freed with it (cache.free).
    """

    name = "attention_predictor"
    graph_support = GraphSupport.ALWAYS  # history, clock and CNN are device tensors and ops, fixed shapes
    paper = ("AttentionPredictor: Temporal Pattern Matters for Efficient LLM Inference "
             "(Yang et al., 2025; arXiv 2502.04077)")
    summary = "top pages by a CNN over the history of page attention (trained: ckv train-predictor)"

    history_steps: int = param(64, "H: decode steps of page attention the CNN reads", min=3, max=1024)
    calibrate_every: int = param(5, "N: every N-th step reads every page (dense; the prefill is step 0)", min=1)
    calibrate_first: bool = param(True, "the first decode step reads every page, prefill history or not")
    per_kv_head: bool = param(True, "one history per KV head (group-summed mass); false: per query head")
    run_every: int = param(1, "k: run the CNN every k steps, reuse its scores in between", min=1)
    sink_tokens: int = param(64, "leading tokens always read", min=0)
    recent_tokens: int = param(64, "most recent tokens always read", min=0)
    weights: str = param("", "CNN weights file; empty: the `ckv train-predictor` default in the user cache")
    cnn_precision: str = param("auto", "the Triton CNN's dot inputs: auto (tf32 if torch.backends.cudnn.allow_tf32, "
                               "else fp32), tf32, bf16 (1.7x tf32's rate on the H200) or ieee (fp32); the torch "
                               "reference runs fp32", choices=("auto", "tf32", "bf16", "ieee"))


    def trained_weights(self, model_name: str) -> tuple[Path, str]:
        return (Path(self.weights).expanduser() if self.weights else default_weights_path()), "ckv train-predictor"

    @property
    def clock_periods(self) -> tuple[int, ...]:
        return (self.run_every, self.calibrate_every)

    def summary_bytes_per_page(self, cache, layer: int | None = None) -> int:
        """The CNN reads H fp32 history values per page and KV head (per query head: G times that,
        which the cache alone cannot tell; this counts one), every run_every steps."""
        return cdiv(self.history_steps * 4, self.run_every)

    def plan_forced(self, plan):
        S = plan.page_size
        pos = torch.arange(plan.max_pages, device=plan.page_table.device)[None]  # [1, P]
        start = (plan.seq_lens.long() - self.recent_tokens).clamp(min=0)[:, None]
        return ((pos * S < self.sink_tokens) | ((pos + 1) * S > start)) & plan.valid  # [B, P]

    # -- state ---------------------------------------------------------------------------------------
    def new_state(self, cache) -> "_PredictorState":
        return _PredictorState()

    def _history(self, cache, layer: int, heads: int, kv_heads: int, device) -> PageHistory:
        state = cache.stage_state(self)
        hist = state.history.get(layer)
        if hist is None:
            hist = state.history[layer] = PageHistory(heads, kv_heads, self.history_steps, device)
        hist.ensure(state.rows.capacity, 0)
        return hist

    def _rows(self, ctx) -> tuple[PageHistory, torch.Tensor]:
        """This layer's history (grown to the step's pages) and the batch's rows [B] (host bookkeeping only)."""
        state = ctx.cache.stage_state(self)
        rows, fresh = state.rows.lookup(ctx.plan.seq_ids, ctx.q.device)
        for r in fresh:  # a sequence whose prefill was not observed: a clean row in every layer
            for h in state.history.values():
                h.ensure(state.rows.capacity, 0)
                h.reset(r)
        heads = ctx.num_kv_heads if self.per_kv_head else ctx.num_q_heads
        hist = self._history(ctx.cache, ctx.layer, heads, ctx.num_kv_heads, ctx.q.device)
        hist.ensure(state.rows.capacity, ctx.max_pages)
        return hist, rows

    def prefill_queries(self) -> int:
        return self.history_steps

    def observe_prefill(self, cache, seq_ids, layer, query, key, valid, sm_scale) -> None:
        """Called per layer during a dense prefill (composable_kv.hf): query [B, Hq, T, D], key
        [B, Hkv, T, D] post-RoPE, valid [B, T] bool (None: all real). Seeds each sequence's history row
        with its last `history_steps` queries' attention pooled per page."""
        state = cache.stage_state(self)
        sm_scale = query.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        Hq, Hkv = query.shape[1], key.shape[1]
        hist = None
        with torch.no_grad():
            for b, sid in enumerate(seq_ids):
                q, k = query[b], key[b]
                if valid is not None:
                    q, k = q[:, valid[b][-q.shape[1]:]], k[:, valid[b]]  # q: the prompt's last queries
                mass = prefill_page_mass(q, k, cache.page_size, sm_scale, self.history_steps)  # [Hq, h, P]
                if self.per_kv_head:  # as observe_page_mass: the group's mean
                    mass = mass.view(Hkv, -1, *mass.shape[1:]).mean(1)
                row, fresh = state.rows.assign(sid)
                hist = self._history(cache, layer, Hkv if self.per_kv_head else Hq, Hkv, query.device)
                hist.ensure(state.rows.capacity, mass.shape[-1])
                for h in state.history.values() if fresh else ():
                    h.ensure(state.rows.capacity, 0)
                    h.reset(row)
                hist.seed(row, mass)

    # -- selection ---------------------------------------------------------------------------------
    def describe(self, device=None) -> str:
        """Which CNN path runs on `device` (composable_kv.kernels.backend_for) and what run_every skips."""
        if backend_for(torch.device(device or "cpu")) == "triton":
            dots = ("TF32 when torch.backends.cudnn.allow_tf32, else fp32" if self.cnn_precision == "auto"
                    else {"tf32": "TF32", "bf16": "bf16 inputs, fp32 sums", "ieee": "fp32"}[self.cnn_precision])
            how = ("fused Triton CNN (kernels/predictor_cnn: reads the history ring in place, one launch per layer, "
                   f"nothing [C2, H, P] in memory; tl.dot in {dots})")
        else:
            how = "torch reference CNN (kernels/predictor_cnn/reference.py: ring gather, conv2d, conv2d, conv1d; fp32)"
        skip = (f"; run_every {self.run_every}: rows off their turn keep their last scores and skip the CNN"
                if self.run_every > 1 else "")
        return f"{how}{skip}"

    def score(self, ctx):
        hist, rows = self._rows(ctx)
        return self._predict(ctx, hist, rows, self._clock(hist, rows)[1])

    def apply(self, ctx, state) -> None:
        hist, rows = self._rows(ctx)
        calibrate, due = self._clock(hist, rows)  # [B] each
        state.forced = state.forced | (calibrate[:, None, None] & state.valid)  # a dense step: keep every page
        scores = self._predict(ctx, hist, rows, due)
        state.narrow(scores.float(), self.budget_pages(ctx.page_size), is_bound=False)

    def _clock(self, hist, rows):
        """(calibrate, due) [B]: this step's turns from the rows' clocks (kernels/page_history.clock: one launch
        on CUDA). An unseeded first step calibrates (its clock reads 0)."""
        return history_kernels(rows.device).clock(hist.steps, hist.seeded, hist.scores, rows, self.calibrate_every,
                                                  self.calibrate_first, self.run_every)

    def _predict(self, ctx, hist, rows, due):
        """[B, Hkv, P] CNN scores; with run_every > 1 the rows not `due` keep their last scores (per KV head the
        CNN call keeps and records them in hist.scores itself)."""
        B, P, Hkv = ctx.batch_size, ctx.max_pages, ctx.num_kv_heads
        due = None if self.run_every == 1 else due
        keep = hist.scores if due is not None and self.per_kv_head else None  # [R, Hkv, Pcap]
        model = load_weights(self.weights or None, ctx.q.device)
        with torch.no_grad():  # one CNN call for every (request, head): [B, Hh, P]
            if backend_for(ctx.q.device) == "triton":
                from composable_kv.kernels.predictor_cnn import triton as cnn_tk
                s = cnn_tk.predictor_scores(hist.hist, rows, hist.ptr, ctx.plan.num_pages, P, kernel_weights(model),
                                            due, keep, precision=None if self.cnn_precision == "auto"
                                            else self.cnn_precision)
            else:
                s = cnn_ref.predictor_scores(hist.hist, rows, hist.ptr, ctx.plan.num_pages, P, model.weights(), due,
                                             keep)
            if not self.per_kv_head:  # per query head: max of each head's predicted distribution
                s = s.masked_fill(~ctx.plan.valid[:, None], float("-inf"))
                s = s.log_softmax(-1).view(B, Hkv, -1, P).amax(2)  # [B, Hkv, P]
                if due is not None:
                    s = torch.where(due[:, None, None], s, hist.scores[rows, :, :P])
                    hist.scores[rows, :, :P] = s
        return s

    def observe_page_mass(self, ctx, page_lse: torch.Tensor, lse: torch.Tensor) -> None:
        """After the decode: page_lse [B, Hq, P] and lse [B, Hq] (Stage.observe_page_mass), pushed as mass."""
        hist, rows = self._rows(ctx)
        hist.push(rows, page_lse, lse, ctx.group_size if self.per_kv_head else 1)  # per KV head: the group's mean


class _PredictorState(StageState):
    """One cache's predictor state: a row per sequence, and a history ring buffer per layer."""

    def __init__(self):
        self.rows = SequenceRows()
        self.history: dict[int, PageHistory] = {}  # layer -> rows of (sequence, head) history

    def free_sequence(self, seq_id: int) -> None:
        self.rows.release(seq_id)
