"""Bad command-line input: exit code 2, one line naming the flag, no traceback, nothing evaluated."""

import pytest

from composable_kv import cli
from composable_kv.eval import cli as eval_cli

pytestmark = pytest.mark.cpu


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    def load(*_a, **_k):
        raise AssertionError("the model was loaded: the bad input was not caught first")
    monkeypatch.setattr(eval_cli, "_setup", load)


def _ckv(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    assert err.startswith(cli.ERROR_PREFIX) and err.count("\n") == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err


@pytest.mark.parametrize("argv, needle", [
    (["--samples-per-depth", "0"], "--samples-per-depth"),
    (["--samples-per-depth", "-1"], "--samples-per-depth"),
    (["--batch-size", "0"], "--batch-size"),
    (["--depths", "abc"], "--depths"),
    (["--depths", "0.5,1.5"], "--depths"),
    (["--threads", "0"], "--threads"),
    (["--ctx", "zero"], "--ctx"),
    (["--task", "nope"], "--task"),
])
def test_bad_flag_values(argv, needle, capsys, no_model, tmp_path):
    code, err = _ckv(["eval", "--policy", "configs/dense.yaml", "--out", str(tmp_path), *argv], capsys)
    _assert_one_line_error(code, err, needle)


def test_out_is_an_existing_file(capsys, no_model, tmp_path):
    mine = tmp_path / "README.md"
    mine.write_text("not ours")
    code, err = _ckv(["eval", "--policy", "configs/dense.yaml", "--out", str(mine)], capsys)
    _assert_one_line_error(code, err, "--out", "existing file")
    assert mine.read_text() == "not ours"


def test_out_cannot_be_written(capsys, no_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _ckv(["demo", "--out", str(blocker / "results")], capsys)  # a folder below a file
    _assert_one_line_error(code, err, "--out", "cannot write there")


def test_good_out_folder_is_created_before_the_model_loads(tmp_path):
    out = eval_cli.prepare_out_dir(str(tmp_path / "a" / "b"))
    assert out.is_dir() and list(out.iterdir()) == []


def test_duplicate_policy_names_are_refused(capsys, no_model, tmp_path):
    code, err = _ckv(["eval", "--policy", "configs/quest.yaml", "--policy", "configs/quest.yaml",
                      "--out", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, "share the name 'quest'")


def test_describe_defaults_to_a_device_that_exists(capsys):
    import torch

    import composable_kv as ckv
    assert cli.main(["describe", "configs/quest_art.yaml"]) == 0
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert capsys.readouterr().out.strip() == ckv.compile("configs/quest_art.yaml").describe(here)
