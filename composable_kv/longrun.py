"""Long decode run: many steps of a full batch whose requests finish and are replaced by new arrivals,
through the fused pipeline replayed as one CUDA graph per policy (all layers).

The batch keeps a fixed shape: B slots, each always holding a live request (a finished request's slot
is refilled by an arrival in the same step), and the step plan is copied into static buffers padded to
the longest possible request (`max_len + max_new` tokens), so one graph captured at the start serves
every step. Per step: reserve + write one new K/V token per request and layer (random, like a model's),
plan, copy the plan into the static buffers, fill q, replay. Tracked:
  * GPU memory: torch.cuda.memory_allocated / memory_reserved at the end of every step; drift = max - the
    value after warm-up;
  * non-finite outputs: counted on the device every step (no host sync), read at the end;
  * spot checks every `spot_every` steps: the same step through the reference path (pure torch, fp32):
    max |fused - reference| where pages_read agree (a stop decision may flip at its threshold between
    bf16 and fp32 sums; those rows are reported apart), the agreement, and the certified tau_bound <= delta.

    python -m composable_kv.longrun --out DIR                      # the GPU run (10,000 steps x B=64)
    python -m composable_kv.longrun --dry-run --out DIR            # tiny, on the CPU (seconds)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import time
from pathlib import Path

import torch

import composable_kv as ckv
from composable_kv.runtime import StaticPlan

DEFAULT_CONFIGS = ("configs/quest_art.yaml", "configs/sink_window_quest_art.yaml")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass
class Options:
    configs: tuple = DEFAULT_CONFIGS
    steps: int = 10_000
    batch: int = 64
    layers: int = 4                # the first two are dense in the shipped configs
    kv_heads: int = 3              # the default model (SmolLM2-135M): 9 query / 3 KV heads of 64
    group: int = 3
    head_dim: int = 64
    min_len: int = 512             # prompt tokens of an arriving request
    max_len: int = 8192
    min_new: int = 16              # decode tokens before it finishes
    max_new: int = 512
    spot_every: int = 500
    warmup: int = 50               # steps before the memory baseline is taken
    dtype: str = "bfloat16"
    device: str = "cuda"
    graphs: bool = True
    seed: int = 0
    time_budget_s: float = 110.0   # per policy: stop early (and say so) past this
    tol: float = 3e-2              # |fused - reference| allowed at a spot check (bf16 dots)


def dry_run_options(**kw) -> Options:
    base = dict(steps=24, batch=4, layers=3, kv_heads=2, group=2, head_dim=16, min_len=1, max_len=80,
                min_new=1, max_new=12, spot_every=8, warmup=4, dtype="float32", device="cpu", graphs=False,
                tol=2e-4)
    return Options(**(base | kw))


class Workload:
    """B slots of live requests in a paged cache; finished requests are freed and replaced."""

    def __init__(self, opt: Options, cache: ckv.PagedKVCache, seed: int):
        self.opt, self.cache = opt, cache
        self.rng = random.Random(seed)
        self.gen = torch.Generator(device=cache.device).manual_seed(seed)
        self.dtype = cache.dtype
        self.arrivals = self.finished = self.tokens = 0
        self.slots = [self._admit(initial=True) for _ in range(opt.batch)]

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, device=self.cache.device, dtype=torch.float32).to(self.dtype)

    def _admit(self, initial=False):
        o, c = self.opt, self.cache
        n = self.rng.randint(o.min_len, o.max_len)
        sid = c.add_sequence()
        shape = (c.num_layers, n, c.num_kv_heads, c.head_dim)
        c.append([sid], [n], self._randn(*shape), self._randn(*shape))
        new = self.rng.randint(o.min_new, o.max_new)
        if initial:  # spread the first finishes out
            new = self.rng.randint(1, new)
        self.arrivals += 0 if initial else 1
        return sid, n + new

    def step(self) -> list[int]:
        """Replace finished requests, then append one decode token per request (all layers)."""
        c = self.cache
        for i, (sid, target) in enumerate(self.slots):
            if c.seq_len(sid) >= target:
                c.free(sid)
                self.finished += 1
                self.slots[i] = self._admit()
        ids = [sid for sid, _ in self.slots]
        slots = c.reserve(ids, [1] * len(ids))
        shape = (len(ids), c.num_kv_heads, c.head_dim)
        for layer in range(c.num_layers):
            c.write(layer, slots, self._randn(*shape), self._randn(*shape))
        self.tokens += len(ids)
        return ids


def run_policy(config: str, opt: Options, log=print) -> dict:
    dev = torch.device(opt.device)
    cuda = dev.type == "cuda"
    pipe = ckv.compile(config)
    ref = ckv.compile(config, backend="reference")
    page = pipe.page_size
    max_pages = -(-(opt.max_len + opt.max_new) // page)
    cache = ckv.PagedKVCache(opt.layers, opt.kv_heads, opt.head_dim, opt.batch * (max_pages + 1) + 8,
                             page_size=page, dtype=DTYPES[opt.dtype], device=dev,
                             summaries=pipe.required_summaries | ref.required_summaries)
    work = Workload(opt, cache, opt.seed)
    Hq = opt.kv_heads * opt.group
    gen = torch.Generator(device=cache.device).manual_seed(opt.seed + 1)
    static_q = torch.zeros(opt.layers, opt.batch, Hq, opt.head_dim, dtype=cache.dtype, device=cache.device)

    ids = work.step()
    static = StaticPlan(pipe.plan(cache, ids), max_pages)
    num_splits = static.plan.num_splits
    pipe.use_plan(static.plan)
    run_all = lambda: [pipe.run(static_q[layer], cache, layer) for layer in range(opt.layers)]  # noqa: E731
    outs = run_all()  # compile the kernels, eagerly
    graph, graph_error = None, None
    if cuda and opt.graphs:
        try:
            from .cuda_graphs import capture
            graph, outs = capture(run_all)
        except Exception as e:  # reported in the results; the run goes on eagerly
            graph, graph_error = None, f"{type(e).__name__}: {e}"
            torch.cuda.synchronize()
            outs = run_all()
    bad = torch.zeros((), dtype=torch.int64, device=cache.device)
    delta = pipe.stop_rule.delta if pipe.stop_rule.kind == "certified" else None
    spots, mem, t_steps = [], [], []
    baseline = None
    t0 = time.perf_counter()
    stopped_early = False
    done = 0
    for step in range(opt.steps):
        ts = time.perf_counter()
        if step:
            ids = work.step()
            static.load(pipe.plan(cache, ids, num_splits=num_splits))
            pipe.use_plan(static.plan)
        static_q.normal_(generator=gen)
        if graph is not None:
            graph.replay()
        else:
            outs = run_all()
        for res in outs:
            bad += (~torch.isfinite(res.out)).sum()
        if opt.spot_every and (step % opt.spot_every == 0 or step == opt.steps - 1):
            spots.append(spot_check(ref, cache, ids, static_q, outs, num_splits, delta, step))
        if cuda:
            torch.cuda.synchronize() if step < opt.warmup or step % 100 == 0 else None
            mem.append((torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)))
            if step == opt.warmup:
                baseline = mem[-1]
        t_steps.append(time.perf_counter() - ts)
        done = step + 1
        if time.perf_counter() - t0 > opt.time_budget_s:
            stopped_early = True
            break
        if step % 1000 == 0:
            log(f"  {Path(config).stem}: step {step}, {work.arrivals} arrivals, "
                f"{1e3 * (time.perf_counter() - t0) / done:.2f} ms/step")
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    after = [m for i, m in enumerate(mem) if i >= opt.warmup]
    result = dict(
        config=config, policy=pipe.name, steps=done, steps_requested=opt.steps, stopped_early=stopped_early,
        batch=opt.batch, layers=opt.layers, kv_heads=opt.kv_heads, q_heads=Hq, head_dim=opt.head_dim,
        dtype=opt.dtype, device=str(dev), cuda_graph=graph is not None, graph_error=graph_error,
        backend=pipe.backend_for(dev), num_splits=num_splits,
        arrivals=work.arrivals, finished=work.finished, decode_tokens=work.tokens, wall_s=round(wall, 2),
        ms_per_step=round(1e3 * wall / max(done, 1), 3),
        ms_per_step_median=round(1e3 * sorted(t_steps)[len(t_steps) // 2], 3) if t_steps else None,
        nonfinite_outputs=int(bad), spot_checks=len(spots),
        spot_max_abs_err=max((s["max_abs_err"] for s in spots), default=None),
        spot_max_abs_err_flipped=max((s["max_abs_err_flipped"] for s in spots), default=None),
        spot_pages_agree=(sum(s["pages_agree"] for s in spots) / max(1, sum(s["pages_total"] for s in spots))),
        spot_max_tau=max((s["max_tau"] for s in spots if s["max_tau"] is not None), default=None),
        spot_within_tol=all(s["max_abs_err"] <= opt.tol for s in spots), tol=opt.tol, delta=delta,
        spots=spots)
    if baseline is not None and after:
        mib = 2 ** 20
        result.update(mem_baseline_mib=round(baseline[0] / mib, 2),
                      mem_drift_max_mib=round((max(a for a, _ in after) - baseline[0]) / mib, 3),
                      mem_drift_final_mib=round((after[-1][0] - baseline[0]) / mib, 3),
                      reserved_drift_max_mib=round((max(r for _, r in after) - baseline[1]) / mib, 3),
                      mem_peak_mib=round(torch.cuda.max_memory_allocated(dev) / mib, 2))
    return result


def spot_check(ref, cache, ids, static_q, outs, num_splits, delta, step) -> dict:
    """The same step through the reference path; compares outputs, pages_read and the certified tau."""
    ref.plan(cache, ids, num_splits=num_splits)
    err, err_flipped, agree, total, tau = 0.0, 0.0, 0, 0, None
    for layer, res in enumerate(outs):
        r = ref.run(static_q[layer].clone(), cache, layer)
        same = r.pages_read == res.pages_read  # [B, Hkv]
        rows = same.repeat_interleave(r.out.shape[1] // same.shape[1], 1)  # [B, Hq]
        diff = (r.out.float() - res.out.float()).abs().amax(-1)  # [B, Hq]
        # where a stop decision flipped at its threshold (bf16 vs fp32 sums) the two reads differ by design
        err = max(err, float(diff[rows].max()) if bool(rows.any()) else 0.0)
        err_flipped = max(err_flipped, float(diff[~rows].max()) if bool((~rows).any()) else 0.0)
        agree += int(same.sum())
        total += same.numel()
        if res.tau_bound is not None:
            tau = max(tau or 0.0, float(res.tau_bound.max()))
            if delta is not None and tau > delta * (1 + 1e-4):
                raise AssertionError(f"step {step} layer {layer}: tau_bound {tau} > delta {delta}")
    return dict(step=step, max_abs_err=err, max_abs_err_flipped=err_flipped, pages_agree=agree, pages_total=total,
                max_tau=tau)


def markdown(results: list[dict], meta: dict) -> str:
    cols = [("policy", "policy"), ("steps", "steps"), ("batch", "batch"), ("layers", "layers"),
            ("arrivals", "arrivals"), ("ms_per_step", "ms/step"), ("cuda_graph", "graph"),
            ("mem_baseline_mib", "alloc after warm-up (MiB)"), ("mem_drift_max_mib", "max drift (MiB)"),
            ("reserved_drift_max_mib", "reserved drift (MiB)"), ("nonfinite_outputs", "non-finite outputs"),
            ("spot_checks", "spot checks"), ("spot_max_abs_err", "max abs(fused - ref)"),
            ("spot_pages_agree", "pages_read agree"),
            ("spot_max_abs_err_flipped", "max abs diff where a stop flipped"), ("spot_max_tau", "max tau_bound")]
    lines = [f"Long run on {meta['device_name']} ({meta['torch']}, triton {meta['triton']}); "
             f"{results[0]['q_heads']} query / {results[0]['kv_heads']} KV heads of {results[0]['head_dim']}, "
             f"{results[0]['dtype']}, prompts {meta['min_len']}-{meta['max_len']} tokens, "
             f"{meta['min_new']}-{meta['max_new']} new tokens each.", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append("n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    early = [r["policy"] for r in results if r["stopped_early"]]
    if early:
        lines += ["", f"Stopped early by the time budget: {early}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m composable_kv.longrun", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="policy YAML (repeatable); default: quest_art and "
                                                     "sink_window_quest_art")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (seconds)")
    for f in dataclasses.fields(Options):
        if f.name in ("configs", "graphs"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    p.add_argument("--no-graphs", action="store_true", help="eager launches instead of CUDA-graph replay")
    p.add_argument("--out", default="longrun-out", help="folder for longrun.json and longrun.md")
    a = p.parse_args(argv)
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(Options)
             if f.name not in ("configs", "graphs") and getattr(a, f.name) is not None}
    opt = dry_run_options(**given) if a.dry_run else Options(**given)
    if a.config:
        opt.configs = tuple(a.config)
    if a.no_graphs:
        opt.graphs = False
    if opt.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --dry-run (or --device cpu) on a machine without a GPU")
    if not opt.min_len <= opt.max_len or not 1 <= opt.min_new <= opt.max_new:
        p.error("need min_len <= max_len and 1 <= min_new <= max_new")
    import triton
    meta = dict(device_name=torch.cuda.get_device_name() if opt.device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, triton=triton.__version__, **dataclasses.asdict(opt))
    results = []
    for config in opt.configs:
        print(f"{config}: {opt.steps} steps, batch {opt.batch}, {opt.layers} layers", flush=True)
        results.append(run_policy(config, opt, log=lambda s: print(s, flush=True)))
        r = results[-1]
        print(f"  done: {r['steps']} steps in {r['wall_s']} s ({r['ms_per_step']} ms/step), "
              f"{r['nonfinite_outputs']} non-finite, drift {r.get('mem_drift_max_mib', 'n/a')} MiB, "
              f"max |fused - ref| {r['spot_max_abs_err']}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "longrun.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=str))
    (out / "longrun.md").write_text(markdown(results, meta))
    print((out / "longrun.md").read_text())
    ok = all(r["nonfinite_outputs"] == 0 and r["spot_within_tol"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
