"""Per-layer decode cost of the seed methods against Quest, as the graph path runs them (issue 17).

    python benchmarks/seed_methods_cost.py [--device cuda] [--batch 16] [--ctx 32768] [--shape llama-8b]
                                           [--out DIR] [--profile]

One sparse layer of one decode step (selection + paged decode + the stage's state update) on random
K/V, captured once as a CUDA graph and replayed (on the CPU: eager, the reference backend; timing only).
Rows, at the same budget and terminal:
  quest                 the fused Triton path (the baseline)
  attention_predictor   CNN over the history of every (request, KV head) + decode with the page-mass output;
                        `cycle` = mean over calibrate_every consecutive steps (one of them dense),
                        `predict` = a step that predicts (no calibration)
  attention_predictor-cheap   history 16, CNN every 4 steps, calibration every 10 (mean over 20 steps)
  attention_predictor-lean    history 8, CNN every 8 steps, calibration every 10 (mean over 40 steps)
  attention_predictor-fast    lean's CNN in bf16, calibration every 32 (mean over 32 steps)
  On CUDA a row's time is one CUDA graph of a whole cycle of the stage's clock (cycle_steps) divided by its
  steps, so the CNN's and the dense step's turns count; the median of single-step replays would hide them.
  ltri                  configs/ltri.yaml's keys (4 a span, int8): span close (k-means of the open window), span
                        scores, vote, span-to-page expansion
  ltri-r2               ltri with 2 representative keys a span (4 by default)
  ltri-bf16             ltri with its representative keys in the cache's dtype (rep_dtype: cache, the stage's default)
ratio = ms / quest's ms with the same terminal. --profile adds, per method, where one eager layer spends its
device time (torch.profiler: the kernels, launches a layer and each one's time) to the report:
seed_methods_profile.md. Targets (issue 17, H200, B=16, 32k):
attention_predictor <= 1.5x, ltri <= 1.2x. The ltri index is built from the cache's keys (k-means
reps; the prefill path picks reps by attention, same decode cost).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402  (benchmarks/harness.py)

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-8b": (32, 8, 128)}  # Hq, Hkv, D
TARGETS = {"attention_predictor": 1.5, "ltri": 1.2}  # issue 17: at most this many times Quest's per-layer cost


def _random_weights() -> str:
    from composable_kv.policies.attention_predictor.predictor import PredictorCNN, save_weights
    path = os.path.join(tempfile.mkdtemp(prefix="ckv-seed-"), "random.pt")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_weights(PredictorCNN(), path)  # untrained: same cost as trained weights
    return path


def policies(budget: int, terminal: str, weights: str) -> dict:
    art = {"stage": "art", "stop": "certified", "delta": 0.01} if terminal == "art" else {"stage": "attend"}
    return {
        "quest": [{"stage": "quest", "budget_tokens": budget}, art],
        "attention_predictor": [{"stage": "attention_predictor", "budget_tokens": budget, "weights": weights}, art],
        # configs/eval/attention_predictor-cheap.yaml's setting: 1/16 of the default's CNN work per step on average
        "attention_predictor-cheap": [{"stage": "attention_predictor", "budget_tokens": budget, "weights": weights,
                                       "history_steps": 16, "run_every": 4, "calibrate_every": 10,
                                       "calibrate_first": False}, art],
        # configs/eval/attention_predictor-lean.yaml's setting: 1/64 of the default's CNN work per step on average
        "attention_predictor-lean": [{"stage": "attention_predictor", "budget_tokens": budget, "weights": weights,
                                      "history_steps": 8, "run_every": 8, "calibrate_every": 10,
                                      "calibrate_first": False}, art],
        # configs/eval/attention_predictor-fast.yaml's setting: lean's CNN in bf16, calibration every 32 steps
        "attention_predictor-fast": [{"stage": "attention_predictor", "budget_tokens": budget, "weights": weights,
                                      "history_steps": 8, "run_every": 8, "calibrate_every": 32,
                                      "calibrate_first": False, "cnn_precision": "bf16"}, art],
        # configs/ltri.yaml's keys: 4 a span as int8 with a scale a key
        "ltri": [{"stage": "ltri", "budget_tokens": budget, "rep_dtype": "int8"}, art],
        # the stage's default keys: the cache's dtype (bf16 here), twice the span scoring's bytes
        "ltri-bf16": [{"stage": "ltri", "budget_tokens": budget}, art],
        # configs/eval/ltri-r2-eighth.yaml's representative keys: 2 a span (ltri.yaml: 4), half the span scoring's bytes
        "ltri-r2": [{"stage": "ltri", "budget_tokens": budget, "reps_per_span": 2}, art],
    }


def build(name, stages, shape, B, ctx, device, dtype, backend):
    import composable_kv as ckv
    Hq, Hkv, D = SHAPES[shape]
    pipe = ckv.compile({"name": name, "page_size": 16, "stages": stages}, backend=backend)
    g = torch.Generator(device=device).manual_seed(0)
    cache, _ = harness.filled_cache(pipe, B, ctx, Hkv, D, dtype, device, g)
    q = torch.randn(B, Hq, D, generator=g, device=device).to(dtype)
    return pipe, cache, q


def cycle_steps(pipe, horizon: int = 10 ** 6) -> int:
    """Decode steps after which the stages' periodic work repeats (the lcm of their clock_periods); a period past
    `horizon` steps never comes round in a timing (the `predict` row's calibrate_every of 10**9)."""
    return math.lcm(1, *(p for stage in pipe.selectors for p in stage.clock_periods if p <= horizon))


def time_layer(pipe, cache, q, device, reps: int) -> float:
    """Mean ms a step of one layer's pipe.run over a whole cycle of the stage's clock (cycle_steps): on CUDA one
    graph of the cycle's steps, replayed (median over replays / steps), eager elsewhere (median of single steps)."""
    for _ in range(3):  # grows the stage's tables, builds indexes, compiles kernels
        pipe.run(q, cache, 0)
    if device.type != "cuda":
        return harness.median_ms(lambda: pipe.run(q, cache, 0), calls=reps)
    return harness.graph_ms(lambda: pipe.run(q, cache, 0), warmup_ms=10, rep_ms=max(50, reps * 5),
                            calls=cycle_steps(pipe))


def profile_layer(pipe, cache, q, device, calls: int = 5, top: int = 15) -> tuple[int, float, list[tuple]]:
    """One eager layer under torch.profiler: (launches a layer, device us a layer, [(kernel, calls a layer,
    us a layer)] the `top` costliest). On the CPU: the ops and their CPU time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            pipe.run(q, cache, 0)
        if cuda:
            torch.cuda.synchronize()
    events = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) if cuda \
            else e.self_cpu_time_total
        if us > 0 and (not cuda or getattr(e, "device_type", None) != torch.autograd.DeviceType.CPU):
            events.append((e.key, e.count / calls, us / calls))
    events.sort(key=lambda t: -t[2])
    return round(sum(c for _, c, _ in events)), sum(u for _, _, u in events), events[:top]


def profile_table(name: str, terminal: str, prof, device) -> str:
    launches, total, events = prof
    what = "kernel launches" if device.type == "cuda" else "torch ops (CPU, nested ops counted too)"
    rows = "\n".join(f"| `{k[:70]}` | {c:g} | {u:.1f} |" for k, c, u in events)
    return (f"### {name} ({terminal}): {launches} {what}, {total:.1f} us a layer\n\n"
            f"| kernel / op | calls a layer | us a layer |\n|---|---:|---:|\n{rows}\n")


def rows_for(shape, B, ctx, device, terminal, budget, reps, profiles=None, methods=None) -> list[dict]:
    backend = "triton" if device.type == "cuda" else "reference"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = _random_weights()
    rows, base = [], None
    for name, stages in policies(budget, terminal, weights).items():
        if methods is not None and name not in methods:
            continue
        pipe, cache, q = build(name, stages, shape, B, ctx, device, dtype, backend)
        settings = [("", None)]
        if name == "attention_predictor":
            settings = [("cycle", None), ("predict", 10 ** 9)]
        for tag, every in settings:
            if every is not None:  # no calibration step from here on: every replay predicts
                pipe.selectors[0].calibrate_every = every
                state = cache.stage_state(pipe.selectors[0])
                for hist in state.history.values():
                    hist.steps.fill_(2)
                    hist.seeded.fill_(False)
            ms = time_layer(pipe, cache, q, device, reps)
            if profiles is not None:
                profiles.append(profile_table(name + (f" ({tag})" if tag else ""), terminal,
                                              profile_layer(pipe, cache, q, device, max(5, cycle_steps(pipe))),
                                              device))
            base = ms if name == "quest" else base
            rows.append({"method": name + (f" ({tag})" if tag else ""), "terminal": terminal, "shape": shape,
                         "batch": B, "ctx": ctx, "budget": budget, "ms_per_layer": round(ms, 4),
                         "x_quest": round(ms / base, 3), "target_x": TARGETS.get(name.split("-")[0], "")})
        del pipe, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/seed_methods_cost.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--terminals", default="attend,art")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for the report (.json rows and .md table)")
    p.add_argument("--methods", default=None,
                   help="comma-separated rows to run (default: all; quest first, as the others' baseline)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one eager layer per method (seed_methods_profile.md in --out, or printed)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    methods = None
    if args.methods:
        methods = args.methods.split(",")
        known = list(policies(1, "attend", None))
        bad = [m for m in methods if m not in known]
        if bad or methods[0] != "quest":
            p.error(f"--methods: from {', '.join(known)}, quest first (the baseline); got {args.methods}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu (small --batch/--ctx)")
    rows, profiles = [], [] if args.profile else None
    for terminal in args.terminals.split(","):
        rows += rows_for(args.shape, args.batch, args.ctx, device, terminal, args.budget, args.reps, profiles,
                         methods)
    meta = harness.run_meta()
    how = "CUDA-graph replay" if device.type == "cuda" else "eager"
    table = harness.markdown_table(rows)
    print(f"device: {meta['gpu']}, torch {torch.__version__}; one sparse layer per decode step, {how}\n{table}")
    if args.out:
        harness.write_report(args.out, "seed_methods_cost", meta, rows, f"One sparse layer per decode step, {how}.\n\n"
                             + table, title="Seed methods: per-layer cost against Quest")
    if profiles:
        text = (f"# Seed methods: where one eager layer's time goes\n\n{meta['gpu']}, commit {meta['commit']}, "
                f"B={args.batch}, ctx={args.ctx}, {args.shape}; torch.profiler over a cycle of each stage's clock (at least 5 eager layers), per layer.\n\n"
                + "\n".join(profiles))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "seed_methods_profile.md").write_text(text)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
