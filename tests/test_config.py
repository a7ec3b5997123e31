"""YAML policies: every shipped config validates; every kind of bad file gets a precise error."""
import subprocess
import sys
from pathlib import Path

import pytest

import composable_kv as ckv
from composable_kv.cli import main as ckv_main

pytestmark = pytest.mark.cpu
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

GOOD = """\
name: quest-art
page_size: 16
dense_layers: [0, 1]
stages:
  - stage: sink_window
    sink_tokens: 64
    window_tokens: 256
  - stage: quest
    budget_tokens: 2048
  - stage: art
    stop: certified
    delta: 0.01
"""


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_cover_the_stacks():
    names = {p.stem for p in CONFIGS}
    assert {"dense", "streaming", "topk", "quest", "quest_art", "sink_window_quest_art", "dense_art"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_compiles(path):
    pipe = ckv.compile(path)
    assert pipe.terminal.kind == "terminal" and pipe.page_size == 16


def test_good_policy_round_trip(tmp_path):
    pipe = ckv.compile(write(tmp_path, GOOD))
    assert [s.name for s in pipe.config.stages] == ["sink_window", "quest", "art"]
    assert pipe.config.stages[1].budget_tokens == 2048
    assert pipe.dense_layers == {0, 1}
    assert pipe.required_summaries == {"key_minmax"}  # value_norm is read by no stage: not kept


def test_dict_policy_equals_file(tmp_path):
    import yaml
    a = ckv.compile(yaml.safe_load(GOOD)).config
    b = ckv.compile(write(tmp_path, GOOD)).config
    assert a.stages == b.stages and a.page_size == b.page_size


# (mutation of GOOD, expected key path, expected line, words the message must contain)
BAD = [
    ("syntax", GOOD.replace("  - stage: quest\n", "  - stage: [quest\n"), None, None, ["YAML syntax error"]),
    ("unknown stage", GOOD.replace("stage: quest", "stage: qest"), "stages[1].stage", 8,
     ["unknown stage 'qest'", "did you mean 'quest'", "valid stages", "sink_window"]),
    ("unknown key", GOOD.replace("budget_tokens", "budget_tokns"), "stages[1].budget_tokns", 9,
     ["unknown key", "did you mean 'budget_tokens'"]),
    ("wrong type", GOOD.replace("budget_tokens: 2048", "budget_tokens: lots"), "stages[1].budget_tokens", 9,
     ["expected int", "'lots' (str)"]),
    ("bool is not int", GOOD.replace("budget_tokens: 2048", "budget_tokens: true"), "stages[1].budget_tokens", 9,
     ["expected int", "True (bool)"]),
    ("out of range", GOOD.replace("budget_tokens: 2048", "budget_tokens: -5"), "stages[1].budget_tokens", 9,
     ["out of range", "-5"]),
    ("delta range", GOOD.replace("delta: 0.01", "delta: 1.0"), "stages[2].delta", 12, ["0 < delta < 1"]),
    ("bad choice", GOOD.replace("stop: certified", "stop: sometimes"), "stages[2].stop", 11,
     ["expected one of", "'certified'", "'stability'", "sometimes"]),
    ("no terminal", GOOD.split("  - stage: art")[0], "stages", None, ["no terminal stage", "attend", "art"]),
    ("stage after terminal", GOOD + "  - stage: quest\n", "stages[3]", None,
     ["comes after the terminal stage 'art'"]),
    ("page_size not pow2", GOOD.replace("page_size: 16", "page_size: 12"), "page_size", 2,
     ["power of two", "12"]),
    ("page_size type", GOOD.replace("page_size: 16", "page_size: sixteen"), "page_size", 2,
     ["power of two", "'sixteen' (str)"]),
    ("unknown top key", GOOD.replace("dense_layers:", "dense_layer:"), "dense_layer", 3,
     ["did you mean 'dense_layers'"]),
    ("dense_layers type", GOOD.replace("[0, 1]", "[0, x]"), "dense_layers", 3, ["list of layer indices"]),
    ("empty stages", "name: x\nstages: []\n", "stages", 2, ["non-empty list"]),
    ("stage not a mapping", GOOD.replace("  - stage: quest\n    budget_tokens: 2048\n", "  - quest\n"),
     "stages[1]", 8, ["'stage' key"]),
    ("not a mapping", "- just\n- a list\n", "", None, ["expected a mapping"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_policy_errors(tmp_path, case):
    _, text, key_path, line, words = case
    path = write(tmp_path, text)
    with pytest.raises(ckv.ConfigError) as info:
        ckv.compile(path)
    msg = str(info.value)
    assert str(path) in msg
    if key_path is not None:
        assert info.value.key_path == key_path, msg
    if line is not None:
        assert info.value.line == line, msg
        assert f"{path}:{line}:" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_file_error():
    with pytest.raises(ckv.ConfigError, match="policy file not found"):
        ckv.compile("configs/does_not_exist.yaml")


def test_validate_cli_ok_and_fail(tmp_path, capsys):
    assert ckv_main(["validate", *map(str, CONFIGS)]) == 0
    bad = write(tmp_path, GOOD.replace("stage: quest", "stage: qest"))
    assert ckv_main(["validate", str(CONFIGS[0]), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unknown stage 'qest'" in err and "Traceback" not in err


def test_validate_cli_subprocess_no_traceback(tmp_path):
    bad = write(tmp_path, "stages:\n  - stage: [oops\n")
    r = subprocess.run([sys.executable, "-m", "composable_kv.cli", "validate", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert "YAML syntax error" in r.stderr and "Traceback" not in r.stderr


def test_stages_cli_lists_every_stage(capsys):
    assert ckv_main(["stages"]) == 0
    out = capsys.readouterr().out
    for name, cls in ckv.registered_stages().items():
        assert name in out and cls.paper in out
