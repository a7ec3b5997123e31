"""Why attention_predictor's dense calibration step costs ~4x its bytes (issue 17): our decode over every page of
B=16, 32k, Llama-8B heads (bf16, page 16) by list order vs natural order, with and without the page-mass side
output, for several split counts, warps and pipeline stages, next to the bytes' time at the copy bandwidth measured
here. argv[1]: out dir."""
import sys
from pathlib import Path

import torch
import triton.testing

from composable_kv.kernels.paged_decode import triton as decode_tk

out = Path(sys.argv[1])
dev, dt = "cuda", torch.bfloat16
B, Hq, Hkv, D, S, ctx = 16, 32, 8, 128, 16, 32768
P = ctx // S
k = torch.randn(B * P, Hkv, S, D, device=dev, dtype=dt)
v = torch.randn_like(k)
q = torch.randn(B, Hq, D, device=dev, dtype=dt)
table = torch.randperm(B * P, device=dev).view(B, P).to(torch.int32)
lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
order = torch.arange(P, device=dev, dtype=torch.int32).expand(B, Hkv, P).contiguous()
count = torch.full((B, Hkv), P, dtype=torch.int32, device=dev)
kv_bytes = 2 * k.numel() * k.element_size()
src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=dev)
t_copy = triton.testing.do_bench(lambda: src.clone(), warmup=10, rep=50)  # read + write kv_bytes / 2 each
bw = kv_bytes / (t_copy * 1e-3)  # bytes/s moved (read + write)
rows = [f"{torch.cuda.get_device_name()}, B={B}, ctx={ctx}, Hq={Hq}, Hkv={Hkv}, D={D}, page {S}, bf16; "
        f"K+V {kv_bytes / 1e9:.2f} GB, {kv_bytes / bw * 1e6:.0f} us at the copy bandwidth ({bw / 1e12:.2f} TB/s)\n",
        "| order | page mass | splits | warps | stages | us | TB/s |", "|---|---|---|---|---|---|---|"]
for natural in (True, False):
    for mass in (False, True):
        for splits, warps, stages in [(1, 4, 3), (3, 4, 3), (8, 4, 3), (3, 8, 3), (8, 8, 3), (3, 4, 2), (3, 8, 2),
                                      (8, 8, 2)]:
            def run():
                pm = None
                if mass:
                    pm = (torch.full((B, Hq, P), float("-inf"), device=dev), torch.empty(B, Hq, device=dev))
                return decode_tk.launch_decode(q, k, v, table, lens, None if natural else order,
                                               None if natural else count, sm_scale=D ** -0.5, num_splits=splits,
                                               natural=natural, page_mass=pm, num_warps=warps, num_stages=stages)
            t = triton.testing.do_bench(run, warmup=10, rep=50)
            rows.append(f"| {'natural' if natural else 'list'} | {mass} | {splits} | {warps} | {stages} | "
                        f"{t * 1e3:.0f} | {kv_bytes / (t * 1e-3) / 1e12:.2f} |")
            print(rows[-1], flush=True)
(out / "decode_probe.md").write_text("\n".join(rows) + "\n")
