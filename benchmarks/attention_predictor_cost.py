"""The AttentionPredictor's cost per decode step, and the page-mass side output's cost in the decode.

    python benchmarks/attention_predictor_cost.py [--device cpu|cuda] [--quick] [--out DIR]

Rows (a markdown table on stdout; --out DIR: the report, .json rows + .md table):
  cnn          the CNN alone on one layer's history: B x heads rows of [H, P] (per KV head or per query
               head, H = 64 / 32 / 16), times the predictor layers = per-step cost;
  stage        one layer of the compiled pipeline (select + decode + history update), attention_predictor
               (+art) against quest (+art) at the same budget, on random K/V (timing only);
  side_output  (CUDA) the dense decode kernel with and without the page-mass side output.
Eager timings; the graph-path comparison with Quest and ltri is benchmarks/seed_methods_cost.py.
Shapes: the default model (9 query / 3 KV heads, D 64, 28 predictor layers) and, on CUDA, Llama-8B
(32 / 8, D 128, 30 predictor layers).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402  (benchmarks/harness.py)
from composable_kv.policies.attention_predictor.predictor import PredictorCNN, features  # noqa: E402

SHAPES = {"smollm2-135m": (9, 3, 64, 28), "llama-8b": (32, 8, 128, 30)}  # Hq, Hkv, D, predictor layers


def timeit(fn, device, reps: int = 30) -> float:
    """Median milliseconds of fn()."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        return harness.median_ms(fn, warmup_ms=5, rep_ms=max(reps * 5, 25))
    return harness.median_ms(fn, calls=reps)


def cnn_rows(device, shapes, batches, contexts, histories):
    model = PredictorCNN().to(device).eval()
    rows = []
    for shape in shapes:
        Hq, Hkv, _, L = SHAPES[shape]
        for B in batches:
            for ctx in contexts:
                P = ctx // 16
                for per_kv in (True, False):
                    heads = Hkv if per_kv else Hq
                    for H in histories:
                        x = torch.rand(B * heads, H, P, device=device) / P
                        n = torch.full((B * heads,), P, device=device)
                        with torch.no_grad():
                            ms = timeit(lambda: model(features(x, n)), device)
                        rows.append({"what": "cnn", "shape": shape, "batch": B, "ctx": ctx,
                                     "setting": f"{'per_kv_head' if per_kv else 'per_q_head'} H={H}",
                                     "ms_per_layer": round(ms, 4), "ms_per_step": round(ms * L, 3)})
    return rows


def stage_rows(device, shape, B, ctx, backend, budget=1024):
    import composable_kv as ckv
    Hq, Hkv, D, L = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    art = {"stage": "art", "stop": "certified", "delta": 0.01}
    policies = {
        "quest": [{"stage": "quest", "budget_tokens": budget}, {"stage": "attend"}],
        "quest_art": [{"stage": "quest", "budget_tokens": budget}, art],
        "attention_predictor": [{"stage": "attention_predictor", "budget_tokens": budget, "weights": "@random"},
                                {"stage": "attend"}],
        "attention_predictor_art": [{"stage": "attention_predictor", "budget_tokens": budget,
                                     "weights": "@random"}, art],
        "attention_predictor_art H=16 run_every=4": [
            {"stage": "attention_predictor", "budget_tokens": budget, "weights": "@random", "history_steps": 16,
             "run_every": 4}, art],
    }
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for name, stages in policies.items():
        pipe = ckv.compile({"name": name, "page_size": 16, "stages": stages}, backend=backend)
        cache, ids = harness.filled_cache(pipe, B, ctx, Hkv, D, dtype, device, g)
        q = torch.randn(B, Hq, D, generator=g, device=device).to(dtype)
        for _ in range(6):  # past the first (dense calibration) steps
            pipe.run(q, cache, 0)
        # time a predicting step: no calibration from here on, clocks off the calibration phase
        if pipe.selectors[0].name == "attention_predictor":
            pipe.selectors[0].calibrate_every = 10 ** 9
            for hist in cache.stage_state(pipe.selectors[0]).history.values():
                hist.steps.fill_(2)
                hist.seeded.fill_(False)
        ms = timeit(lambda: pipe.run(q, cache, 0), device)
        rows.append({"what": "stage", "shape": shape, "batch": B, "ctx": ctx, "setting": name,
                     "ms_per_layer": round(ms, 4), "ms_per_step": round(ms * L, 3)})
    return rows


def side_output_rows(device, shape, B, ctx):
    from composable_kv.kernels.paged_decode import triton as decode_tk
    Hq, Hkv, D, L = SHAPES[shape]
    P = ctx // 16
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(B * P, Hkv, 16, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    table = torch.randperm(B * P, device=device, generator=g).to(torch.int32).view(B, P)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(B, Hq, D, device=device, dtype=torch.bfloat16, generator=g)
    mass = (torch.full((B, Hq, P), float("-inf"), device=device), torch.empty(B, Hq, device=device))
    rows = []
    for splits in (1, 8):
        for with_mass in (False, True):
            fn = lambda: decode_tk.launch_decode(q, k, v, table, lens, None, None, sm_scale=D ** -0.5, rule=None,
                                                 num_splits=splits, natural=True, out_dtype=q.dtype,
                                                 page_mass=mass if with_mass else None)
            ms = timeit(fn, device)
            rows.append({"what": "side_output", "shape": shape, "batch": B, "ctx": ctx,
                         "setting": f"dense decode splits={splits} page_mass={with_mass}",
                         "ms_per_layer": round(ms, 4), "ms_per_step": round(ms * L, 3)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/attention_predictor_cost.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few shapes only (CPU)")
    p.add_argument("--out", default=None, help="folder for the report (.json rows and .md table)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _install_random_weights()
    cuda = device.type == "cuda"
    rows = []
    if cuda:
        rows += cnn_rows(device, ["smollm2-135m", "llama-8b"], [1, 16], [4096, 32768], [64, 16])
        for shape, B, ctx in (("smollm2-135m", 1, 4096), ("llama-8b", 16, 32768)):
            rows += stage_rows(device, shape, B, ctx, "triton")
            rows += side_output_rows(device, shape, B, ctx)
    else:
        rows += cnn_rows(device, ["smollm2-135m"], [1], [2048, 4096] if args.quick else [2048, 4096, 8192],
                         [64, 32, 16])
        rows += stage_rows(device, "smollm2-135m", 1, 4096, "reference")
    cols = ["what", "shape", "batch", "ctx", "setting", "ms_per_layer", "ms_per_step"]
    meta = harness.run_meta(threads=torch.get_num_threads())
    table = harness.markdown_table(rows, cols)
    print(f"device: {meta['gpu']}, torch {torch.__version__}, threads {torch.get_num_threads()}\n{table}")
    if args.out:
        harness.write_report(args.out, "attention_predictor_cost", meta, rows, table,
                             title="AttentionPredictor: cost per decode step")
    return 0


def _install_random_weights():
    """`weights: "@random"` loads an untrained CNN (timing only): same cost as trained weights."""
    import os
    import tempfile
    from composable_kv.policies.attention_predictor import predictor
    path = os.path.join(tempfile.mkdtemp(prefix="ckv-ap-"), "random.pt")
    torch.manual_seed(0)
    predictor.save_weights(PredictorCNN(), path)
    orig = predictor.load_weights

    def load(p, device=None):
        return orig(path if p == "@random" else p, device)
    predictor.load_weights = load
    import composable_kv.policies.attention_predictor as stage_mod
    stage_mod.load_weights = load


if __name__ == "__main__":
    sys.exit(main())
