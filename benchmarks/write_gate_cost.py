"""Decode speed of the write-gated cache vs dense on one attention layer (GPU).

    python benchmarks/write_gate_cost.py --batch 64 --context 8192 --out DIR

Random K/V and queries with Llama-8B attention shapes (32 query / 8 KV heads of 128, bf16, pages of
16) and random gates that admit a share `--admit` of the tokens leaving the 256-token window. Per
policy: the fused decode of one layer (CUDA events, median), the host plan of one layer (page tables
of the B x Hkv head sequences, for the gated cache), pages held and pages read per step.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import composable_kv as ckv  # noqa: E402
from composable_kv.ints import cdiv  # noqa: E402
from composable_kv.policies.write_gate.admission import GatedPipeline  # noqa: E402


def _time_gpu(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # the CPU dry run (tests): wall time
        return 1e3 * statistics.median(_wall(fn) for _ in range(iters))
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _policy(name, stages, gate=None):
    head = [{"stage": "write_gate", **gate}] if gate is not None else []
    backend = "triton" if torch.cuda.is_available() else "reference"
    return ckv.compile({"name": name, "page_size": 16, "stages": head + stages}, backend=backend)


def run(args) -> list[dict]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, T, Hq, H, D, S = args.batch, args.context, args.q_heads, args.kv_heads, args.head_dim, 16
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(B * T, H, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B * T, H, D, device=dev, dtype=dt, generator=g)
    q = torch.randn(B, Hq, D, device=dev, dtype=dt, generator=g)
    read = [{"stage": "attend"}]
    quest_art = [{"stage": "quest", "budget_tokens": args.budget}, {"stage": "art", "stop": "certified", "delta": 0.01}]
    rows = []

    pages_per_seq = cdiv(T, S)
    need = frozenset({"key_minmax", "value_norm"})
    dense = ckv.PagedKVCache(1, H, D, B * pages_per_seq, S, dt, dev, need)
    ids = [dense.add_sequence() for _ in range(B)]
    dense.write(0, dense.reserve(ids, [T] * B), k, v)
    for name, stages in (("dense", read), (f"quest{args.budget}_art", quest_art)):
        pipe = _policy(name, stages)
        t0 = time.perf_counter()
        pipe.plan(dense, ids)
        plan_ms = 1e3 * (time.perf_counter() - t0)
        res = pipe.run(q, dense, 0)
        ms = _time_gpu(lambda: pipe.run(q, dense, 0), args.iters)
        rows.append(dict(policy=name, admit=1.0, decode_ms=ms, plan_ms=plan_ms,
                         pages_held=B * pages_per_seq * H, pages_read=int(res.pages_read.sum())))
    del dense

    for p in args.admit:
        gate = {"threshold": 0.5, "window_tokens": args.window}
        cache = GatedPipeline(_policy("gate", quest_art, gate)).make_cache(
            1, H, D, B * H * (pages_per_seq + 1), dtype=dt, device=dev)
        rids = [cache.add_sequence() for _ in range(B)]
        gates = (torch.rand(B * T, H, device=dev, generator=g) < p).float()  # g in {0, 1}: admit with prob p
        t0 = time.perf_counter()
        cache.write(0, cache.reserve(rids, [T] * B), k, v, g=gates)
        build_s = time.perf_counter() - t0
        for name, stages in ((f"write_gate{p:.2f}", read), (f"write_gate{p:.2f}_quest{args.budget}_art", quest_art)):
            gp = GatedPipeline(_policy(name, stages, gate))
            gp.plan(cache, rids)
            inner = gp.sparse
            t0 = time.perf_counter()
            inner.plan(cache.pool, cache.layer_seq_ids(0, rids))
            plan_ms = 1e3 * (time.perf_counter() - t0)
            qh = q.view(B * H, Hq // H, D)
            res = inner.run(qh, cache.pool, 0)
            ms = _time_gpu(lambda: inner.run(qh, cache.pool, 0), args.iters)
            full = gp.run(q, cache, 0)  # the whole per-layer call (host plan + decode) agrees with the inner one
            assert torch.equal(full.pages_read.flatten(), res.pages_read.flatten())
            rows.append(dict(policy=name, admit=p, decode_ms=ms, plan_ms=plan_ms, pages_held=cache.pages_used(),
                             pages_read=int(res.pages_read.sum()), build_s=build_s))
        del cache
        torch.cuda.empty_cache()
    base = rows[0]["decode_ms"]
    for r in rows:
        r["speedup_vs_dense"] = base / r["decode_ms"]
        r["memory_vs_dense"] = r["pages_held"] / rows[0]["pages_held"]
    return rows


def table(rows, args) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU dry run (reference path, fp32)"
    lines = [f"write_gate decode, one layer: batch {args.batch}, context {args.context}, {args.q_heads}/{args.kv_heads} "
             f"heads x {args.head_dim}, bf16, page 16, window {args.window}, budget {args.budget}; {gpu}",
             "| policy | admitted | fused decode ms | speedup vs dense | host plan ms | pages held (vs dense) | pages read |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['admit']:.2f} | {r['decode_ms']:.3f} | {r['speedup_vs_dense']:.2f}x | "
                     f"{r['plan_ms']:.1f} | {r['pages_held']} ({100 * r['memory_vs_dense']:.0f}%) | {r['pages_read']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/write_gate_cost.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--admit", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = run(args)
    text = table(rows, args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "write_gate_bench.md").write_text(text + "\n")
        (out / "write_gate_bench.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        with open(out / "write_gate_bench.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
