import sys, torch
sys.path.insert(0, "benchmarks")
import harness, seed_methods_cost as bench
from composable_kv.kernels.span_score import triton as tk
dev = torch.device("cuda")
for name in ("ltri", "ltri-int8"):
    stages = bench.policies(1024, "attend", "x")[name]
    pipe, cache, q = bench.build(name, stages, "llama-8b", 16, 32768, dev, torch.bfloat16, "triton")
    for _ in range(3):
        pipe.run(q, cache, 0)
    st = pipe.selectors[0]
    state = cache.stage_state(st)
    table = state.tables[0]
    P = cache.max_pages if hasattr(cache, "max_pages") else table.reps.shape[2]
    print(name, "reps", tuple(table.reps.shape), table.reps.stride(), "num_spans", table.num_spans.tolist()[:4],
          "mean", table.num_spans.float().mean().item())
    rows = torch.arange(16, device=dev)
    for Pn in (2048,):
        sc = None if table.rep_scale is None else table.rep_scale[:, :, :Pn]
        for kw in ({}, dict(qdiv_rn=True), dict(block_s=128, programs=8, num_stages=2, num_warps=4), dict(block_s=32, programs=16, num_stages=2, num_warps=4)):
            t = harness.graph_ms(lambda: tk.span_scores(q, table.reps[:, :, :Pn], table.num_spans, 0.1, rows, sc, **kw))
            print(name, Pn, kw, round(t * 1e3, 2), "us", flush=True)
