"""Load and validate a policy (YAML file or dict) into a PolicyConfig of stage instances.

Every refusal is a ConfigError naming the file, the YAML line, the key path (`stages[1].budget_tokens`),
what was expected, what was found and the valid choices.
"""
from __future__ import annotations

import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .stages import Stage, registered_stages

TOP_LEVEL_KEYS = {
    "name": "policy name (defaults to the file name)",
    "description": "free text",
    "page_size": "tokens per KV page, a power of two in [1, 256] (default 16)",
    "dense_layers": "layer indices that attend densely (default [])",
    "stages": "the stage stack: an optional admission stage first, then selectors, exactly one terminal "
              "stage (attend or art) last",
}


@dataclass
class PolicyConfig:
    name: str
    page_size: int
    dense_layers: list[int]
    stages: list[Stage]
    description: str = ""
    source: str | None = None
    raw: dict = field(default_factory=dict, repr=False)


def shipped_configs_dir() -> Path:
    """The shipped policies: ``configs/`` of a clone, or the ``composable_kv/configs`` package data of a wheel."""
    inside = Path(__file__).resolve().parent / "configs"
    return inside if inside.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped policies (``quest_art``, ``eval/quest_1024``, ...)."""
    root = shipped_configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_policy_path(policy: str | os.PathLike) -> Path:
    """A policy file: the path itself if it exists, else a shipped config named by it.

    ``configs/quest_art.yaml``, ``quest_art.yaml`` and ``quest_art`` all name the shipped policy, so the
    README's commands work from any folder and from an installed wheel."""
    path = Path(policy)
    if path.is_file():
        return path
    root = shipped_configs_dir()
    rel = Path(*path.parts[1:]) if path.parts and path.parts[0] == "configs" else path
    for candidate in (root / rel, root / rel.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"policy file not found (cwd {os.getcwd()}) and no shipped config is called that; "
                      f"pass a path to a YAML policy or a shipped name: {', '.join(shipped_configs())}",
                      source=str(policy))


def load_policy(policy) -> PolicyConfig:
    """Path to a YAML file (or a shipped config's name, see resolve_policy_path), or a dict shaped like one."""
    if isinstance(policy, dict):
        return _validate(policy, source=None, lines={})
    if not isinstance(policy, (str, os.PathLike)):
        raise ConfigError(f"expected a YAML path or a dict, got {type(policy).__name__}")
    path = resolve_policy_path(policy)
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"YAML syntax error: {problem}", source=str(path),
                          line=mark.line + 1 if mark else None) from None
    lines = _line_map(node) if node is not None else {}
    return _validate(data, source=str(path), lines=lines, default_name=path.stem)


def _line_map(node, path: str = "", out: dict | None = None) -> dict[str, int]:
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            sub = f"{path}.{k.value}" if path else str(k.value)
            out[sub] = k.start_mark.line + 1
            _line_map(v, sub, out)
            out[sub] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, f"{path}[{i}]", out)
    return out


def _suggest(word: str, options) -> str:
    near = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _check_type(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(annotation) or (typing.Any,)
        return isinstance(value, list) and all(_check_type(v, inner) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _found(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _validate(data, *, source, lines, default_name: str = "policy") -> PolicyConfig:
    def err(path, msg):
        return ConfigError(msg, path=path, source=source, line=lines.get(path))

    if not isinstance(data, dict):
        raise err("", f"expected a mapping with keys {list(TOP_LEVEL_KEYS)}, got {_found(data)}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise err(str(key), f"unknown key{_suggest(key, TOP_LEVEL_KEYS)}; valid keys: {list(TOP_LEVEL_KEYS)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise err("name", f"expected a non-empty string, got {_found(name)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise err("description", f"expected a string, got {_found(description)}")
    page_size = data.get("page_size", 16)
    if not _check_type(page_size, int) or not 1 <= page_size <= 256 or page_size & (page_size - 1):
        raise err("page_size", f"expected a power of two in [1, 256] (e.g. 16), got {_found(page_size)}")
    dense_layers = data.get("dense_layers", [])
    if not _check_type(dense_layers, list[int]) or any(x < 0 for x in dense_layers):
        raise err("dense_layers", f"expected a list of layer indices >= 0 (e.g. [0, 1]), got {_found(dense_layers)}")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise err("stages", f"expected a non-empty list of stages ending in a terminal stage "
                            f"(attend or art), got {_found(stages_raw)}")
    registry = registered_stages()
    stages: list[Stage] = []
    for i, raw in enumerate(stages_raw):
        path = f"stages[{i}]"
        stages.append(_build_stage(raw, path, registry, err))
    admissions = [i for i, s in enumerate(stages) if s.kind == "admission"]
    if admissions and admissions != [0]:
        i = admissions[-1] if admissions[0] == 0 else admissions[0]
        raise err(f"stages[{i}]", f"admission stage {stages[i].name!r} must be the first stage and the only "
                                  f"admission stage (it decides what is written; the selectors and the "
                                  f"terminal stage then read it), got {[s.name for s in stages]}")
    terminals = [i for i, s in enumerate(stages) if s.kind == "terminal"]
    terminal_names = sorted(n for n, c in registry.items() if c.kind == "terminal")
    if not terminals:
        raise err("stages", f"no terminal stage: the last stage must be one of {terminal_names}, "
                            f"got {[s.name for s in stages]}")
    if terminals[0] != len(stages) - 1:
        t = terminals[0]
        raise err(f"stages[{t + 1}]", f"stage {stages[t + 1].name!r} comes after the terminal stage "
                                      f"{stages[t].name!r} (stages[{t}]); the terminal stage must be last")
    return PolicyConfig(name, page_size, list(dense_layers), stages, description, source, data)


def _build_stage(raw, path, registry, err) -> Stage:
    valid = sorted(registry)
    if not isinstance(raw, dict) or "stage" not in raw:
        raise err(path, f"expected a mapping with a 'stage' key (one of {valid}), got {_found(raw)}")
    name = raw["stage"]
    if not isinstance(name, str):
        raise err(f"{path}.stage", f"expected a stage name (one of {valid}), got {_found(name)}")
    if name not in registry:
        raise err(f"{path}.stage", f"unknown stage {name!r}{_suggest(name, registry)}; valid stages: {valid}")
    cls = registry[name]
    fields = {f.name: f for f in cls.params()}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key == "stage":
            continue
        kpath = f"{path}.{key}"
        if key not in fields:
            raise err(kpath, f"unknown key for stage {name!r}{_suggest(key, fields)}; "
                             f"valid keys: {sorted(fields) or 'none'}")
        f, ann = fields[key], hints[key]
        if not _check_type(value, ann):
            raise err(kpath, f"expected {_type_name(ann)}, got {_found(value)}")
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise err(kpath, f"expected one of {list(meta['choices'])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise err(kpath, f"expected a finite number, got {value!r}")
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise err(kpath, f"out of range: expected a value in {rng}, got {value!r}")
        kwargs[key] = float(value) if ann is float else value
    stage = cls(**kwargs)
    try:
        stage.check()
    except ValueError as e:
        key, _, msg = str(e).partition(": ")
        sub = f"{path}.{key}" if key in fields else path
        raise err(sub, msg if key in fields else str(e)) from None
    return stage
