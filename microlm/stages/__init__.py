"""The stage layer: one module per stage of the course (``microlm/stages/<stage>.py``), the registry
core (``registry``) and the typed config put together from the stages' sections.

Each stage module declares a ``STAGE`` (its registration, with a direct reference to its ``build``),
its config section (a dataclass + ``check``) and ``build``, which unpacks its own section and calls the
domain code (``microlm.data``, ``tokenizer``, ``model``, ``train``, ``infer``, ``ie``, ``serve``).  The
modules are found here, in the package folder, and registered upstream first — adding a stage is
adding one module.  Loading a profile imports no torch: stage modules import domain code inside
their functions.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from pathlib import Path

from microlm.config import ConfigBase, ConfigError, build_config, read_settings
from microlm.stages.registry import *  # noqa: F403 — the registry's API is the package's
from microlm.stages.registry import REGISTRY, Stage, register

NOT_STAGES = ("registry", "server")  # modules of this package that declare no stage


def _discover() -> list[Stage]:
    found = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name in NOT_STAGES or info.name.startswith("_"):
            continue
        st = getattr(importlib.import_module(f"{__name__}.{info.name}"), "STAGE", None)
        if st is None:
            raise ConfigError(f"microlm/stages/{info.name}.py declares no STAGE (or list it in NOT_STAGES)")
        if st.name != info.name:
            raise ConfigError(f"microlm/stages/{info.name}.py declares stage {st.name!r}: a stage module is "
                              f"named as its stage")
        found.append(st)
    return found


def _register_in_course_order(found: list[Stage]) -> None:
    """Upstream first; among the stages ready, the course map's order (part label, then name)."""
    todo = {st.name: st for st in found}
    while todo:
        ready = [st for st in todo.values() if all(u in REGISTRY for u in st.upstream)]
        if not ready:
            raise ConfigError(f"stages {sorted(todo)} name an upstream stage that does not exist or a cycle")
        st = min(ready, key=lambda s: (s.part, s.name))
        register(st)
        del todo[st.name]


_register_in_course_order(_discover())
STAGES = REGISTRY  # the name the notebooks and tests used first


def _sections() -> list[tuple[str, type]]:
    out: list[tuple[str, type]] = []
    for st in REGISTRY.values():
        # the sections a stage brings (model, generate, serve) before its own, as the profiles list them
        out += list(st.more_sections.items()) + ([(st.name, st.section)] if st.section is not None else [])
    return out


Config = dataclasses.make_dataclass(
    "Config", [(name, tp, dataclasses.field(default_factory=tp)) for name, tp in _sections()], bases=(ConfigBase,),
    namespace={"__doc__": "A whole profile: the shared settings (``ConfigBase``) and one section per stage.",
               "__module__": __name__})


def load_config(profile_or_path: str | os.PathLike = "smoke", overrides: list[str] | dict | None = None) -> Config:
    """Load a profile name or YAML path strictly (``extends: <profile>`` takes that profile as the base
    and lists only what differs); apply ``section.key=value`` overrides; check every stage's section."""
    path, raw = read_settings(profile_or_path, overrides)
    if isinstance(raw.get("model"), dict) and "vocab_size" in raw["model"]:
        raise ConfigError(f"{path.name}: model.vocab_size is not a setting — the model takes the tokenizer's "
                          f"(set tokenizer.vocab_size)")
    cfg = build_config(Config, raw, path)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size  # one number: the model's embedding = the tokenizer's ids
    for st in REGISTRY.values():
        if st.check is not None:
            st.check(cfg)
    return cfg

