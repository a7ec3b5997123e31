"""The predictor CNN's tile and dot precision (issue 17): kernels/predictor_cnn at B=16, 8 KV heads, 2,048 pages (32k),
history 8 / 16 / 64, tiles of 32 / 64 / 128 pages, tf32 against bf16 dot inputs; the largest score difference from
the tf32 kernel at 64 pages (the former default). argv[1]: out dir (predictor_cnn_probe.md)."""
import sys
from pathlib import Path

import torch
import triton.testing

from composable_kv.kernels.predictor_cnn import triton as cnn
from composable_kv.policies.attention_predictor.predictor import PredictorCNN

out = Path(sys.argv[1])
if not torch.cuda.is_available():
    sys.exit("predictor_cnn_probe: needs a CUDA GPU")
out.mkdir(parents=True, exist_ok=True)
B, Hkv, P = 16, 8, 2048
torch.manual_seed(0)
packed = cnn.pack_weights(PredictorCNN().cuda().weights())  # untrained: the same cost as trained weights
rows = [f"{torch.cuda.get_device_name()}, B={B}, {Hkv} KV heads, {P} pages, untrained weights, 4 warps\n",
        "| precision | history | tile (pages) | us | max abs diff from tf32 at 64 |", "|---|---|---|---|---|"]
for H in (8, 16, 64):
    hist = torch.rand(B, Hkv, H, P, device="cuda") / P
    args = (hist, torch.arange(B, device="cuda"), torch.zeros(B, dtype=torch.long, device="cuda"),
            torch.full((B,), P, device="cuda"), P, packed)
    ref = cnn.predictor_scores(*args, precision="tf32", block=64)
    for precision in ("tf32", "bf16"):
        for block in (32, 64, 128):
            run = lambda: cnn.predictor_scores(*args, precision=precision, block=block)  # noqa: E731
            t = triton.testing.do_bench(run, warmup=10, rep=60)
            rows.append(f"| {precision} | {H} | {block} | {t * 1e3:.1f} | {(run() - ref).abs().max().item():.2e} |")
            print(rows[-1], flush=True)
(out / "predictor_cnn_probe.md").write_text("\n".join(rows) + "\n")
