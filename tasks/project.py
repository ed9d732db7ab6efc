"""Where things live: the project, its state folder, and one workspace per profile.

- The **project** is the checkout: ``dvc.yaml``, ``params.yaml``, the code.
- The **state folder** (``.state/`` in the project, or ``$HYPERBAGEL_STATE``) holds all
  embedded-default state: MLflow's SQLite file and artifacts, the DVC cache and the
  local DVC remote, Prefect's home, Ray Train's run storage, and the workspaces.
- A **workspace** is the DVC repository one profile runs in. The ``default`` profile
  runs in the project itself (so ``dvc repro`` alone reproduces it and ``dvc.lock`` is
  committed with the code). Other profiles run in ``<state>/workspaces/<profile>``,
  a DVC repository whose ``dvc.yaml`` is the project's with code paths made absolute
  and whose ``params.yaml`` is the profile's resolved parameters, so switching
  profiles never rewrites the project's ``dvc.lock``.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from components import config as cfg


def find_project(start: Path | None = None) -> Path:
    env = os.environ.get("HYPERBAGEL_PROJECT")
    if env:
        return Path(env).resolve()
    here = Path(start or Path.cwd()).resolve()
    for p in [here, *here.parents]:
        if (p / "dvc.yaml").exists() and (p / "params.yaml").exists():
            return p
    # installed in editable mode: the package's parent is the project
    pkg_root = Path(__file__).resolve().parents[1]
    if (pkg_root / "dvc.yaml").exists():
        return pkg_root
    raise cfg.ConfigError("no Hyper-Bagel project found (no dvc.yaml + params.yaml here or above); "
                          "run from the project folder or set HYPERBAGEL_PROJECT")


def state_dir(project: Path) -> Path:
    return Path(os.environ.get("HYPERBAGEL_STATE") or (project / ".state")).resolve()


def git_sha(path: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


INPUT_ROLES = ("parent", "teacher", "data", "evaluates")  # a stage's inputs, as lineage names them


@dataclass(frozen=True)
class StageDef:
    name: str
    module: str
    kind: str  # "data" | "train" | "eval"
    outs: tuple[str, ...]
    deps: tuple[str, ...]
    parent: str | None  # stage whose checkpoint this stage starts from
    data: str | None  # stage whose data set this stage reads
    model: str | None  # registered model name, for model-producing stages
    evaluates: str | None  # for eval stages: the stage whose model is scored
    gate: str | None  # the registered model this stage's metrics gate (an eval stage's, or its own)
    teacher: str | None = None  # a second model input (DMDO's real score), verified like the parent

    @property
    def out(self) -> str:
        return self.outs[0]

    def inputs(self) -> list[tuple[str, str | None]]:
        """``(role, producing stage or None)`` for every input role."""
        return [(role, getattr(self, role)) for role in INPUT_ROLES]


def read_stages(dvc_yaml: Path) -> dict[str, StageDef]:
    """Stages of a dvc.yaml in file order; `meta` names the module and lineage roles."""
    doc = yaml.safe_load(Path(dvc_yaml).read_text()) or {}
    stages: dict[str, StageDef] = {}
    for name, st in (doc.get("stages") or {}).items():
        meta = st.get("meta") or {}
        if "module" not in meta:
            raise cfg.ConfigError(f"{dvc_yaml}: stage {name!r} has no meta.module")
        outs = tuple(o if isinstance(o, str) else next(iter(o)) for o in st.get("outs") or [])
        deps = tuple(st.get("deps") or [])
        stages[name] = StageDef(name, meta["module"], meta.get("kind", "train"), outs, deps,
                                meta.get("parent"), meta.get("data"), meta.get("model"),
                                meta.get("evaluates"), meta.get("gate"), meta.get("teacher"))
    return stages


def topo_order(stages: dict[str, StageDef]) -> list[str]:
    producers = {o: s.name for s in stages.values() for o in s.outs}
    needs = {s.name: {producers[d] for d in s.deps if d in producers} for s in stages.values()}
    order: list[str] = []
    while needs:
        ready = [n for n in stages if n in needs and not needs[n] - set(order)]
        if not ready:
            raise cfg.ConfigError(f"dvc.yaml has a cycle among {sorted(needs)}")
        for n in ready:
            order.append(n)
            del needs[n]
    return order


def descendants(stages: dict[str, StageDef], roots: set[str]) -> set[str]:
    producers = {o: s.name for s in stages.values() for o in s.outs}
    out = set(roots)
    changed = True
    while changed:
        changed = False
        for s in stages.values():
            if s.name not in out and any(producers.get(d) in out for d in s.deps):
                out.add(s.name)
                changed = True
    return out


@dataclass
class Workspace:
    project: Path
    profile: str
    root: Path

    @property
    def state(self) -> Path:
        return state_dir(self.project)

    @cached_property
    def stages(self) -> dict[str, StageDef]:
        return read_stages(self.project / "dvc.yaml")

    def order(self) -> list[str]:
        return topo_order(self.stages)

    def raw_params(self) -> dict[str, Any]:
        return cfg.load_yaml(self.project / "params.yaml")

    def resolved_params(self) -> dict[str, Any]:
        return cfg.resolve_profile(self.raw_params(), self.profile)

    def validate(self):
        return cfg.validate_all(self.raw_params(), self.profile,
                                {n: s.module for n, s in self.stages.items()})

    def stage(self, name: str) -> StageDef:
        if name not in self.stages:
            raise cfg.ConfigError(f"unknown stage {name!r}; stages are: {', '.join(self.order())}")
        return self.stages[name]

    def lock(self) -> dict[str, Any]:
        p = self.root / "dvc.lock"
        return (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}

    def out_md5(self, stage: str) -> str | None:
        """The md5 dvc.lock records for a stage's (first) out."""
        entry = (self.lock().get("stages") or {}).get(stage) or {}
        for o in entry.get("outs") or []:
            if o.get("path") == self.stage(stage).out:
                return o.get("md5")
        return None

    def out_path(self, stage: str) -> Path:
        return self.root / self.stage(stage).out


def workspace(project: Path, profile: str) -> Workspace:
    names = cfg.profile_names(cfg.load_yaml(project / "params.yaml"))
    if profile not in names:
        raise cfg.ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(names)}")
    if profile == cfg.DEFAULT_PROFILE:
        return Workspace(project, profile, project)
    return Workspace(project, profile, state_dir(project) / "workspaces" / profile)
