"""The README's custom-selector example runs as written and stacks with art."""
import re
from pathlib import Path

import pytest
import torch

import composable_kv as ckv

from helpers import build_cache, dense_attention

pytestmark = pytest.mark.cpu
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- example: custom-selector -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its custom-selector example"
    return m.group(1)


def test_example_is_short():
    assert len(readme_example().strip().splitlines()) <= 20


def test_readme_custom_selector_runs_with_art(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    pipe = scope["pipe"]
    assert [s.name for s in pipe.config.stages] == ["key_norm", "art"]
    cache, ids, keys, values = build_cache([70, 300], summaries=pipe.required_summaries)
    pipe.plan(cache, ids)
    q = torch.randn(2, 4, 16)
    res = pipe.run(q, cache, 0)
    assert res.out.shape == (2, 4, 16) and torch.isfinite(res.out).all()
    budget_pages = 4  # budget_tokens 64 / page 16
    assert (res.pages_read <= budget_pages).all() and (res.pages_read >= 1).all()
    # with a budget over the length, the custom stack equals dense attention
    big = ckv.compile({"stages": [{"stage": "key_norm", "budget_tokens": 10**6},
                                  {"stage": "art", "stop": "certified", "delta": 1e-30}]})
    big.plan(cache, ids)
    torch.testing.assert_close(big.run(q, cache, 0).out, dense_attention(q, keys, values), rtol=1e-5, atol=1e-5)


def test_duplicate_stage_name_is_refused():
    from dataclasses import dataclass

    @dataclass
    class Other(ckv.ScoringSelector):
        name = "quest"

        def score(self, ctx):
            return ctx.quest_bound()

    with pytest.raises(ValueError, match="already registered"):
        ckv.register_stage(Other)


def test_score_with_wrong_shape_is_named():
    from dataclasses import dataclass

    from composable_kv.stages import registered_stages, unregister_stage

    @ckv.register_stage
    @dataclass
    class BadShape(ckv.ScoringSelector):
        name = "bad_shape_test"

        def score(self, ctx):
            return torch.zeros(1)

    try:
        pipe = ckv.compile({"stages": [{"stage": "bad_shape_test", "budget_tokens": 16}, {"stage": "attend"}]})
        cache, ids, *_ = build_cache([40], summaries=pipe.required_summaries)
        pipe.plan(cache, ids)
        with pytest.raises(ValueError, match=r"bad_shape_test.*score\(\) returned shape \(1,\)"):
            pipe.run(torch.randn(1, 2, 16), cache, 0)
    finally:  # a broken stage must not stay registered: tests/test_every_stage.py runs every registered one
        unregister_stage("bad_shape_test")
    assert "bad_shape_test" not in registered_stages()


def test_stage_protocol_hooks_are_declared_not_discovered():
    """Core reads declared hooks: fused parts, prefill / page-mass observers, graph support, stop rules."""
    from dataclasses import dataclass

    from composable_kv.policies.quest import Quest
    from composable_kv.stages import GraphSupport, ScoreKind, register_stage, registered_stages

    @register_stage
    @dataclass
    class HalfQuest(Quest):
        name = "half_quest_protocol_test"

        def score(self, ctx):
            return super().score(ctx) * 0.5

    mine = ckv.compile({"stages": [{"stage": "half_quest_protocol_test", "budget_tokens": 32}, {"stage": "art"}]})
    assert mine.selectors[0].fused_part(16) is None  # overrides score(): Quest's kernel would be wrong for it
    assert not mine.fused_spec.fused and "has no fused part" in mine.fused_spec.reason
    plain = ckv.compile({"stages": [{"stage": "quest", "budget_tokens": 32}, {"stage": "art"}]})
    assert plain.fused_spec.fused and plain.fused_spec.score is ScoreKind.BOX
    stages = registered_stages()
    assert {n for n, c in stages.items() if c.observe_prefill is not stages["quest"].observe_prefill} >= \
        {"ltri", "attention_predictor", "snapkv"}
    assert stages["attention_predictor"]().observes_page_mass and not stages["quest"]().observes_page_mass
    assert stages["ltri"].graph_support is stages["quest"].graph_support is GraphSupport.ALWAYS
    assert stages["attend"]().stop_rule().kind is None and stages["art"]().stop_rule().kind == "certified"


@pytest.mark.parametrize("stages", [
    [{"stage": "quest", "budget_tokens": 64}, {"stage": "attend"}],
    [{"stage": "topk", "budget_tokens": 48}, {"stage": "art", "stop": "certified", "delta": 0.05}],
    [{"stage": "sink_window", "sink_tokens": 16, "window_tokens": 32}, {"stage": "quest", "budget_tokens": 96},
     {"stage": "key_shadow", "bits": 8, "budget_tokens": 64}, {"stage": "art", "stop": "certified", "delta": 0.01}],
], ids=["quest", "topk_art", "sink_window_quest_shadow_art"])
def test_the_last_selectors_narrow_is_the_read_order(stages, monkeypatch):
    """select() reads the last selector's kept pages in its narrow's order instead of selecting them again: the
    same order, count and bounds as ordering the kept pages anew."""
    from composable_kv.pipeline import LayerContext, SelectionState
    pipe = ckv.compile({"name": "t", "stages": stages}, backend="reference")
    cache, ids, _, _ = build_cache([70, 300, 161], num_kv_heads=2, summaries=pipe.required_summaries, seed=3)
    pipe.plan(cache, ids)
    ctx = LayerContext(torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1)), cache, 0, pipe._plan,
                       16 ** -0.5, "reference")
    reused = pipe.select(ctx)
    narrow = SelectionState.narrow

    def narrow_forgetting(self, *a, **kw):
        narrow(self, *a, **kw)
        self.selected = None  # select() must order the kept pages itself

    monkeypatch.setattr(SelectionState, "narrow", narrow_forgetting)
    anew = pipe.select(ctx)
    assert (reused[1] < 20).all() and (reused[1] > 0).all()  # a real selection: not every page
    for got, want in zip(reused, anew):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)
