"""Profiles: loading, merging and path discovery (no stage knows this module's internals).

A profile is ``configs/<name>.yaml``: ``extends: <profile>`` takes that profile and lists only what
differs (the shipped ones extend ``configs/base.yaml``, the settings they all share, which is not a
profile itself).  Every key must be known (a typo is an error, not a silently ignored setting) and every
value is checked against its dataclass field's type.  The sections themselves are declared by the
stage modules (``microlm/stages/<stage>.py``); ``microlm.stages.load_config`` puts them together.
``overrides`` take ``"section.key=value"`` strings (values parsed as YAML), as the CLI's ``--set``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from microlm.errors import ConfigError
from microlm.paths import ENV_RUNS, REPO_ROOT, project_root

PROFILES = ("smoke", "cpu", "laptop", "gpu")
BASE = "base"  # configs/base.yaml: the settings every profile shares (``extends: base``); not a profile
CONFIG_DIR = REPO_ROOT / "configs"
ENV_QWEN = "MICROLM_QWEN"  # a local Qwen2.5 folder (or hub id): overrides the profile's ``qwen``


def runs_root() -> Path:
    """Where stage folders go: ``$MICROLM_RUNS``, else ``<project root>/runs``, else ``./runs`` —
    never inside the installed package."""
    env = os.environ.get(ENV_RUNS)
    if env:
        return Path(env).resolve()
    return (project_root() or Path.cwd()) / "runs"


@dataclass
class DataConfig:
    """Where the real datasets live and which files feed the pretraining corpus."""

    root: str | None = None  # falls back to $MICROLM_DATA, then to the embedded default
    pretrain: list[str] = field(default_factory=lambda: ["pretrain/*.jsonl.gz"])
    max_records: int | None = None  # per run, across all inputs (None = all)


@dataclass
class ConfigBase:
    """The settings every stage shares; ``microlm.stages.Config`` adds one section per stage."""

    profile: str = "smoke"
    seed: int = 1234
    # the Qwen2.5 instruct model of pipeline B, named once: a hub id (fetched by transformers' cache where
    # there is internet; HF_HUB_OFFLINE=1 respected) or a local folder; ``$MICROLM_QWEN`` overrides it.
    # Model entries say ``qwen`` (ie_lora.runs[].base, ie_eval.models[].model) to mean this model.
    qwen: str | None = None
    run_dir: str | None = None  # default: runs/<profile>
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def run_path(self) -> Path:
        """``run_dir`` when set (relative to the project root), else ``runs_root()/<profile>``."""
        if self.run_dir:
            p = Path(self.run_dir)
            return p if p.is_absolute() else (project_root() or Path.cwd()) / p
        return runs_root() / self.profile

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(a, k) and _type_ok(b, v) for a, b in value.items())
    if tp is float:  # a number, and a finite one (YAML's .inf and .nan are not settings)
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """``cls`` from a mapping, strictly: unknown keys and values of the wrong type are one-line errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (allowed here: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value, path)
        else:
            if not _type_ok(value, tp):
                raise ConfigError(f"config key '{path}': {value!r} is not of type {_type_name(tp)}")
            kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def require(checks: Iterable[tuple[bool, str]], prefix: str = "") -> None:
    """Raise a ``ConfigError`` (``prefix`` + message) for the first check that failed."""
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{prefix}{msg}")


def with_settings(section: Any, over: Any, where: str, *, fixed: tuple[str, ...] = ()) -> Any:
    """A copy of ``section`` (a dataclass) with the dotted settings of ``over`` applied, checked like a
    profile (``fixed``: keys that cannot be set this way)."""
    if not isinstance(over, dict):
        raise ConfigError(f"{where}: must be a mapping of settings, got {over!r}")
    raw = dataclasses.asdict(section)
    for key, value in over.items():
        if not isinstance(key, str) or key.split(".")[0] in fixed:
            raise ConfigError(f"{where}: cannot set {key!r}")
        set_path(raw, key, value)
    try:
        return build_dataclass(type(section), raw, where)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"{where}.", f"{where}: ")) from None


def set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def resolve_config_path(profile_or_path: str | os.PathLike) -> Path:
    s = str(profile_or_path)
    if s in PROFILES or (os.sep not in s and not s.endswith((".yaml", ".yml"))):
        root = project_root()  # a project's own configs/ first, then the ones shipped with the code
        local = root / "configs" / f"{s}.yaml" if root else None
        path = local if local is not None and local.is_file() else CONFIG_DIR / f"{s}.yaml"
    else:
        path = Path(s)
    if not path.is_file():
        raise ConfigError(f"config not found: {path} (profiles: {', '.join(PROFILES)})")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty (copy a profile from configs/ and edit it)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A profile's settings: its file on top of the profile it ``extends`` (which lists only what differs)."""
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path.name}: extends must name a profile, got {parent!r}")
    sibling = path.parent / f"{parent}.yaml"  # the profile beside the file first (a project's own configs/ cannot shadow the shipped base)
    ppath = sibling if sibling.is_file() else resolve_config_path(parent)
    if ppath.resolve() in seen or ppath.resolve() == path.resolve():
        raise ConfigError(f"{path.name}: extends {parent!r} makes a cycle")
    base = _read_profile(ppath, (*seen, path.resolve()))
    base.pop("profile", None)  # the child's name, not the parent's
    return _merge(base, raw)


def read_settings(profile_or_path: str | os.PathLike = "smoke",
                  overrides: list[str] | dict | None = None) -> tuple[Path, dict]:
    """A profile's file and its settings (``extends`` resolved, ``section.key=value`` overrides applied)."""
    path = resolve_config_path(profile_or_path)
    raw = _read_profile(path)
    if path.stem == BASE and "profile" not in raw:
        raise ConfigError(f"{path.name} holds the settings every profile shares, it is not a profile to run "
                          f"(profiles: {', '.join(PROFILES)})")
    raw.setdefault("profile", path.stem)
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        set_path(raw, key, value)
    return path, raw


def build_config(cls: type, raw: dict, path: Path) -> Any:
    """The typed config ``cls`` from a profile's settings (errors name the file)."""
    try:
        cfg = build_dataclass(cls, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None
    require([(cfg.profile in PROFILES or cfg.profile.isidentifier(),
              f"profile must be a name (letters, digits, _), got {cfg.profile!r}"),
             (cfg.data.max_records is None or cfg.data.max_records >= 1, "data.max_records must be >= 1")])
    return cfg


def qwen_model(cfg: ConfigBase) -> str:
    """The Qwen model entries called ``qwen`` mean: ``$MICROLM_QWEN``, else the profile's ``qwen``."""
    q = os.environ.get(ENV_QWEN) or cfg.qwen
    if not q:
        raise ConfigError(f"a model entry says 'qwen' but profile {cfg.profile!r} names no Qwen model: set "
                          f"qwen: in the profile, or {ENV_QWEN}=/path/to/a/local/Qwen2.5-Instruct folder")
    return str(Path(q).expanduser()) if os.sep in q and Path(q).expanduser().exists() else q


def resolve_model_name(cfg: ConfigBase, name: str) -> str:
    """``qwen`` → ``qwen_model(cfg)``; any other model name or reference as given."""
    return qwen_model(cfg) if name == "qwen" else name


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def stage_config(cfg: ConfigBase, section: str) -> dict[str, Any]:
    """The part of the config a stage depends on (what its manifest fingerprints)."""
    return dataclasses.asdict(getattr(cfg, section))
