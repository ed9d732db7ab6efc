"""DVC operations: prepare a workspace, ask what changed, reproduce one stage, push its outs.

DVC stays the single judge of what is up to date: a stage runs when ``dvc status``
says one of its deps, params or outs changed, and it runs through ``dvc repro``
so ``dvc.lock`` records every md5.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from configobj import ConfigObj

from tasks.project import Workspace


class DvcError(RuntimeError):
    pass


def dvc_bin() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else "dvc"


def stage_timeout() -> float | None:
    """``HYPERBAGEL_STAGE_TIMEOUT_S``: seconds a stage may run before it is stopped (unset: no limit)."""
    value = os.environ.get("HYPERBAGEL_STAGE_TIMEOUT_S")
    return float(value) if value else None


def run_dvc(ws: Workspace, *args: str, env: dict[str, str] | None = None, capture: bool = True,
            check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    # stage commands call `hyperbagel`: make this interpreter's scripts reachable without activation
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
    pipe = subprocess.PIPE if capture else None
    # own process group: a stage that overruns its time limit is stopped with all its children
    with subprocess.Popen([dvc_bin(), *args], cwd=ws.root, env=full_env, text=True, stdout=pipe, stderr=pipe,
                          start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
            raise DvcError(f"`dvc {' '.join(args)}` in {ws.root} was stopped after {timeout:.0f} s "
                           "(HYPERBAGEL_STAGE_TIMEOUT_S)") from None
    proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    if check and proc.returncode != 0:
        tail = ((proc.stderr or "") + (proc.stdout or "")).strip()[-3000:] if capture else ""
        raise DvcError(f"`dvc {' '.join(args)}` failed in {ws.root} (exit {proc.returncode})\n{tail}")
    return proc


# ---------------------------------------------------------------- workspace set-up

def _project_remote_config(ws: Workspace) -> dict:
    """The project's DVC config (config + config.local) with local remote paths made absolute."""
    merged: dict = {}
    dvc_dir = ws.project / ".dvc"
    for name in ("config", "config.local"):
        p = dvc_dir / name
        if p.exists():
            for section, values in ConfigObj(str(p)).items():
                merged.setdefault(section, {}).update(values)
    for section, values in merged.items():
        if section.startswith("remote") and "url" in values:
            url = values["url"]
            if "://" not in url and not os.path.isabs(url):
                values["url"] = str((dvc_dir / url).resolve())
    return merged


def _default_local_config(ws: Workspace) -> dict:
    return {
        "core": {"remote": "local", "autostage": "false", "analytics": "false"},
        'remote "local"': {"url": str(ws.state / "dvc-remote")},
    }


DVCIGNORE = "# written by hyperbagel: bytecode is not a code change\n__pycache__/\n*.pyc\n"


def generated_dvc_yaml(ws: Workspace) -> dict:
    """The project's dvc.yaml for a workspace outside the project (code deps resolve through
    :func:`link_code`)."""
    return yaml.safe_load((ws.project / "dvc.yaml").read_text())


def link_code(ws: Workspace) -> None:
    """Symlink the project's code paths that stages depend on into the workspace.

    Through the links the deps stay inside the workspace repository, so its ``.dvcignore``
    applies (``__pycache__`` written by any import is not a change); DVC ignores it for
    absolute, external deps."""
    produced = {o for s in ws.stages.values() for o in s.outs}
    tops = {Path(d).parts[0] for s in ws.stages.values() for d in s.deps
            if d not in produced and not Path(d).is_absolute()}
    for top in sorted(tops):
        link, target = ws.root / top, (ws.project / top).resolve()
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            raise DvcError(f"{link} is a directory, expected a link to {target}; remove it")
        link.symlink_to(target, target_is_directory=target.is_dir())


def prepare(ws: Workspace) -> None:
    """Make ``ws.root`` a DVC repository with the shared cache and the configured remote."""
    (ws.state / "dvc-remote").mkdir(parents=True, exist_ok=True)
    cache = str(ws.state / "dvc-cache")
    if ws.root == ws.project:
        if not (ws.root / ".dvc").exists():
            run_dvc(ws, "init", "-q", *([] if (ws.root / ".git").exists() else ["--no-scm"]))
        local = ConfigObj(str(ws.root / ".dvc" / "config.local"))
        local.setdefault("cache", {})["dir"] = cache
        proj = _project_remote_config(ws)
        if not (proj.get("core") or {}).get("remote"):
            for k, v in _default_local_config(ws).items():
                local.setdefault(k, {}).update(v)
        local.write()
        return
    ws.root.mkdir(parents=True, exist_ok=True)
    if not (ws.root / ".dvc").exists():
        run_dvc(ws, "init", "--no-scm", "-q")
    conf = ConfigObj(str(ws.root / ".dvc" / "config"))
    conf.clear()
    merged = _project_remote_config(ws)
    if not (merged.get("core") or {}).get("remote"):
        merged = {**merged, **_default_local_config(ws)}
    for k, v in merged.items():
        if k != "cache":
            conf[k] = v
    core = conf.setdefault("core", {})
    core["analytics"] = "false"
    core["no_scm"] = "true"  # a profile workspace lives outside git (under the state dir)
    conf["cache"] = {"dir": cache}
    conf.write()
    marker = {"project": str(ws.project), "profile": ws.profile}
    _write_if_changed(ws.root / ".hyperbagel-workspace.json", json.dumps(marker) + "\n")
    _write_if_changed(ws.root / ".dvcignore", DVCIGNORE)
    link_code(ws)
    _write_if_changed(ws.root / "dvc.yaml", yaml.safe_dump(generated_dvc_yaml(ws), sort_keys=False))
    _write_if_changed(ws.root / "params.yaml", yaml.safe_dump(ws.resolved_params(), sort_keys=True))


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ---------------------------------------------------------------- status, repro, push

def changed_stages(ws: Workspace, stages: list[str]) -> set[str]:
    """Stages among ``stages`` that DVC would run (a dep, param or out differs from dvc.lock)."""
    from dvc.repo import Repo

    changed: set[str] = set()
    with Repo(str(ws.root)) as repo:
        for name in stages:
            st = repo.status(targets=[f"{ws.root / 'dvc.yaml'}:{name}"], with_deps=False)
            if st:
                changed.add(name)
    return changed


def repro(ws: Workspace, stage: str, env: dict[str, str], force: bool = False) -> None:
    """``dvc repro -s``: DVC deletes the old outs, runs the stage's command, records dvc.lock."""
    args = ["--wait-for-lock", "repro", "--single-item", *(["--force"] if force else []), stage]
    proc = run_dvc(ws, *args, env=env, capture=False, check=False, timeout=stage_timeout())
    if proc.returncode != 0:
        raise DvcError(f"stage {stage!r} failed (dvc repro exit {proc.returncode}); its output is above")


def push(ws: Workspace, stage: str) -> None:
    run_dvc(ws, "--wait-for-lock", "push", "-q", stage)


def checkout(ws: Workspace, stage: str) -> None:
    run_dvc(ws, "--wait-for-lock", "checkout", "-q", "--force", stage, check=False)


def remove_workspace(ws: Workspace) -> None:
    if ws.root != ws.project:
        shutil.rmtree(ws.root, ignore_errors=True)
