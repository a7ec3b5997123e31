"""The Triton pipeline path: a layer in at most 3 launches (4 with a key shadow after another scorer),
no host sync, CUDA-graph capturable.

Stacks of built-in stages (sink_window, quest, topk; then attend or art) run as
  1. score_select  (page_select/triton.py): score every page (box bound / exact page max), keep the
     forced pages plus the best others under the budget, order them best-first and, for ART's
     certified stop, write the strided tail LSE of the bounds;
  2. decode        (paged_decode/triton.py): online softmax over the ordered list, stop rule inside;
  3. merge         (only when num_splits > 1): LSE merge of the splits.
A key_shadow stage after quest/topk adds one launch between 1 and 2, shadow_select
(key_shadow/triton.py): it scores the pages launch 1 kept from the int8/int4 key copy, keeps its own
budget, orders them and writes the tail LSE of its bounds; a key_shadow alone replaces launch 1.
Dense layers launch only 2 (+3). A stack with a user selector (or several scorers) runs the Python
selectors (pipeline.select) and then the Triton decode (+ merge).
Semantics equal pipeline.select + run_generic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.page_select import triton as select_tk
from .kernels.paged_decode.output import DecodeOut
from .kernels.paged_decode import triton as decode_tk
from .ints import cdiv
from .stages import ScoreKind, StopKind

KNOWN_STOPS = (None, StopKind.STABILITY, StopKind.CERTIFIED, StopKind.CALIBRATED)  # what paged_decode implements


@dataclass(frozen=True)
class FusedSpec:
    fused: bool            # the whole layer runs in the fused kernels
    reason: str            # why not, when not fused
    score: ScoreKind = ScoreKind.NONE  # what score_select computes
    select: bool = False   # a scorer narrows to a budget
    budget_tokens: int = 0
    forced_only: bool = False  # unscored, a forcing stage ran: only forced pages are kept
    max_forced_pages: int = 1  # static bound on the forced pages per request (sizes the sort)
    shadow_bits: int = 0   # a key-shadow re-ranker runs last (8 or 4), 0 if none
    shadow_budget_tokens: int = 0
    within_splits: bool = False  # every page, each split's own pages best-first (pipeline.orders_within_splits)


def spec(pipeline) -> FusedSpec:
    return pipeline.fused_spec


def make_spec(pipeline) -> FusedSpec:
    """Assemble the selectors' fused parts (Stage.fused_part) into one launch plan, or say why not."""
    ps = pipeline.page_size
    parts = []
    for s in pipeline.selectors:
        part = s.fused_part(ps)
        if part is None:
            return FusedSpec(False, f"selector {s.name!r} has no fused part (it runs as Python)")
        parts.append(part)
    rule = pipeline.stop_rule
    if rule.kind not in KNOWN_STOPS:
        return FusedSpec(False, f"stop rule {rule.kind!r} is not one the Triton decode implements")
    scoring = [p for p in parts if p.score is not ScoreKind.NONE or p.rerank_bits]
    if pipeline.terminal.natural_order and (scoring or pipeline.needs_box_bound):
        return FusedSpec(False, "natural read order with scores or bounds (score_select orders best-first)")
    shadow = scoring[-1] if scoring and scoring[-1].rerank_bits else None
    if shadow is not None and rule.kind is StopKind.CALIBRATED:
        return FusedSpec(False, "calibrated stop after a key shadow (shadow_select writes no per-page bound terms)")
    firsts = scoring[:-1] if shadow is not None else scoring
    if len(firsts) > 1 or any(p.rerank_bits for p in firsts):
        return FusedSpec(False, "more than one scoring stage (fused: one scorer, then optionally a key shadow)")
    forcing = any(p.forced_pages for p in parts)
    max_forced = 1 + sum(p.forced_pages for p in parts)  # the last page, plus what the forcing stages force
    common = dict(forced_only=forcing, max_forced_pages=max_forced)
    if shadow is not None:
        common |= dict(shadow_bits=shadow.rerank_bits, shadow_budget_tokens=shadow.budget_tokens)
    if firsts:
        return FusedSpec(True, "", score=firsts[0].score, select=True, budget_tokens=firsts[0].budget_tokens,
                         **common)
    if shadow is not None:
        return FusedSpec(True, "", **common)
    return FusedSpec(True, "", score=ScoreKind.BOX if pipeline.needs_box_bound else ScoreKind.NONE,
                     within_splits=pipeline.orders_within_splits, **common)


def default_num_splits(cache, plan) -> int:
    """Split-KV count: enough (b, kv head, split) programs to fill the GPU; 1 on CPU."""
    dev = cache.device
    if dev.type != "cuda":
        return 1
    return splits_for(plan.batch_size * cache.num_kv_heads, plan.max_pages, select_tk.sm_count(dev))


def splits_for(rows: int, max_pages: int, sms: int) -> int:
    """Splits of `rows` (request, KV head) programs over `max_pages` pages on `sms` SMs: about 2 programs per
    SM, at least ~16 pages a split, at most 32; 1 when the rows alone fill the GPU."""
    if rows >= sms:
        return 1
    return int(max(1, min(cdiv(2 * sms, rows), max(1, max_pages // 16), 32)))


def _rule_for(pipeline, layer):
    return None if pipeline.is_dense_layer(layer) else pipeline.stop_rule


def _generic_decode(q, k_cache, v_cache, page_table, seq_lens, order, count, *, sm_scale, rule, tail_lse,
                    bound_terms, num_splits, page_mass=False):
    rule = rule if rule is not None and rule.kind else None
    return decode_tk.paged_decode(q, k_cache, v_cache, page_table, seq_lens, order, count, sm_scale=sm_scale,
                                  rule=rule, tail_lse=tail_lse, bound_terms=bound_terms, num_splits=num_splits,
                                  page_mass=page_mass)


def run_layer(pipeline, ctx):
    plan, c, layer = ctx.plan, ctx.cache, ctx.layer
    q = ctx.q
    if q.stride(-1) != 1:
        q = q.contiguous()
    S = plan.num_splits
    if pipeline.is_dense_layer(layer):
        out, pages, _ = decode_tk.launch_decode(q, c.k[layer], c.v[layer], plan.page_table, plan.seq_lens,
                                                None, None, sm_scale=ctx.sm_scale, rule=None, num_splits=S,
                                                natural=True, out_dtype=q.dtype)
        return DecodeOut(out, pages, None)
    sp = spec(pipeline)
    if not sp.fused:
        return pipeline.run_generic(ctx, _generic_decode)
    rule = pipeline.stop_rule
    kind = rule.kind
    certified = kind is not None and kind.uses_bounds  # score_select writes the tail LSE of the bounds
    if sp.shadow_bits:
        order, count, tail = _shadow_launches(sp, q, c, layer, plan, ctx.sm_scale, certified)
        out, pages, tau = decode_tk.launch_decode(q, c.k[layer], c.v[layer], plan.page_table, plan.seq_lens,
                                                  order, count, sm_scale=ctx.sm_scale,
                                                  rule=rule if kind else None, tail_lse=tail, num_splits=S,
                                                  out_dtype=q.dtype)
        return DecodeOut(out, pages, tau)
    budget_pages = cdiv(sp.budget_tokens, plan.page_size) if sp.select else 0
    terms = None
    if kind is StopKind.CALIBRATED:
        terms = torch.empty(plan.batch_size, c.num_kv_heads, plan.page_table.shape[1], dtype=torch.float32,
                            device=q.device)
    if sp.score is ScoreKind.EXACT:
        a = b = c.k[layer]
    elif sp.score is ScoreKind.BOX:
        a, b = c.key_min[layer], c.key_max[layer]
    else:
        a = b = None
    if sp.within_splits and decode_tk.order_in_decode(q, c.k[layer], S):
        # measured faster on this GPU (kernel_sweep --tune): each split orders its own pages in the decode launch
        out, pages, tau = decode_tk.launch_decode(q, c.k[layer], c.v[layer], plan.page_table, plan.seq_lens,
                                                  None, None, sm_scale=ctx.sm_scale, rule=rule, num_splits=S,
                                                  out_dtype=q.dtype, order_from=(c.key_min[layer], c.key_max[layer]))
        return DecodeOut(out, pages, tau)
    phys = None
    if sp.within_splits:  # the decode then addresses K/V by physical page, one dependent load fewer
        phys = torch.empty(plan.batch_size, c.num_kv_heads, plan.page_table.shape[1], dtype=torch.int32,
                           device=q.device)
    order, count, tail = select_tk.score_select(
        q, a, b, plan.page_table, plan.seq_lens, plan.forced, num_kv_heads=c.num_kv_heads,
        page_size=plan.page_size, sm_scale=ctx.sm_scale, score=int(sp.score), select=sp.select,
        budget_pages=budget_pages, forced_only=sp.forced_only and plan.any_forcing, certified=certified,
        num_splits=S, max_kept=max(budget_pages, sp.max_forced_pages), terms_out=terms,
        last_first=kind is StopKind.CALIBRATED, within_splits=sp.within_splits, phys_out=phys)
    out, pages, tau = decode_tk.launch_decode(q, c.k[layer], c.v[layer], plan.page_table, plan.seq_lens,
                                              order, count, sm_scale=ctx.sm_scale, rule=rule if kind else None,
                                              tail_lse=tail, bound_terms=terms, num_splits=S, out_dtype=q.dtype,
                                              phys=phys)
    return DecodeOut(out, pages, tau)


def _shadow_launches(sp, q, c, layer, plan, sm_scale, certified):
    """Launch 1 (the first scorer keeps its budget; skipped for a key_shadow alone), then shadow_select."""
    from .kernels.key_shadow import triton as shadow_tk
    cand_order = cand_count = None
    if sp.select:
        budget1 = cdiv(sp.budget_tokens, plan.page_size)
        a, b = (c.key_min[layer], c.key_max[layer]) if sp.score is ScoreKind.BOX else (c.k[layer], c.k[layer])
        cand_order, cand_count, _ = select_tk.score_select(
            q, a, b, plan.page_table, plan.seq_lens, plan.forced, num_kv_heads=c.num_kv_heads,
            page_size=plan.page_size, sm_scale=sm_scale, score=int(sp.score), select=True, budget_pages=budget1,
            forced_only=False, certified=False, num_splits=1, max_kept=max(budget1, sp.max_forced_pages))
    budget = cdiv(sp.shadow_budget_tokens, plan.page_size)
    bits = sp.shadow_bits
    return shadow_tk.shadow_select(
        q, c.shadow_codes[bits][layer], c.shadow_step[bits][layer], c.key_min[layer], plan.page_table,
        plan.seq_lens, plan.forced, cand_order, cand_count, bits=bits, num_kv_heads=c.num_kv_heads,
        page_size=plan.page_size, sm_scale=sm_scale, budget_pages=budget, certified=certified,
        num_splits=plan.num_splits, max_kept=max(budget, sp.max_forced_pages))


def describe(pipeline) -> list[str]:
    sp = spec(pipeline)
    rule = pipeline.stop_rule
    lines = []
    dense = sorted(pipeline.dense_layers)
    decode = "paged_decode (online softmax over the page list; split-KV strided) + merge when num_splits > 1"
    if pipeline.reads_everything:
        return ["path: triton fused, dense: every layer launches " + decode]
    if dense:
        lines.append(f"dense layers {dense}: " + decode + " in natural page order")
    if not sp.fused:
        lines.append(f"path: triton generic ({sp.reason}): Python selectors (pipeline.select, torch ops) "
                     f"then the Triton {decode}")
        return lines
    what = {ScoreKind.NONE: "no scores (kept pages in natural order)",
            ScoreKind.BOX: "Quest box bound from key_min/key_max",
            ScoreKind.EXACT: "exact page max q.k (reads every key)"}[sp.score]
    sel = (f"keep forced + top pages under {sp.budget_tokens} tokens" if sp.select else
           "keep forced pages only" if sp.forced_only else "keep every page")
    extra = ", strided tail LSE of the bounds" if rule.kind is not None and rule.kind.uses_bounds else ""
    if rule.kind is StopKind.CALIBRATED:
        extra += " and each page's U + log n"
    stop = {None: "no stop",
            StopKind.STABILITY: f"stability stop (heuristic, not certified) every {rule.chunk_pages} pages",
            StopKind.CERTIFIED: f"certified stop (delta={rule.delta}) every {rule.chunk_pages} pages",
            StopKind.CALIBRATED: f"calibrated stop (heuristic, NOT certified: estimated unread mass <= "
                                 f"delta={rule.delta}) every {rule.chunk_pages} pages"}[rule.kind]
    if rule.kind and rule.acc_bf16:
        stop += ", running output rounded to bf16 after every chunk"
    if rule.kind is None:
        stop = "no stop"
    if sp.shadow_bits:
        shadow = (f"int{sp.shadow_bits} key shadow bound (q.k^ + |q|.step/2, max over tokens and group); keep "
                  f"forced + top pages under {sp.shadow_budget_tokens} tokens; order best-first{extra}")
        steps = ([f"score_select: {what}; {sel}"] if sp.select else []) + [f"shadow_select: {shadow}"]
    else:
        first = "the request's last page, then best-first" if rule.kind is StopKind.CALIBRATED else "best-first"
        if sp.within_splits:
            first = f"within each split (split s: pages p = s mod S): {first}"
        steps = [f"score_select: {what}; {sel}; order {first}{extra}"]
    steps += [f"paged_decode: {stop}",
              "merge (only when num_splits > 1): LSE merge of the splits, pages_read, tau_bound"]
    lines.append(f"path: triton fused, <= {len(steps)} launches per layer, no host sync, CUDA-graph capturable")
    lines += [f"  launch {i} {step}" for i, step in enumerate(steps, 1)]
    return lines
