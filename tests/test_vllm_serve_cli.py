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
