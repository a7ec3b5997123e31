"""Where a captured decode step spends its GPU time: torch.profiler over graph replays, kernels by total time.

    python benchmarks/profile_step.py --layers 8 --batch 16 --context 32768 --policy "ckv quest+art"
    --policy takes e2e's providers: a named policy or "ckv <policy>.yaml".
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import SHAPES, SyntheticPrefill, build_model, provider_policy  # noqa: E402

from composable_kv import hf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b-shape", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--policy", default="ckv quest+art", help="a named e2e policy or 'ckv <policy>.yaml'")
    ap.add_argument("--decode-layers", default="auto", choices=["auto", "fused", "modules"])
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    SHAPES[args.model] = {**SHAPES[args.model], "num_hidden_layers": args.layers}
    model, _ = build_model(args.model, torch.bfloat16, "cuda", None)
    shape = hf.ModelShape.of(model)
    prompts = [[7] * args.context] * args.batch
    s = hf.PolicySession(model, provider_policy(args.policy), max_total_tokens=args.context + 64, batch_size=args.batch,
                         layers=args.decode_layers)
    logits = s.prefill(prompts, SyntheticPrefill(shape, model.config.vocab_size, "cuda", torch.bfloat16))
    for _ in range(4):
        logits = s.decode(logits.argmax(-1))
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            logits = s.decode(logits.argmax(-1))
        torch.cuda.synchronize()
    kv = sum(sum(x.kv_bytes_read) for x in s.steps[-5:]) / 5
    print(f"{args.policy} ({s.layers} layers): {args.layers} layers, B={args.batch}, context {args.context}, 5 steps, "
          f"{kv / 1e9:.3f} GB K/V + summaries read per step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
