"""Stages that sync with the host say so: describe() and pipeline.graph_safe, per shipped config."""
from pathlib import Path

import pytest

import composable_kv as ckv

pytestmark = pytest.mark.cpu
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name,safe", [("quest_art", True), ("sink_window_quest_shadow_art", True),
                                       ("dense", True), ("ltri_art", True), ("attention_predictor_art", True),
                                       ("write_gate_quest_art", True)])
def test_graph_safety_is_declared(name, safe):
    pipe = ckv.compile(CONFIGS / f"{name}.yaml")
    assert pipe.graph_safe is safe
    text = pipe.describe("cpu")
    assert ("CUDA graphs: capturable" in text) is safe
    assert ("CUDA graphs: not capturable" in text) is (not safe)
    if not safe:
        assert pipe.host_synced_stages == [pipe.config.stages[0].name]
