"""benchmarks/art_speed_pareto.py: accuracy (evaluation at scale) against end-to-end tokens/s (e2e.py)."""
import json

import pytest

import art_speed_pareto as sp
from composable_kv.eval import scale


def _e2e(tmp_path, providers, sizes=((16, 32732),)):
    rows = [dict(batch=b, context=c, provider=p, tokens_per_s=tps, kv_gb_per_step=1.0)
            for b, c in sizes for p, tps in providers]
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"meta": {"gpu": "G", "commit": "c"}, "rows": rows}))
    return str(path)


def _scale(tmp_path, accs, ctx=8192):
    rows = [dict(policy=p, task=t, ctx=ctx, samples=50, accuracy=a, kv_bytes_per_token=1e6, kv_read_fraction=1.0)
            for p, a in accs.items() for t in scale.SCALE_TASKS]
    path = tmp_path / "scale.json"
    path.write_text(json.dumps({"meta": {"ctx": ctx}, "rows": rows}))
    return str(path)


def test_rows_pair_speed_with_accuracy(tmp_path):
    e2e = _e2e(tmp_path, [("ckv dense", 100.0), ("ckv quest", 150.0), ("flashinfer-tc", 90.0), ("ckv topk", 80.0)])
    rows, _, B, ctx = sp.rows_of(e2e, 8192, [_scale(tmp_path, {"dense": 0.8, "quest": 0.6, "quest-2048": 0.7})])
    got = {label: (x, acc) for label, _, _, x, _, acc in rows}
    assert (B, ctx) == (16, 32732)
    # e2e.py's `ckv quest` decodes Quest 2048: it takes quest-2048's accuracy, not Quest 1024's
    assert got["dense"] == (1.0, pytest.approx(0.8)) and got["quest-2048"] == (1.5, pytest.approx(0.7))
    assert got["flashinfer-tc (dense)"] == (0.9, pytest.approx(0.8))  # dense math: dense's accuracy
    assert got["topk"][1] is None  # no accuracy row: listed, left off the plot


def test_main_writes_the_table_and_refuses_mixed_sizes(tmp_path):
    files = [_scale(tmp_path, {"dense": 0.8, "quest-2048": 0.7})]
    e2e = _e2e(tmp_path, [("ckv dense", 100.0), ("ckv quest", 150.0)])
    out = tmp_path / "speed"
    assert sp.main(["--e2e", e2e, "--ctx", "8192", "--out", str(out), "--scale", files[0]]) == 0
    md = (tmp_path / "speed.md").read_text()
    assert "| quest-2048 | 150 | 1.50 | 1.00 | 0.700 |" in md
    mixed = _e2e(tmp_path, [("ckv dense", 100.0)], sizes=((16, 32732), (64, 32732)))
    with pytest.raises(SystemExit, match="one batch size and context"):
        sp.main(["--e2e", mixed, "--ctx", "8192", "--out", str(out), "--scale", files[0]])
