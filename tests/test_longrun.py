"""The long-run script's CPU dry run: fixed-shape static plans, arrivals, spot checks, JSON + markdown."""
import json

import pytest

from composable_kv import longrun, runtime

pytestmark = pytest.mark.interpret


def test_dry_run_writes_results(tmp_path):
    rc = longrun.main(["--dry-run", "--config", "configs/sink_window_quest_art.yaml", "--steps", "10",
                       "--batch", "3", "--layers", "3", "--max-len", "60", "--max-new", "6",
                       "--spot-every", "4", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "longrun.json").read_text())
    (r,) = data["results"]
    assert rc == 0 and r["steps"] == 10 and r["nonfinite_outputs"] == 0
    assert r["arrivals"] > 0 and r["finished"] == r["arrivals"]  # every slot refilled the step it finished
    assert r["spot_checks"] == 4 and r["spot_within_tol"] and r["spot_max_tau"] <= r["delta"]
    assert r["decode_tokens"] == 30
    md = (tmp_path / "longrun.md").read_text()
    assert "| sink-window-quest-art | 10 | 3 | 3 |" in md


def test_static_plan_pads_and_refuses_what_does_not_fit():
    import torch
    import composable_kv as ckv
    from helpers import build_cache
    pipe = ckv.compile("configs/quest_art.yaml", backend="reference")
    cache, ids, _, _ = build_cache([5, 40], summaries=pipe.required_summaries)
    plan = pipe.plan(cache, ids, num_splits=1)
    static = runtime.StaticPlan(plan, max_pages=7)
    assert static.plan.page_table.shape == (2, 7) and not bool(static.plan.valid[:, 3:].any())
    assert torch.equal(static.plan.page_table[:, :3], plan.page_table)
    with pytest.raises(RuntimeError, match="does not fit the static buffers"):
        runtime.StaticPlan(plan, max_pages=2)
