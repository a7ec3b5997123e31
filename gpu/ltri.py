"""Timing of Ltri's span scoring on the GPU (run by gpu/ltri.sh): the Triton kernel vs the torch
reference and vs Quest's page scoring over the same context, bf16. Writes CSV + markdown to argv[1]."""
import csv
import sys
from pathlib import Path

import torch
import triton.runtime.errors
import triton.testing

from composable_kv.kernels.page_score import triton as page_tk
from composable_kv.kernels.span_score import reference as span_ref
from composable_kv.kernels.span_score import triton as span_tk

out = Path(sys.argv[1])
SELECT_ONLY = "--select-only" in sys.argv  # only the span_select sweep (the last table)
dev, dt = "cuda", torch.bfloat16
rows = []
for B, ctx, span_pages, R in [] if SELECT_ONLY else [(1, 32768, 8, 4), (32, 8192, 8, 4), (32, 32768, 8, 4),
                                                       (64, 32768, 4, 8)]:
    Hq, Hkv, D, S = 32, 8, 128, 16
    P = ctx // S
    NS = P // span_pages
    q = torch.randn(B, Hq, D, device=dev, dtype=dt)
    reps = torch.randn(B, Hkv, NS, R, D, device=dev, dtype=dt)
    ns = torch.full((B,), NS, dtype=torch.int32, device=dev)
    kmin = torch.randn(B * P, Hkv, D, device=dev, dtype=dt)
    kmax = kmin + 1
    table = torch.arange(B * P, device=dev, dtype=torch.int32).view(B, P)
    npages = torch.full((B,), P, dtype=torch.int32, device=dev)
    sm = D ** -0.5
    t_span = triton.testing.do_bench(lambda: span_tk.span_scores(q, reps, ns, sm), warmup=25, rep=100)
    t_ref = triton.testing.do_bench(lambda: span_ref.span_scores(q, reps, ns, sm), warmup=5, rep=50)
    t_quest = triton.testing.do_bench(lambda: page_tk.quest_scores(q, kmin, kmax, table, npages, sm),
                                      warmup=25, rep=100)
    rep_bytes = reps.numel() * reps.element_size()
    box_bytes = 2 * kmin.numel() * kmin.element_size()
    err = (span_tk.span_scores(q, reps, ns, sm) - span_ref.span_scores(q, reps, ns, sm)).abs().max().item()
    rows.append(dict(gpu=torch.cuda.get_device_name(), B=B, ctx=ctx, spans=NS, R=R, Hq=Hq, Hkv=Hkv, D=D,
                     span_kernel_us=round(t_span * 1e3, 2), span_GBps=round(rep_bytes / t_span / 1e6, 1),
                     torch_ref_us=round(t_ref * 1e3, 2), quest_box_us=round(t_quest * 1e3, 2),
                     quest_GBps=round(box_bytes / t_quest / 1e6, 1), rep_MB=round(rep_bytes / 1e6, 2),
                     box_MB=round(box_bytes / 1e6, 2), max_abs_err_vs_ref=err))
    print(rows[-1], flush=True)
if rows:
    with open(out / "ltri_span_score.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "ltri_span_score.md", "w") as f:
        keys = list(rows[0])
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[k]) for k in keys) + " |\n")

# Tuning at issue 17's cost shape (B=16, 32k, Llama-8B heads, 2-page spans, 4 reps; the stage's table path: 2,048
# span slots, 1,024 in use): span scoring per tiling and the selection (kernels/span_select) per search arity and
# warps, each timed from CUDA-graph replays (harness.graph_ms: no launch overhead).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402
from composable_kv.kernels.span_select import triton as select_tk  # noqa: E402

B, ctx, Hq, Hkv, D, S, R = 16, 32768, 32, 8, 128, 16, 4
P = ctx // S
NS = P // 2
q = torch.randn(B, Hq, D, device=dev, dtype=dt)
reps = torch.randn(B, Hkv, P, R, D, device=dev, dtype=dt)
ns = torch.full((B,), NS, dtype=torch.long, device=dev)
rows_t = torch.arange(B, device=dev)
reps8, scales8 = span_ref.quantize_reps(reps)  # rep_dtype: int8 (a scale a key)
sweep = []
for keys, r, sc, key_bytes in [] if SELECT_ONLY else [("bf16", reps, None, 2 * D), ("int8", reps8, scales8, D + 4)]:
    for block_s in (32, 64, 128):
        for programs, stages in ((None, 1), (16, 2), (8, 2), (8, 3), (4, 3), (2, 3)):
            for warps in (4, 8):
                kw = dict(block_s=block_s, num_warps=warps, programs=programs, num_stages=stages)
                try:
                    t = harness.graph_ms(lambda: span_tk.span_scores(q, r, ns, 0.1, rows_t, sc, **kw))
                except triton.runtime.errors.OutOfResources as e:  # a large block with several stages in flight
                    sweep.append(dict(op=f"span_scores ({keys} keys)", config=str(kw), us="-", GBps=type(e).__name__))
                    continue
                sweep.append(dict(op=f"span_scores ({keys} keys)", config=str(kw), us=round(t * 1e3, 2),
                                  GBps=round(B * Hkv * NS * R * key_bytes / t / 1e6, 1)))
                print(sweep[-1], flush=True)
scores = span_tk.span_scores(q, reps, ns, 0.1, rows_t)
sop = (torch.arange(P, device=dev) // 2).expand(B, P).contiguous()
sop[:, :1] = -1
sop[:, P - 4:] = -1
covered = torch.full((B,), P - 4, dtype=torch.long, device=dev)
forced = torch.zeros(B, Hkv, P, dtype=torch.bool, device=dev)
cand = torch.ones_like(forced)
npages = torch.full((B,), P, dtype=torch.int32, device=dev)
for vote, warps, window in [("group", w, n) for w in (8, 16) for n in (16, 32, 64, 128)] + [("layer", 16, 64)]:
    kw = dict(num_warps=warps, window=window)  # a 4-ary search was tried at cab41bd (its sweep)
    t = harness.graph_ms(lambda: select_tk.span_select(scores, rows_t, sop, covered, forced, cand, npages, 64, 1,
                                                       vote, **kw))
    sweep.append(dict(op=f"span_select ({vote} vote, budget 64 pages)", config=str(kw), us=round(t * 1e3, 2),
                      GBps=""))
    print(sweep[-1], flush=True)
with open(out / "ltri_span_sweep.md", "w") as f:
    f.write(f"{torch.cuda.get_device_name()}, B={B}, ctx={ctx}, Hq={Hq}, Hkv={Hkv}, D={D}, {NS} spans of 2 pages in "
            f"{P} slots, R={R}, bf16 q (keys as the op says); CUDA-graph replay (harness.graph_ms)\n\n| op | config | us | GB/s |\n"
            "|---|---|---|---|\n")
    for r in sweep:
        f.write(f"| {r['op']} | {r['config']} | {r['us']} | {r['GBps']} |\n")
