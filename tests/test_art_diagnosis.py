"""benchmarks/art_diagnosis.py per layer on random tensors: every selector setting, ltri (which reads every
prompt query) included, keeps pages whose dense softmax mass it reports."""
import argparse

import pytest
import torch

import art_diagnosis as diag  # benchmarks/ is on the test path
import composable_kv as ckv

pytestmark = pytest.mark.cpu


def _args(budget):
    return argparse.Namespace(queries=2, ctx=256, snap_window=16, cache_dtype="float32", device="cpu",
                              budget=budget, window_tokens=64, rules="oracle 0.05", settings="quest,ltri,snapkv")


@pytest.mark.parametrize("budget", [64, 4096])
def test_selectors_report_the_mass_they_keep(budget):
    args = _args(budget)
    g = torch.Generator().manual_seed(0)
    Hkv, Hq, D, T = 2, 4, 16, args.ctx + args.queries
    k, v = torch.randn(Hkv, T, D, generator=g), torch.randn(Hkv, T, D, generator=g)
    q_all = torch.randn(Hq, T, D, generator=g)
    q_tail = q_all[:, args.ctx - args.snap_window:]
    pipes = {name: ckv.compile({"name": name, "page_size": diag.PAGE, "dense_layers": [], "stages": stages},
                               backend="reference")
             for name, stages in diag.settings(args).items() if name in ("quest", "ltri", "ltri_attn8", "snapkv")}
    rows, _, _ = diag.run_layer(3, k, v, q_tail, q_all[:, :args.ctx], args, D ** -0.5, pipes)
    by = {r["setting"]: r for r in rows}
    assert set(by) == {"quest", "ltri", "ltri_attn8", "snapkv"}
    for r in rows:
        assert 0 < r["kept_mass"] <= 1 + 1e-5 and r["pages_kept"] > 0
        if budget >= T:  # the budget holds every page: all the mass is kept
            assert r["kept_mass"] == pytest.approx(1.0, abs=1e-5)
        else:
            assert r["pages_kept"] <= budget // diag.PAGE + 2 and r["kept_mass"] < 1  # random keys: a real miss
