"""Decode cost of Write-Gated KV against dense: one attention layer, and end to end (GPU).

    python benchmarks/write_gate_cost.py --batch 64 --context 8192 --out DIR          # one layer
    python benchmarks/write_gate_cost.py --e2e --batch 16 --context 32768 --out DIR   # tokens/s, whole model
    python benchmarks/write_gate_cost.py --e2e ... --layers fused,modules             # write_gate on both layers

One layer: random K/V and queries with Llama-8B attention shapes (32 query / 8 KV heads of 128, bf16,
pages of 16) and random gates that admit a share `--admit` of the tokens leaving the window. Per policy:
the fused decode of the layer, and for the gated cache the device work the decode step adds per layer:
the write of one token per request (gate, ring update, swap moves, K/V, page summaries and finalization)
and the layer's plan from the triples' device tables (`plan ms`); CUDA events (median), pages held and
read. The write is timed on two caches filled alike, before / after issue 17's kernel: the torch
reference ops (`reference`) and the one Triton kernel (`triton`, kernels/gated_write), each with the gate
MLP run by the write (a random GateMLP calibrated to admit ~`--admit`, and a Llama rotary computed per
call for it, as the session's `model_rope` does), with g given, and (GPU) replayed from a CUDA graph of
20 writes; `ops` counts the device ops of one write (torch profiler: kernels and copies). Timed writes
advance the positions; the state is put back after each measurement, so replays stay in the pages.

End to end (`--e2e`): `hf.PolicySession` on a model of `--model` shape (benchmarks/e2e.py SHAPES, random
weights) with random K/V in place of a prefill (e2e.SyntheticPrefill), one warm-up/capture step, then
`--steps` timed steps; tokens/s of ckv dense (fused layers and transformers' modules) and of write_gate
stacks on the decode layers of `--layers` (fused: rotary, then the gated cache's write; modules:
transformers' layers) (the gate: random weights whose bias admits about `--admit` of random keys; the row
reports the share the cache actually admitted). Issue 17's target: write_gate >= 1.5x ckv dense (fused
layers) tokens/s at 32k, B=16. The path column says which decode path and layers ran.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402  (benchmarks/harness.py)
import composable_kv as ckv  # noqa: E402
from composable_kv.ints import cdiv  # noqa: E402
from composable_kv.policies.write_gate.admission import GatedPipeline  # noqa: E402
from composable_kv.policies.write_gate.gated_cache import GatedSlots  # noqa: E402


def _policy(name, stages, gate=None, backend=None):
    head = [{"stage": "write_gate", **gate}] if gate is not None else []
    backend = backend or ("triton" if torch.cuda.is_available() else "reference")
    return ckv.compile({"name": name, "page_size": 16, "stages": head + stages}, backend=backend)


def _rope(D: int):
    """positions [B] -> cos, sin [B, D] fp32: a Llama rotary computed per call (the model's module stands here)."""
    def rope(positions):
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=positions.device, dtype=torch.float32) / D))
        f = positions.float()[:, None] * inv[None]
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()
    return rope


def launches(fn) -> int:
    """Device ops of one call: CUDA kernels + copies/memsets (torch profiler) on the GPU; on the CPU, the torch
    ops dispatched (views aside) plus Triton launches."""
    if torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter, jit

    class Count(TorchDispatchMode):
        n, in_launch = 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not (Count.in_launch or func.is_view or func.overloadpacket.__name__ in ("detach", "lift_fresh")):
                Count.n += 1
            return func(*args, **(kwargs or {}))
    runs = {cls: cls.run for cls in (jit.JITFunction, interpreter.InterpretedFunction)}

    def launch(cls):  # a Triton launch is one device op (the interpreter's own torch calls are not ours)
        def run(self, *a, **k):
            Count.n += 1
            Count.in_launch = True
            try:
                return runs[cls](self, *a, **k)
            finally:
                Count.in_launch = False
        return run
    for cls in runs:
        cls.run = launch(cls)
    try:
        with Count():
            fn()
    finally:
        for cls, run in runs.items():
            cls.run = run
    return Count.n


def run_layer(args) -> list[dict]:
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
        pipe.plan(dense, ids)
        res = pipe.run(q, dense, 0)
        ms = harness.median_ms(lambda: pipe.run(q, dense, 0), calls=args.iters)
        rows.append(dict(policy=name, admit=1.0, decode_ms=ms, write_ms=float("nan"), plan_ms=float("nan"),
                         pages_held=B * pages_per_seq * H, pages_read=int(res.pages_read.sum())))
    del dense

    graph_writes = 20  # writes per captured graph (then the state is put back, so replays stay in the pages)
    steps = 2 * (args.iters + 5) + graph_writes + 5  # per cache: eager g given, eager gate, the graph block
    backends = ["reference", "triton"] if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" \
        else ["reference"]
    for p in args.admit:
        gate = {"threshold": 0.5, "window_tokens": args.window}
        mlp = calibrated_gate_mlp(1, H, D, p, 0.5).to(dev)
        gates = (torch.rand(B * T, H, device=dev, generator=g) < p).float()  # g in {0, 1}: admit with prob p
        k1, v1 = k[:B].clone(), v[:B].clone()
        g1 = (torch.rand(B, H, device=dev, generator=g) < p).float()
        times, caches = {}, {}
        for backend in backends:  # reference: the former torch write (~100 ops a layer); triton: one kernel
            cache = GatedPipeline(_policy("gate", quest_art, gate, backend)).make_cache(
                1, H, D, B * H * (cdiv(T + steps, S) + 1) + 1, dtype=dt, device=dev, gate=mlp, rope=_rope(D))
            assert cache.write_backend == backend, cache.write_path
            rids = [cache.add_sequence() for _ in range(B)]
            build_s = harness.wall_ms(lambda: cache.write(0, cache.reserve(rids, [T] * B), k, v, g=gates)) / 1e3
            cache.reserve_ahead(rids, T + steps)
            pos = torch.full((B,), T, dtype=torch.long, device=dev)
            state = [cache.kept, cache.n_global, cache.ring_slot, cache.ring_admit, pos]
            saved = [t.clone() for t in state]

            def restore():
                for t, s0 in zip(state, saved):
                    t.copy_(s0)

            def write_one(with_g: bool):
                cache.write(0, GatedSlots(rids, [1] * B, pos), k1, v1, g=g1 if with_g else None)
                pos.add_(1)  # the next token's position, on the device
            t = {}
            for with_g, tag in ((True, "g"), (False, "gate")):  # g given / the gate MLP run by the write
                t[f"{tag}_ms"] = harness.median_ms(lambda: write_one(with_g), calls=args.iters)
                restore()
                t[f"{tag}_ops"] = launches(lambda: write_one(with_g))
                restore()
            if dev.type == "cuda":
                def block():
                    for _ in range(graph_writes):
                        write_one(False)
                    restore()
                t["graph_ms"] = harness.graph_ms(block, calls=1) / graph_writes
                restore()
            times[backend], caches[backend] = t, (cache, rids, build_s)
        cache, rids, build_s = caches[backends[-1]]  # its state is the prefill's again (restore)
        w = times[backends[-1]]
        for name, stages in ((f"write_gate{p:.2f}", read), (f"write_gate{p:.2f}_quest{args.budget}_art", quest_art)):
            gp = GatedPipeline(_policy(name, stages, gate))
            gp.plan(cache, rids)
            plan_ms = harness.median_ms(lambda: gp._layer_plan(cache, 0), calls=args.iters)
            inner = gp._pipe(0)
            qh = q.view(B * H, Hq // H, D)
            res = inner.run(qh, cache.pool, 0)
            ms = harness.median_ms(lambda: inner.run(qh, cache.pool, 0), calls=args.iters)
            full = gp.run(q, cache, 0)  # the whole per-layer call (device plan + decode) agrees with the inner one
            assert torch.equal(full.pages_read.flatten(), res.pages_read.flatten())
            row = dict(policy=name, admit=p, decode_ms=ms, write_ms=w["gate_ms"], plan_ms=plan_ms,
                       write_path=cache.write_path, pages_held=cache.pages_used(),
                       pages_read=int(res.pages_read.sum()), build_s=build_s)
            for backend, t in times.items():
                row.update({f"{backend}_{key}": val for key, val in t.items()})
            rows.append(row)
        del cache, caches
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["decode_ms"]
    for r in rows:
        layer_ms = r["decode_ms"] + (0 if r["write_ms"] != r["write_ms"] else r["write_ms"] + r["plan_ms"])
        r["layer_ms"] = layer_ms
        r["speedup_vs_dense"] = base / layer_ms
        r["memory_vs_dense"] = r["pages_held"] / rows[0]["pages_held"]
    return rows


def layer_table(rows, args) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU dry run (fp32)"
    nan = float("nan")

    def pair(r, key, fmt):  # "reference / triton"
        return " / ".join(fmt.format(r.get(f"{b}_{key}", nan)) for b in ("reference", "triton"))
    lines = [f"write_gate decode, one layer: batch {args.batch}, context {args.context}, "
             f"{args.q_heads}/{args.kv_heads} heads x {args.head_dim}, bf16, page 16, window {args.window}, budget {args.budget}; {gpu}",
             "Gated write of one token a request (ring window, move, K/V, summaries), torch reference / Triton kernel:",
             "with the gate MLP inside the write (the decode path: rotary for the gate, then the write), with g given, and",
             "replayed from a CUDA graph (gate inside); ops = device ops of one call (CUDA kernels and copies on the GPU).",
             "layer ms = fused decode + the write the cache runs (" + (rows[-1].get("write_path", "") if rows else "") + ") + device plan.",
             "| policy | admitted | fused decode ms | write ms (gate inside) | write ms (g given) | write ms (graph) "
             "| write ops (gate inside) | device plan ms | layer ms | speedup vs dense "
             "| pages holding tokens (vs dense) | pages read |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gated = "reference_gate_ms" in r
        lines.append(f"| {r['policy']} | {r['admit']:.2f} | {r['decode_ms']:.3f} | "
                     f"{pair(r, 'gate_ms', '{:.3f}') if gated else '-'} | {pair(r, 'g_ms', '{:.3f}') if gated else '-'} | "
                     f"{pair(r, 'graph_ms', '{:.4f}') if gated else '-'} | {pair(r, 'gate_ops', '{}') if gated else '-'} | "
                     f"{r['plan_ms']:.3f} | {r['layer_ms']:.3f} | {r['speedup_vs_dense']:.2f}x | "
                     f"{r['pages_held']} ({100 * r['memory_vs_dense']:.0f}%) | {r['pages_read']} |")
    return "\n".join(lines)


# -- end to end --------------------------------------------------------------------------------------

def calibrated_gate_mlp(layers: int, heads: int, head_dim: int, admit: float, threshold: float, seed: int = 0):
    """A random GateMLP whose bias puts g > threshold for about `admit` of random keys."""
    from composable_kv.policies.write_gate import GateMLP
    torch.manual_seed(seed)
    gate = GateMLP(layers, heads, head_dim)
    with torch.no_grad():
        x = torch.randn(layers, heads, 4096, 2 * head_dim)
        logits = gate.logits_all(x)  # [L, H, N]
        cut = torch.quantile(logits, 1.0 - admit, dim=-1) if 0 < admit < 1 else logits.amax(-1) * (admit >= 1)
        gate.b2 -= cut - torch.logit(torch.tensor(threshold))
    return gate


def calibrated_gate(shape, admit: float, threshold: float, path: Path, seed: int = 0) -> Path:
    """calibrated_gate_mlp for a model `shape`, saved where the stage's `weights:` reads it."""
    gate = calibrated_gate_mlp(shape.num_layers, shape.num_kv_heads, shape.head_dim, admit, threshold, seed)
    gate.save(path, {"note": f"random, admits ~{admit} of random keys"})
    return path


def time_policy(model, policy, prompts, steps: int, prefill, layers: str = "auto") -> dict:
    """Prefill (synthetic K/V), one decode step (graph capture on CUDA), then `steps` timed steps."""
    from composable_kv import hf
    B = len(prompts)
    s = hf.PolicySession(model, policy, max_total_tokens=len(prompts[0]) + steps + 2, batch_size=B, layers=layers)
    try:
        logits = s.prefill(prompts, prefill)
        logits = s.decode(logits.argmax(-1))  # eager first step (+ capture)
        state = {"logits": logits}

        def step():
            state["logits"] = s.decode(state["logits"].argmax(-1))
        ms = harness.wall_ms(step, calls=steps)
        st = s.steps[1:]
        out = dict(ms_per_step=ms, tokens_per_s=B / (ms * 1e-3), path=f"{s.decode_path}, {s.layers} layers",
                   kv_gb_per_step=sum(sum(x.kv_bytes_read) for x in st) / len(st) / 1e9)
        stats = getattr(s.cache, "stats", None)
        if stats is not None:
            got = stats()
            out.update(admitted_frac=got["admitted_frac"], kept_frac=got["kept_frac"])
        return out
    finally:
        s.close()


def run_e2e(args) -> list[dict]:
    import e2e  # benchmarks/e2e.py: model shapes and the synthetic prefill

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, weights = e2e.build_model(args.model, dtype, dev, None)
    from composable_kv import hf
    shape = hf.ModelShape.of(model)
    prefill = e2e.SyntheticPrefill(shape, model.config.vocab_size, dev, dtype)
    prompts = torch.randint(10, model.config.vocab_size, (args.batch, args.context),
                            generator=torch.Generator().manual_seed(0)).tolist()
    tmp = Path(tempfile.mkdtemp(prefix="wg_e2e_"))
    dense = {"name": "dense", "page_size": 16, "stages": [{"stage": "attend"}]}
    runs = [("ckv dense", dense, "fused"), ("ckv dense [modules]", dense, "modules")]
    for p in args.admit:
        gate = {"stage": "write_gate", "threshold": 0.5, "window_tokens": args.window,
                "weights": str(calibrated_gate(shape, p, 0.5, tmp / f"gate{p}.pt"))}
        for layers in args.layers:
            tag = "" if layers == "fused" else f" [{layers}]"
            runs.append((f"write_gate{p:.2f}{tag}",
                         {"name": "wg", "page_size": 16, "stages": [gate, {"stage": "attend"}]}, layers))
            runs.append((f"write_gate{p:.2f}+quest{args.budget}+art{tag}",
                         {"name": "wg-quest-art", "page_size": 16, "stages": [
                             gate, {"stage": "quest", "budget_tokens": args.budget},
                             {"stage": "art", "stop": "certified", "delta": 0.01}]}, layers))
    rows = []
    for name, policy, layers in runs:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        r = dict(provider=name, model=args.model, batch=args.batch, context=args.context)
        try:
            r.update(time_policy(model, ckv.compile(policy), prompts, args.steps, prefill, layers))
        except torch.cuda.OutOfMemoryError as e:
            r["note"] = "OOM: " + str(e).split("\n")[0][:120]
        rows.append(r)
        print(f"  {name:32s} {r.get('ms_per_step', float('nan')):9.2f} ms/step "
              f"{r.get('tokens_per_s', float('nan')):9.1f} tok/s {r.get('path', '')} {r.get('note', '')}", flush=True)
    base = rows[0].get("tokens_per_s", float("nan"))
    for r in rows:
        r["x_ckv_dense"] = r.get("tokens_per_s", float("nan")) / base
    return rows


def e2e_table(rows, args) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU dry run (fp32, eager)"
    lines = [f"write_gate end to end: {args.model} (random weights), batch {args.batch}, context {args.context}, "
             f"window {args.window}, budget {args.budget}, {args.steps} timed steps, write_gate on "
             f"{'/'.join(args.layers)} layers; {gpu}",
             "| provider | path | ms/step | tok/s | x ckv dense | KV GB/step | admitted (of evicted) | kept | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['provider']} | {r.get('path', '')} | {r.get('ms_per_step', float('nan')):.2f} | "
                     f"{r.get('tokens_per_s', float('nan')):,.0f} | {r['x_ckv_dense']:.2f} | "
                     f"{r.get('kv_gb_per_step', float('nan')):.3f} | {r.get('admitted_frac', float('nan')):.2f} | "
                     f"{r.get('kept_frac', float('nan')):.2f} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/write_gate_cost.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--e2e", action="store_true", help="end-to-end tokens/s (whole model) instead of one layer")
    p.add_argument("--model", default="llama3-8b-shape", help="--e2e: a model shape of benchmarks/e2e.py")
    p.add_argument("--steps", type=int, default=32, help="--e2e: timed decode steps")
    p.add_argument("--layers", type=lambda s: s.split(","), default=["fused"],
                   help="--e2e: decode layers of the write_gate rows, comma-separated: fused, modules")
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
    for a in args.admit:
        if not 0.0 <= a <= 1.0:
            p.error(f"--admit: shares in [0, 1], got {a}")
    for layers in args.layers:
        if layers not in ("fused", "modules"):
            p.error(f"--layers: fused or modules (comma-separated), got {layers!r}")
    rows = run_e2e(args) if args.e2e else run_layer(args)
    text = e2e_table(rows, args) if args.e2e else layer_table(rows, args)
    print(text)
    if args.out:
        stem = "write_gate_e2e" if args.e2e else "write_gate_bench"
        harness.write_report(args.out, stem, harness.run_meta(args=vars(args)), rows, text,
                             title="Write-gated KV: " + ("end to end" if args.e2e else "one attention layer"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
