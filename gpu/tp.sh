#!/usr/bin/env bash
# Tensor-parallel decode on 2 GPUs vs 1 GPU (issue 8). Run from the repo root on a machine with >= 2 GPUs;
# results go to $OUT (tp.md, tp.csv, the raw JSON and logs). About 2-3 minutes.
#
# Model: a random Llama wide enough to split evenly over 2 GPUs (the default SmolLM2-135M has 3 KV heads):
# 8 layers, hidden 2048, 16 query / 8 KV heads of 128, MLP 4096, vocab 32000; bf16.
#  1. bf16, batch 64, 8k context, 32 new tokens, dense / quest / quest_art (configs/*.yaml): decode tokens/s on
#     1 GPU and on 2 GPUs (torchrun, NCCL, NVLink multicast off), greedy tokens compared.
#  2. float32, batch 8, 2k context, 16 new tokens: the exactness check (tokens should match; bf16 may flip near-ties).
# Decode layers: LAYERS=auto|fused|modules (default auto: the fused layers, on 1 GPU and on each GPU's shards);
# with TP_MODULES=1 (default) the Llama-3-8B shape also runs on 2 GPUs through transformers' modules (rows "modules").
set -euo pipefail
OUT=${OUT:-$PWD/tp-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.csv" || true
MODEL=/tmp/ckv-tp-random
python - <<'PY'
import torch
from composable_kv import tp
for dtype, path in [(torch.bfloat16, "/tmp/ckv-tp-random"), (torch.float32, "/tmp/ckv-tp-random-fp32")]:
    tp.save_random_llama(path, dtype=dtype, device="cuda", vocab_size=32000, hidden_size=2048, intermediate_size=4096,
                         num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=16384, initializer_range=0.04)
PY
LAYERS=${LAYERS:-auto}
POL="--layers $LAYERS --policy configs/dense.yaml --policy configs/quest.yaml --policy configs/quest_art.yaml"
BIG="--batch 64 --context 8192 --new-tokens 32"
SMALL="--batch 8 --context 2048 --new-tokens 16 --dtype float32"
python -m composable_kv.tp --model $MODEL $POL $BIG --json "$OUT/tp1_bf16.json" 2>&1 | tee "$OUT/tp1_bf16.log"
python -m composable_kv.tp --model $MODEL-fp32 $POL $SMALL --json "$OUT/tp1_fp32.json" 2>&1 | tee "$OUT/tp1_fp32.log"
# the issue's shape: a random Llama-3-8B (32 layers, 32 q / 8 KV heads of 128, hidden 4096, MLP 14336), bf16, B=64, 8k
BIG8B=/tmp/ckv-tp-llama3-8b
if [ "${TP_8B:-1}" = 1 ]; then
  python -c "import torch; from composable_kv import tp; tp.save_random_llama('$BIG8B', dtype=torch.bfloat16, device='cuda', \
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, \
    num_key_value_heads=8, head_dim=128, max_position_embeddings=16384, rope_theta=500000.0, initializer_range=0.02)"
  POL8="--layers $LAYERS --policy configs/dense.yaml --policy configs/quest_art.yaml"
  python -m composable_kv.tp --model $BIG8B $POL8 $BIG --json "$OUT/tp1_8b.json" 2>&1 | tee "$OUT/tp1_8b.log"
fi
if [ "$NGPU" -ge 2 ]; then
  [ "${TP_8B:-1}" = 1 ] && torchrun --standalone --nproc-per-node 2 -m composable_kv.tp --model $BIG8B $POL8 $BIG \
    --json "$OUT/tp2_8b.json" 2>&1 | tee "$OUT/tp2_8b.log"
  [ "${TP_8B:-1}" = 1 ] && [ "${TP_MODULES:-1}" = 1 ] && torchrun --standalone --nproc-per-node 2 -m composable_kv.tp \
    --model $BIG8B $POL8 --layers modules $BIG --json "$OUT/tp2_8b_modules.json" 2>&1 | tee "$OUT/tp2_8b_modules.log"
  torchrun --standalone --nproc-per-node 2 -m composable_kv.tp --model $MODEL $POL $BIG --json "$OUT/tp2_bf16.json" \
    2>&1 | tee "$OUT/tp2_bf16.log"
  torchrun --standalone --nproc-per-node 2 -m composable_kv.tp --model $MODEL-fp32 $POL $SMALL --json "$OUT/tp2_fp32.json" \
    2>&1 | tee "$OUT/tp2_fp32.log"
else
  echo "only $NGPU GPU(s): 2-GPU runs skipped" | tee "$OUT/tp.md"
  exit 0
fi
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| run | policy | 1 GPU tok/s (layers) | 2 GPU tok/s (layers) | speedup | prefill 1 / 2 GPU (s) | KV read | same sequences | same tokens |",
        "|---|---|---|---|---|---|---|---|---|"]
csv = ["run,policy,tok_s_1gpu,tok_s_2gpu,speedup,prefill_s_1gpu,prefill_s_2gpu,kv_read_fraction,seq_match,token_match"]
# (run, 2-GPU file): every run against its 1-GPU file tp1_<run>.json
runs = [("8b", "tp2_8b"), ("8b", "tp2_8b_modules"), ("bf16", "tp2_bf16"), ("fp32", "tp2_fp32")]
for run, second in [(r, f) for r, f in runs if (out / f"{f}.json").exists()]:
    one, two = (json.loads((out / f"{f}.json").read_text()) for f in (f"tp1_{run}", second))
    m = one["meta"]
    for a, b in zip(one["results"], two["results"]):
        same_seq = sum(x == y for x, y in zip(a["tokens"], b["tokens"])) / len(a["tokens"])
        pairs = [(u, v) for x, y in zip(a["tokens"], b["tokens"]) for u, v in zip(x, y)]
        same_tok = sum(u == v for u, v in pairs) / len(pairs)
        s1, s2 = a["decode_tokens_per_s"], b["decode_tokens_per_s"]
        label = f"{'Llama-3-8B shape bf16' if run == '8b' else run} B={m['batch']} ctx={m['context']}"
        rows.append(f"| {label} | {a['policy_name']} | {s1:.0f} ({a.get('decode_layers', '?')}) | "
                    f"{s2:.0f} ({b.get('decode_layers', '?')}) | {s2 / s1:.2f}x | "
                    f"{a['prefill_s']:.2f} / {b['prefill_s']:.2f} | {a['kv_read_fraction']:.3f} | {same_seq:.3f} | {same_tok:.3f} |")
        csv.append(f"{second.removeprefix('tp2_')},{a['policy_name']},{s1:.1f},{s2:.1f},{s2 / s1:.3f},{a['prefill_s']:.3f},{b['prefill_s']:.3f},"
                   f"{a['kv_read_fraction']:.4f},{same_seq:.4f},{same_tok:.4f}")
text = (f"Tensor parallel decode, {one['meta']['device']}: 1 GPU vs 2 GPUs (torchrun, NCCL, NCCL_NVLS_ENABLE=0).\n"
        "Decode tokens/s over the steps after the first (compile + graph capture). "
        "Llama-3-8B shape: random, 32 layers, 32 q / 8 KV heads of 128; the others: random Llama 8 layers, 16 q / 8 KV heads of 128 (2 x 4 KV heads per GPU). Decode tokens/s = batch x steps / time.\n\n"
        + "\n".join(rows) + "\n")
(out / "tp.md").write_text(text)
(out / "tp.csv").write_text("\n".join(csv) + "\n")
print(text)
PY
