"""attention_predictor and ltri on the GPU graph path: the captured and replayed decode step decodes
exactly like the eager paths and the host implementation, a replay never syncs with the host, and the
per-layer cost against Quest meets issue 17's targets (benchmarks/seed_methods_cost.py)."""
import pytest
import torch

pytest.importorskip("transformers")
from helpers import assert_replays_without_sync, tiny_llama  # noqa: E402

import composable_kv as ckv  # noqa: E402
from composable_kv import hf  # noqa: E402

import host_seed_reference as host  # noqa: E402

pytestmark = pytest.mark.gpu

STACKS = {
    "ltri_art": {"page_size": 16, "dense_layers": [0], "stages": [
        {"stage": "ltri", "budget_tokens": 96, "max_span_pages": 3, "decode_span_pages": 1},
        {"stage": "art", "stop": "certified", "delta": 0.05}]},
    "ltri": {"page_size": 16, "stages": [{"stage": "ltri", "budget_tokens": 96, "vote": "layer"},
                                         {"stage": "attend"}]},
    "attention_predictor_art": {"page_size": 16, "dense_layers": [0], "stages": [
        {"stage": "attention_predictor", "budget_tokens": 96, "history_steps": 16, "calibrate_every": 3},
        {"stage": "art", "stop": "certified", "delta": 0.05}]},
    "attention_predictor_per_q_run_every": {"page_size": 16, "stages": [
        {"stage": "attention_predictor", "budget_tokens": 96, "history_steps": 8, "per_kv_head": False,
         "run_every": 2, "calibrate_first": False}, {"stage": "attend"}]},
}


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in (200, 333, 517)]


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_graph_path_equals_eager_paths_and_the_host_code_fp32(stack, no_tf32):
    model = tiny_llama(1024).to("cuda", torch.float32)
    pipe = ckv.compile({"name": stack, **STACKS[stack]})
    assert pipe.graph_safe
    out = {p: hf.generate(model, None, _prompts(), pipe, max_new_tokens=24, stop_at_eos=False, decode_path=p)
           for p in ("graph", "device", "host")}
    old = hf.generate(model, None, _prompts(), host.host_pipeline(pipe, backend="auto"), max_new_tokens=24,
                      stop_at_eos=False, decode_path="host")
    assert out["graph"].decode_path == "graph"
    assert out["graph"].sequences == out["device"].sequences == out["host"].sequences == old.sequences
    bytes_of = lambda o: [s.kv_bytes_read for s in o.steps]  # noqa: E731
    assert bytes_of(out["graph"]) == bytes_of(out["host"]) == bytes_of(old)


# stacks with no host-code twin (tests/host_seed_reference.py): graph against eager only
DEVICE_ONLY = {
    "ltri_int8_art": {"page_size": 16, "dense_layers": [0], "stages": [
        {"stage": "ltri", "budget_tokens": 96, "max_span_pages": 3, "decode_span_pages": 1, "rep_dtype": "int8"},
        {"stage": "art", "stop": "certified", "delta": 0.05}]},
}


@pytest.mark.parametrize("stack", sorted(DEVICE_ONLY))
def test_graph_path_equals_eager_path_fp32(stack, no_tf32):
    model = tiny_llama(1024).to("cuda", torch.float32)
    pipe = ckv.compile({"name": stack, **DEVICE_ONLY[stack]})
    out = {p: hf.generate(model, None, _prompts(), pipe, max_new_tokens=24, stop_at_eos=False, decode_path=p)
           for p in ("graph", "device")}
    assert out["graph"].decode_path == "graph" and out["graph"].sequences == out["device"].sequences
    assert [s.kv_bytes_read for s in out["graph"].steps] == [s.kv_bytes_read for s in out["device"].steps]


@pytest.mark.parametrize("stack", ["ltri_art", "attention_predictor_art", "ltri_int8_art"])
def test_a_step_is_one_graph_replay_with_no_sync(stack):
    model = tiny_llama(1024).to("cuda", torch.bfloat16)
    s = hf.PolicySession(model, ckv.compile({"name": stack, **{**STACKS, **DEVICE_ONLY}[stack]}),
                         max_total_tokens=600, batch_size=3)
    assert s.decode_path == "graph" and "graph-safe" in s.decode_path_reason
    assert_replays_without_sync(s, _prompts())  # the first step runs eagerly, then replays


@pytest.mark.timing
@pytest.mark.xfail(strict=True, reason="attention_predictor's paper setting (configs/attention_predictor.yaml: 64 "
                   "steps of history, the CNN every step) is about 25x Quest's layer (H200, 74365d0; BENCHMARKS.md); "
                   "strict: the day it is <= 1.5x this fails, so the mark goes")
def test_per_layer_cost_against_quest_attention_predictor_paper_setting():
    """Issue 17's predictor target at B=16, 32k (Llama-8B heads, bf16, one replayed layer) for the stage's default
    (the paper's) setting: <= 1.5x Quest over its calibration cycle. Prints the table."""
    by, targets = _cost_rows(["quest", "attention_predictor"])
    assert by["attention_predictor (cycle)"] <= targets["attention_predictor"], by


@pytest.mark.timing
def test_per_layer_cost_against_quest_shipped_settings():
    """Issue 17's targets at B=16, 32k (Llama-8B heads, bf16, one replayed layer): configs/ltri.yaml's setting (4
    int8 keys a span; 1.15x at 74365d0) and ltri with 2 bf16 keys a span (configs/eval/ltri-r2.yaml, 1.07x) <= 1.2x
    Quest; the predictor's fast setting (configs/eval/attention_predictor-fast.yaml, 1.40x) <= 1.5x."""
    by, targets = _cost_rows(["quest", "attention_predictor-fast", "ltri", "ltri-r2"])
    assert by["attention_predictor-fast"] <= targets["attention_predictor"], by
    assert by["ltri"] <= targets["ltri"], by
    assert by["ltri-r2"] <= targets["ltri"], by


def _cost_rows(methods):
    """({method: x Quest}, issue 17's targets) from benchmarks/seed_methods_cost.py (on the test path)."""
    import seed_methods_cost as bench
    rows = bench.rows_for("llama-8b", 16, 32768, torch.device("cuda"), "attend", 1024, reps=20, methods=methods)
    for r in rows:
        print(r)
    return {r["method"]: r["x_quest"] for r in rows}, bench.TARGETS
