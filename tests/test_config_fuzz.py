"""Config fuzzing: random mutations of every shipped configs/**/*.yaml (globbed at test time) -- deleted
keys, swapped types, unknown keys and stage names, reordered / duplicated / dropped stages, out-of-range
and non-finite numbers, broken YAML text -- are either accepted or refused with a ConfigError whose
message names the key path. Nothing else may escape: an accepted policy also compiles, describes
itself and, where the original runs on a plain cache, plans and runs one step on the reference path.
"""
import copy
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

import composable_kv as ckv

pytestmark = pytest.mark.cpu
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
ODD_VALUES = ["x", "", 3, -1, 0, 2.5, True, None, [], [1, "a"], {}, {"a": 1}, math.nan, math.inf, -math.inf,
              10 ** 12, "quest", 1e-30]
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def leaf_paths(node, path=()):
    """Every (path, value) in the tree; a path is a tuple of keys / list indices."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaf_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaf_paths(v, path + (i,))


def key_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def get(node, path):
    for p in path:
        node = node[p]
    return node


def mutate(data, rng: random.Random):
    """One random mutation in place; returns the key path it touched (top component is what matters)."""
    paths = [p for p, _ in leaf_paths(data) if p]
    stages = data.get("stages") if isinstance(data.get("stages"), list) else None
    op = rng.choice(["delete", "retype", "unknown_key", "stage_name", "reorder", "duplicate", "number", "drop"])
    if op in ("reorder", "duplicate", "drop") and stages:
        if op == "reorder":
            rng.shuffle(stages)
        elif op == "duplicate":
            stages.insert(rng.randrange(len(stages) + 1), copy.deepcopy(rng.choice(stages)))
        else:
            stages.pop(rng.randrange(len(stages)))
        return ("stages",)
    if op == "stage_name" and stages:
        i = rng.randrange(len(stages))
        if isinstance(stages[i], dict):
            name = str(stages[i].get("stage", "quest"))
            stages[i]["stage"] = rng.choice([name[:-1], name + "s", name.upper(), "no_such_stage", 7, None,
                                             [name], {name: 1}])
            return ("stages", i, "stage")
    if op == "unknown_key":
        maps = [p for p, v in leaf_paths(data) if isinstance(v, dict)]
        p = rng.choice(maps)
        key = rng.choice(["bogus", "budget_tokns", "Stage", "page-size", "delta "])
        get(data, p)[key] = 1
        return p + (key,)
    if op == "number":
        nums = [p for p in paths if isinstance(get(data, p), (int, float)) and not isinstance(get(data, p), bool)]
        if nums:
            p = rng.choice(nums)
            v = get(data, p)
            get(data, p[:-1])[p[-1]] = rng.choice([-v, -1, 0, v * 10 ** 9, v + 0.5, math.nan, math.inf, 2 ** 31])
            return p
    if not paths:
        return ()
    p = rng.choice(paths)
    parent = get(data, p[:-1])
    if op == "delete" or (op == "drop" and not stages):
        del parent[p[-1]]
    else:
        parent[p[-1]] = rng.choice(ODD_VALUES)
    return p


def base_configs():
    out = []
    for path in CONFIGS:
        data = yaml.safe_load(path.read_text())
        try:
            ckv.load_policy(path)
        except ckv.ConfigError:
            continue  # a config shipped broken is test_config's business
        out.append((path, data))
    return out


BASES = base_configs()


def smoke(pipe):
    """Plan and run one step on a tiny cache (reference path)."""
    cache = ckv.PagedKVCache(2, 2, 16, 64, page_size=pipe.page_size, dtype=torch.float32,
                             summaries=pipe.required_summaries)
    ids = []
    for n in (1, 3 * pipe.page_size + 1):
        sid = cache.add_sequence()
        cache.append([sid], [n], torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 16))
        ids.append(sid)
    pipe.plan(cache, ids)
    for layer in range(2):
        res = pipe.run(torch.randn(2, 4, 16), cache, layer)
        assert bool(torch.isfinite(res.out).all())


def runs_on_plain_cache(data) -> bool:
    try:
        smoke(ckv.compile(copy.deepcopy(data), backend="reference"))
        return True
    except Exception:
        return False


# stages that run on a plain cache with nothing else (no trained weights, no prefill observer, no gate)
SELF_CONTAINED = {"sink_window", "quest", "topk", "key_shadow", "attend", "art"}
RUNNABLE = {str(p): runs_on_plain_cache(d) for p, d in BASES}


def test_configs_found():
    assert len(BASES) >= 5 and sum(RUNNABLE.values()) >= 5, (len(BASES), RUNNABLE)


@FUZZ
@given(which=st.integers(0, 10 ** 6), seed=st.integers(0, 2 ** 32 - 1), n_mut=st.integers(1, 3))
def test_mutated_configs_are_accepted_or_refused_with_a_key_path(which, seed, n_mut):
    path, data = BASES[which % len(BASES)]
    data = copy.deepcopy(data)
    rng = random.Random(seed)
    touched = [mutate(data, rng) for _ in range(n_mut)]
    try:
        pipe = ckv.compile(data, backend="reference")
    except ckv.ConfigError as e:
        assert e.key_path, f"{path.name}: no key path in {e}"
        assert e.key_path in str(e)
        if n_mut == 1 and touched[0]:
            top = key_path(touched[0][:1])
            assert e.key_path.split(".")[0].split("[")[0] == top, (touched, str(e))
        return
    pipe.describe("cpu")
    if RUNNABLE[str(path)] and {s.name for s in pipe.config.stages} <= SELF_CONTAINED:
        smoke(pipe)


@pytest.mark.parametrize("name", [["quest"], {"quest": 1}, 7, None, True])
def test_non_string_stage_names_are_refused(name):
    with pytest.raises(ckv.ConfigError, match=r"stages\[0\].stage: "):
        ckv.compile({"stages": [{"stage": name}, {"stage": "attend"}]})


def test_non_finite_floats_are_refused():
    for value in (math.nan, math.inf, -math.inf):
        pol = {"stages": [{"stage": "art", "stop": "stability", "scale_tol": value}]}
        with pytest.raises(ckv.ConfigError, match=r"stages\[0\].scale_tol: .*finite"):
            ckv.compile(pol)


@FUZZ
@given(which=st.integers(0, 10 ** 6), seed=st.integers(0, 2 ** 32 - 1))
def test_broken_yaml_text_is_a_config_error(which, seed, tmp_path_factory):
    path, _ = BASES[which % len(BASES)]
    lines = path.read_text().splitlines()
    rng = random.Random(seed)
    i = rng.randrange(len(lines))
    op = rng.choice(["drop", "dup", "indent", "garbage", "truncate", "tab"])
    if op == "drop":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    elif op == "indent":
        lines[i] = "   " + lines[i]
    elif op == "garbage":
        lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)] + rng.choice([": :", "[", "}", "- -", "'", "&a *b"])
    elif op == "truncate":
        lines = lines[:i]
    else:
        lines[i] = "\t" + lines[i]
    f = tmp_path_factory.mktemp("fuzz") / path.name
    f.write_text("\n".join(lines) + "\n")
    try:
        pipe = ckv.compile(f, backend="reference")
    except ckv.ConfigError as e:
        assert str(e).startswith(str(f)), str(e)  # names the file (and the line / key path where known)
        assert e.key_path or "YAML" in str(e) or "mapping" in str(e), str(e)
        return
    pipe.describe("cpu")
