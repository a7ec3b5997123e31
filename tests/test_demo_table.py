"""`ckv demo`'s table: one row per policy, one accuracy column per retrieval task."""
from types import SimpleNamespace

import pytest

from composable_kv.eval.cli import demo_table

TASKS = ["passkey", "niah_single"]

pytestmark = pytest.mark.cpu


def _row(policy, task, **kw):
    base = dict(accuracy=float("nan"), kl_vs_dense=float("nan"), top1_agreement=float("nan"),
                kv_read_fraction=1.0, kv_bytes_per_token=2e6)
    base.update(kw)
    return SimpleNamespace(policy=policy, task=task, **base)


def test_demo_table_has_a_column_per_task_and_a_row_per_policy():
    rows = [_row("dense", "passkey", accuracy=1.0), _row("dense", "niah_single", accuracy=2 / 3),
            _row("dense", "fidelity", kl_vs_dense=0.0, top1_agreement=1.0),
            _row("quest", "passkey", accuracy=1 / 3), _row("quest", "niah_single", accuracy=0.0),
            _row("quest", "fidelity", kl_vs_dense=0.0123, top1_agreement=0.875, kv_read_fraction=0.5,
                 kv_bytes_per_token=1e6)]
    lines = demo_table(rows, TASKS, 2048).splitlines()
    assert "passkey acc" in lines[1] and "niah_single acc" in lines[1]
    dense = next(l for l in lines if l.startswith("| dense "))
    quest = next(l for l in lines if l.startswith("| quest "))
    assert [c.strip() for c in dense.split("|")[2:4]] == ["1.00", "0.67"]
    assert [c.strip() for c in quest.split("|")[2:8]] == ["0.33", "0.00", "0.0123", "0.875", "50.0", "1.00"]
    assert lines[2].count("---:") == len(TASKS) + 4
