"""Timing of Ltri's span scoring on the GPU (run by gpu/ltri.sh): the Triton kernel vs the torch
reference and vs Quest's page scoring over the same context, bf16. Writes CSV + markdown to argv[1]."""
import csv
import sys
from pathlib import Path

import torch
import triton.testing

from composable_kv.kernels.page_score import triton as page_tk
from composable_kv.kernels.span_score import reference as span_ref
from composable_kv.kernels.span_score import triton as span_tk

out = Path(sys.argv[1])
dev, dt = "cuda", torch.bfloat16
rows = []
for B, ctx, span_pages, R in [(1, 32768, 8, 4), (32, 8192, 8, 4), (32, 32768, 8, 4), (64, 32768, 4, 8)]:
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
with open(out / "ltri_span_score.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
with open(out / "ltri_span_score.md", "w") as f:
    keys = list(rows[0])
    f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
    for r in rows:
        f.write("| " + " | ".join(str(r[k]) for k in keys) + " |\n")
