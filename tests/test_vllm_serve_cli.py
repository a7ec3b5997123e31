"""benchmarks/vllm_serve.py's host side (no vLLM, no GPU): backend specs checked before any engine starts,
and the report tables."""
import pytest

import vllm_serve  # benchmarks/ is on pytest's path


def test_spec_parsing_and_refusals():
    assert vllm_serve.parse_spec("FLASH_ATTN") == ("FLASH_ATTN", None)
    assert vllm_serve.parse_spec("CUSTOM:eval/quest-4096-art") == ("CUSTOM", "eval/quest-4096-art")
    for bad, why in [("CUSTOM", "CUSTOM:<policy>"), ("FLASH_ATTN:dense", "CUSTOM:<policy>"),
                     ("SDPA", "use one of"), ("CUSTOM:no_such_policy", "no shipped config"),
                     ("CUSTOM:write_gate_quest_art", "admission stage 'write_gate'")]:
        with pytest.raises(SystemExit, match=why):
            vllm_serve.parse_spec(bad)


def row(name, B, tps):
    return dict(name=name, context=32768, batch=B, tokens_per_s=tps, floor_tokens_per_s=10000.0, prefill_s=2.0,
                engine_s=20.0)


def test_bench_table_ratios_to_the_first_spec():
    table = vllm_serve.bench_table([row("FLASH_ATTN", 16, 4000.0), row("FLASH_ATTN", 64, 8000.0),
                                    row("CUSTOM:quest_art", 16, 6000.0), row("CUSTOM:quest_art", 64, 12000.0)])
    lines = table.splitlines()
    assert "x FLASH_ATTN" in lines[0] and len(lines) == 6
    assert "| CUSTOM:quest_art | 32768 | 16 | 6,000 | 1.50x | 10,000 | 60% |" in lines[4]
    assert "| CUSTOM:quest_art | 32768 | 64 | 12,000 | 1.50x | 10,000 | 120% |" in lines[5]


def test_needle_table_has_a_row_per_spec_and_the_mean():
    rows = [dict(policy=p, task=t, accuracy=a, ci_low=0.1, ci_high=0.9, samples=50)
            for p, accs in (("FLASH_ATTN", (1.0, 0.5)), ("CUSTOM:quest_art", (0.9, 0.3)))
            for t, a in zip(("niah_single", "niah_multikey"), accs)]
    lines = vllm_serve.needle_table(rows).splitlines()
    assert lines[0] == "| backend:policy | niah_single | niah_multikey | mean |"
    assert lines[2].startswith("| FLASH_ATTN | 1.00 [0.10, 0.90] | 0.50") and lines[2].endswith("| 0.750 |")
    assert lines[3].endswith("| 0.600 |") and lines[-1] == "n = 50 per cell, Wilson 95% intervals."


def qwen_like(kv_heads=2):
    from types import SimpleNamespace
    return SimpleNamespace(hidden_size=896, num_attention_heads=14, num_key_value_heads=kv_heads,
                           num_hidden_layers=24, vocab_size=151936, intermediate_size=4864)


def test_dense_floor_counts_the_weights_and_kv_a_step_reads():
    cfg = qwen_like()
    params = 151936 * 896 + 24 * (896 * (896 + 2 * 2 * 64) + 896 * 896 + 3 * 896 * 4864)
    kv = 24 * 2 * 2 * 64 * 2  # bytes per token: K and V of 2 heads of 64, bf16, 24 layers
    want = 4e12 / (2 * params + 16 * 32768 * kv) * 16
    assert vllm_serve.dense_floor_tokens_per_s(cfg, 4e12, 16, 32768) == pytest.approx(want, rel=1e-12)


def test_dense_floor_under_tensor_parallelism_reads_each_gpus_shard():
    one = vllm_serve.dense_floor_tokens_per_s(qwen_like(), 4e12, 64, 32768)
    assert vllm_serve.dense_floor_tokens_per_s(qwen_like(), 4e12, 64, 32768, tp=2) == pytest.approx(2 * one)
    # a single KV head is replicated on both GPUs: only the weights halve, so less than twice
    one_head = vllm_serve.dense_floor_tokens_per_s(qwen_like(1), 4e12, 64, 32768)
    two_gpus = vllm_serve.dense_floor_tokens_per_s(qwen_like(1), 4e12, 64, 32768, tp=2)
    assert one_head < two_gpus < 1.2 * one_head
