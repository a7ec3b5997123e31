"""policies/ and kernels/ import as composable_kv.* from a clone and from a built wheel, never bare."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu
ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import composable_kv, composable_kv.policies.quest, composable_kv.kernels.paged_decode.reference as r, "
         "importlib.util as u; print(composable_kv.__file__); print(r.__file__); "
         "print(u.find_spec('kernels') is None, u.find_spec('policies') is None)")


def test_imports_from_clone():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    pkg, ref, bare = out.stdout.split("\n")[:3]
    assert pkg.startswith(str(ROOT / "composable_kv")) and ref.startswith(str(ROOT / "kernels"))


def test_imports_from_wheel(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("composable_kv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "composable_kv/policies/quest.py" in names
    assert "composable_kv/kernels/paged_decode/reference.py" in names
    assert "composable_kv/configs/quest_art.yaml" in names and "composable_kv/configs/eval/quest-1536.yaml" in names
    assert not any(n.startswith(("kernels/", "policies/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    pkg, ref, bare = out.stdout.split("\n")[:3]
    assert pkg.startswith(str(site)) and ref.startswith(str(site / "composable_kv" / "kernels"))
    assert bare == "True True"
    # the README's policy paths work from any folder with the installed package: configs are package data
    probe = ("import composable_kv as c; print(c.compile('configs/quest_art.yaml').name, c.compile('dense').name, "
             "c.config.shipped_configs_dir())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["quest-art", "dense"] and str(site) in out.stdout
