"""The family registry: which `Family` loads a model directory, owns a config, has a preset.

`register(family)` adds one; the built-in families register on first use (their modules import
only torch and the reference modules, so `ldm-rt run` stays light). Families are asked newest
first, so a family registered later (a user's, a test's) can claim directories or configs that
an older one would also take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_rt.errors import ConfigError, ModelDirError
from ldm_rt.families.base import Family, StepFunction

__all__ = ["Family", "StepFunction", "register", "unregister", "families", "get", "for_index", "for_config",
           "for_components", "preset"]

_REGISTRY: list[Family] = []
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from ldm_rt.families.dit_class import FAMILY as DIT_CLASS
        from ldm_rt.families.dit_text import FAMILY as DIT_TEXT
        from ldm_rt.families.flux import FAMILY as FLUX

        _REGISTRY[:0] = [DIT_TEXT, DIT_CLASS, FLUX]  # before any family registered earlier by a user


def register(family: Family) -> Family:
    """Add `family` (asked before every family registered so far); returns it."""
    _load_builtins()
    if any(f.name == family.name for f in _REGISTRY):
        raise ValueError(f"a family named {family.name!r} is already registered")
    _REGISTRY.append(family)
    return family


def unregister(name: str) -> None:
    _REGISTRY[:] = [f for f in _REGISTRY if f.name != name]


def families() -> list[Family]:
    """Every registered family, newest first (the order they are asked in)."""
    _load_builtins()
    return list(reversed(_REGISTRY))


def get(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    raise ConfigError(f"unknown model family {name!r}; known: {', '.join(f.name for f in families())}.")


def for_index(index: dict[str, Any], root: Path) -> Family:
    """The family that loads model directory `root` (its parsed model_index.json is `index`)."""
    for family in families():
        if family.recognizes(index, root):
            return family
    known = sorted({c for f in families() for c in f.pipeline_classes})
    raise ModelDirError(f"{root}/model_index.json names _class_name {index.get('_class_name')!r}, which no model "
                        f"family of ldm-rt loads; known: {', '.join(known)}.")


def for_config(config) -> Family:
    """The family that owns `config` (a preset, or `Components.config`)."""
    for family in families():
        if family.owns(config):
            return family
    raise ConfigError(f"no model family of ldm-rt owns a {type(config).__name__} like this one.")


def for_components(components) -> Family:
    """`components.family` when set, else the owner of `components.config`."""
    name = getattr(components, "family", None)
    return get(name) if name else for_config(components.config)


def preset(name: str) -> tuple[Family, Any]:
    """`init-model --preset NAME` -> (its family, its config)."""
    every: dict[str, tuple[Family, Any]] = {}
    for family in reversed(families()):  # oldest first: the built-in presets keep their order
        every.update({k: (family, v) for k, v in family.presets().items()})
    if name not in every:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(every)}.")
    return every[name]
