"""Every registered stage, read from the registry when the tests run: alone and stacked under `art`,
through a whole greedy decode on a tiny random Llama (hf.generate).

For each stage and stack: the policy compiles, `describe()` names the stage and the path, the decode reads
no more than dense plus the summaries the stack declares, and, where the stack fuses, the fused Triton path
(interpreted on CPU) decodes the same tokens and reads the same bytes as the pure-torch reference. Graph
capture of every stack whose stages declare it safe runs on the GPU. A stage registered anywhere (a policy
module, a test file) joins: `ExampleRecentTopK` below is one, fused without touching core.
"""
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("transformers")
from helpers import tiny_llama  # noqa: E402

import composable_kv as ckv  # noqa: E402
from composable_kv import hf  # noqa: E402
from composable_kv.stages import (AdmissionStage, FusedPart, ScoreKind, ScoringSelector, SelectorStage,  # noqa: E402
                                  _inherits, register_stage, registered_stages)

pytestmark = pytest.mark.cpu

PAGE = 16
LAYERS, HKV, HEAD_DIM = 3, 2, 16  # tiny_llama's shape
NEW_TOKENS = 4  # the first comes from the prefill: 3 decode steps


@register_stage
@dataclass
class ExampleRecentTopK(ScoringSelector):
    """A new fused stage written outside the library: score pages by the box bound, as Quest does, but
    declare its own fused part. It touches no core file; the registry-driven tests below pick it up."""

    name = "example_recent_topk"
    paper = "test example"
    summary = "box-bound top pages (an example of a stage added outside the library)"
    score_is_bound = True

    def required_summaries(self):
        from composable_kv.summaries import KEY_MINMAX
        return frozenset({KEY_MINMAX})

    def fused_part(self, page_size: int) -> FusedPart | None:
        if not _inherits(self, ExampleRecentTopK, "score", "apply", "plan_forced"):
            return None
        return FusedPart(score=ScoreKind.BOX, budget_tokens=self.budget_tokens)

    def score(self, ctx):
        return ctx.quest_bound()  # [B, Hkv, P]


def _example_params(name: str, tmp_path) -> dict:
    """Parameters a stage needs to run on the tiny model: a budget below the prompts, trained files."""
    cls = registered_stages()[name]
    params = {}
    fields = {f.name for f in cls.params()}
    if "budget_tokens" in fields:
        params["budget_tokens"] = 2 * PAGE
    if name == "attention_predictor":  # its fused CNN, interpreted on CPU, walks the H history steps one by one
        params["history_steps"] = 4
    if name == "write_gate":
        from composable_kv.policies.write_gate import GateMLP
        path = tmp_path / "gate.pt"
        with torch.random.fork_rng():
            torch.manual_seed(0)
            GateMLP(LAYERS, HKV, HEAD_DIM, hidden=8).save(path, {"note": "untrained, for the test"})
        params.update(weights=str(path), window_tokens=2 * PAGE)
    return params


def stacks(name: str, tmp_path) -> dict[str, list[dict]]:
    """The stage alone (with `attend` after a selector or admission stage), and stacked under `art`."""
    cls = registered_stages()[name]
    own = {"stage": name, **_example_params(name, tmp_path)}
    if issubclass(cls, (SelectorStage, AdmissionStage)):
        return {"alone": [own, {"stage": "attend"}], "art": [own, {"stage": "art"}]}
    return {"alone": [own]}


def policy(stages: list[dict]) -> dict:
    return {"name": "t", "page_size": PAGE, "dense_layers": [0], "stages": stages}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(256)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in (90, 61)]


def _dense_bytes_per_step(prompts, step: int) -> int:
    """K and V of every token of every layer, fp32, at this decode step (the new token included)."""
    tokens = sum(len(p) + step + 1 for p in prompts)
    return 2 * LAYERS * HKV * HEAD_DIM * 4 * tokens


def test_registry_holds_the_builtins_and_the_example():
    names = set(registered_stages())
    assert {"attend", "art", "quest", "topk", "sink_window", "snapkv", "example_recent_topk"} <= names


def test_every_stage_alone_and_under_art(model, prompts, tmp_path):
    failures = []
    for name in registered_stages():
        for label, stages in stacks(name, tmp_path).items():
            try:
                _check_stack(model, prompts, name, stages)
            except Exception as e:  # noqa: BLE001 (collected: one report names every failing stage)
                failures.append(f"{name} [{label}]: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    assert not failures, "\n".join(failures)


def _check_stack(model, prompts, name, stages):
    ref_pipe = ckv.compile(policy(stages), backend="reference")
    text = ref_pipe.describe("cpu")
    assert name in text, f"describe() does not name the stage: {text!r}"
    ref = hf.generate(model, None, prompts, policy=ref_pipe, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    assert len(ref.steps) == NEW_TOKENS - 1
    for i, step in enumerate(ref.steps):
        read = sum(step.kv_bytes_read)
        assert read > 0, f"step {i} reads nothing"
        limit = 1.5 * _dense_bytes_per_step(prompts, i)  # the largest summary (topk's: every key) is half of K/V
        assert read <= limit, f"step {i} reads {read} bytes, more than dense K/V plus every key ({limit:.0f})"
    fused_pipe = ckv.compile(policy(stages), backend="triton")
    if fused_pipe.fused_spec is None:
        return
    fused = hf.generate(model, None, prompts, policy=fused_pipe, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    assert fused.sequences == ref.sequences, "the fused path decodes other tokens than the reference"
    assert [s.kv_bytes_read for s in fused.steps] == [s.kv_bytes_read for s in ref.steps], \
        "the fused path reads other bytes than the reference"


@pytest.mark.gpu
def test_every_graph_safe_stack_captures_and_replays_like_eager(tmp_path):
    model = tiny_llama(256).cuda()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (90, 61)]
    failures = []
    for name in registered_stages():
        for label, stages in stacks(name, tmp_path).items():
            pipe = ckv.compile(policy(stages))
            if not pipe.graph_safe:
                continue
            try:
                eager = hf.generate(model, None, prompts, policy=pipe, max_new_tokens=NEW_TOKENS, stop_at_eos=False,
                                    decode_path="device")
                graph = hf.generate(model, None, prompts, policy=pipe, max_new_tokens=NEW_TOKENS, stop_at_eos=False,
                                    decode_path="graph")
                assert graph.decode_path == "graph" and graph.sequences == eager.sequences
            except Exception as e:  # noqa: BLE001
                failures.append(f"{name} [{label}]: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    assert not failures, "\n".join(failures)
