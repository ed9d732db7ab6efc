"""params.yaml: every stage's parameters plus named profiles, validated before any compute.

Layout of params.yaml::

    world_data: {...}        # one section per stage: the `default` profile's values
    base: {...}
    profiles:
      smoke: {base: {steps: 20}, ...}   # overrides merged over the sections
      full: {...}

The `default` profile is the sections as written. A profile's effective parameters
are the sections deep-merged with its overrides, then validated by each stage's
pydantic ``Params`` model, so a bad value fails in well under a second naming the
key and what is allowed, before anything runs.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

DEFAULT_PROFILE = "default"


class ConfigError(ValueError):
    """params.yaml, a profile or a stage name is not valid; the message says what and where."""


def load_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of stage sections")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def profile_names(raw: dict[str, Any]) -> list[str]:
    return [DEFAULT_PROFILE] + sorted(k for k in (raw.get("profiles") or {}) if k != DEFAULT_PROFILE)


def resolve_profile(raw: dict[str, Any], profile: str) -> dict[str, Any]:
    """The sections with the profile's overrides merged in (no `profiles` key)."""
    names = profile_names(raw)
    if profile not in names:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(names)}")
    sections = {k: v for k, v in raw.items() if k != "profiles"}
    overrides = (raw.get("profiles") or {}).get(profile) or {}
    unknown = sorted(set(overrides) - set(sections))
    if unknown:
        raise ConfigError(f"profile {profile!r} overrides unknown section(s) {unknown}; "
                          f"sections are: {', '.join(sorted(sections))}")
    return deep_merge(sections, overrides)


def params_class(module_name: str) -> type[BaseModel]:
    module = importlib.import_module(module_name)
    cls = getattr(module, "Params", None)
    if cls is None:
        raise ConfigError(f"stage module {module_name} defines no Params model")
    return cls


def _describe(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    allowed = ", ".join(f"{k} {v}" for k, v in ctx.items() if k != "error")
    msg = err["msg"]
    return f"{msg}" + (f" (allowed: {allowed})" if allowed and allowed not in msg else "")


def validate_section(stage: str, module_name: str, values: dict[str, Any] | None,
                     profile: str = DEFAULT_PROFILE) -> BaseModel:
    cls = params_class(module_name)
    try:
        return cls.model_validate(values or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join([stage, *map(str, err["loc"])])
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f"; got {got!r}"
            lines.append(f"  {key}: {_describe(err)}{got_s}")
        raise ConfigError(f"invalid parameters in params.yaml (profile {profile!r}):\n" + "\n".join(lines)) from None


def validate_all(raw: dict[str, Any], profile: str, stage_modules: dict[str, str]) -> dict[str, BaseModel]:
    """Validate every stage's section for ``profile``; raise one error listing every bad key."""
    resolved = resolve_profile(raw, profile)
    out: dict[str, BaseModel] = {}
    problems: list[str] = []
    for stage, module in stage_modules.items():
        try:
            out[stage] = validate_section(stage, module, resolved.get(stage), profile)
        except ConfigError as e:
            problems.extend(str(e).splitlines()[1:])
    extra = sorted(set(resolved) - set(stage_modules) - {"pipeline"})
    for name in extra:
        problems.append(f"  {name}: no stage of that name in dvc.yaml (stages: {', '.join(stage_modules)})")
    if problems:
        raise ConfigError(f"invalid parameters in params.yaml (profile {profile!r}):\n" + "\n".join(problems))
    return out
