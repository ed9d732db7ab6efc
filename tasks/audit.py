"""`hyperbagel audit`: prove where a registered model came from.

For the version and every ancestor in its lineage it checks that

- the checkpoint can be fetched from the DVC remote and every stored object hashes to
  its name (the directory listing and each file), so the remote can rebuild it;
- that md5 is the one the MLflow run (tag ``dvc.md5``), the consumer's manifest and
  MLflow tags (``parent.md5`` / ``data.md5``) and ``dvc.lock`` record;
- the checkpoint's own ``manifest.json`` (read from the remote) names the same MLflow run
  and the same inputs as the run's tags;
- metrics are recorded on every run, and a gated model version carries its evaluation
  metrics and the promotion decision (``champion`` only if it was promoted).

Any failed check names the object (remote URI, run or version) and makes the audit fail.
``dvc.lock`` keeps the latest out of each stage only: an ancestor that a newer run of its
stage replaced is reported as ``superseded``, which is not a failure.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks import registry
from tasks.project import INPUT_ROLES, workspace


@dataclass
class Check:
    object: str
    check: str
    ok: bool
    detail: str = ""


class RemoteReader:
    """Read objects of the workspace's default DVC remote (local folder, S3, ...)."""

    def __init__(self, ws_root: Path):
        from dvc.repo import Repo

        self.repo = Repo(str(ws_root))
        self.odb = self.repo.cloud.get_remote_odb(command="audit")

    def close(self) -> None:
        self.repo.close()

    def uri(self, oid: str) -> str:
        return self.odb.fs.unstrip_protocol(self.odb.oid_to_path(oid))

    def md5(self, oid: str) -> str:
        h = hashlib.md5()
        with self.odb.fs.open(self.odb.oid_to_path(oid), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def read(self, oid: str) -> bytes:
        return self.odb.fs.cat_file(self.odb.oid_to_path(oid))

    def verify(self, md5: str, label: str) -> tuple[list[Check], dict[str, Any] | None]:
        """Every object of ``md5`` fetched and re-hashed; returns the checks and the manifest."""
        checks: list[Check] = []
        manifest = None
        try:
            if not md5.endswith(".dir"):
                got = self.md5(md5)
                return [Check(self.uri(md5), f"{label}: remote object md5", got == md5,
                              "" if got == md5 else f"stored bytes hash to {got}, expected {md5}")], None
            listing = self.read(md5)
            got = hashlib.md5(listing).hexdigest() + ".dir"
            if got != md5:
                return [Check(self.uri(md5), f"{label}: remote directory listing md5", False,
                              f"stored listing hashes to {got}, expected {md5}")], None
            entries = json.loads(listing)
            bad = []
            for e in entries:
                actual = self.md5(e["md5"])
                if actual != e["md5"]:
                    bad.append(Check(self.uri(e["md5"]), f"{label}: remote object md5 of {e['relpath']}", False,
                                     f"stored bytes hash to {actual}, expected {e['md5']}"))
                elif e["relpath"] == "manifest.json":
                    manifest = json.loads(self.read(e["md5"]))
            checks.extend(bad or [Check(self.uri(md5), f"{label}: fetched from the DVC remote, "
                                                        f"{len(entries)} objects re-hashed", True)])
        except FileNotFoundError as e:
            checks.append(Check(self.uri(md5), f"{label}: fetch from the DVC remote", False, f"missing: {e}"))
        return checks, manifest


def _lock_md5s(lock: dict[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Per stage: the md5 of its out, and the md5 of each dep (by path) as dvc.lock records them."""
    outs, deps = {}, {}
    for stage, entry in (lock.get("stages") or {}).items():
        for o in entry.get("outs") or []:
            outs[stage] = o.get("md5")
        deps[stage] = {d.get("path"): d.get("md5") for d in entry.get("deps") or []}
    return outs, deps


def audit(c, uri: str, project: Path) -> dict[str, Any]:
    mv = registry.resolve(c, uri)
    info = registry.lineage(c, uri)
    ws = workspace(project, mv.tags.get("profile") or "default")
    gated_models = {s.model for s in ws.stages.values() if s.model and
                    any(e.gate == s.model for e in ws.stages.values())}
    lock, lock_deps = _lock_md5s(ws.lock())
    label = f"{mv.name} v{mv.version}"
    checks: list[Check] = []

    # the registered version itself
    run_md5 = c.get_run(mv.run_id).data.tags.get("dvc.md5")
    checks.append(Check(f"models:/{mv.name}/{mv.version}", "version tag dvc.md5 = its MLflow run's dvc.md5",
                        bool(mv.tags.get("dvc.md5")) and mv.tags.get("dvc.md5") == run_md5,
                        f"version {mv.tags.get('dvc.md5')}, run {run_md5}"))
    try:
        registry.verify_version(c, mv)
        checks.append(Check(mv.source, f"{label}: MLflow artifact checkpoint md5", True))
    except Exception as e:  # noqa: BLE001 - any failure to fetch or match is a finding
        checks.append(Check(mv.source, f"{label}: MLflow artifact checkpoint md5", False, str(e)))

    reader = RemoteReader(ws.root)
    try:
        consumers: dict[str, list[tuple[str, str, dict | None]]] = {}
        manifests: dict[str, dict | None] = {}
        for e in info["chain"]:
            md5, stage = e.get("md5"), e.get("stage")
            name = f"{stage} {md5}"
            if e.get("missing"):
                checks.append(Check(name, "an MLflow run records this md5", False,
                                    "no run has tag dvc.md5 = this md5"))
                continue
            found, manifest = reader.verify(md5, name)
            checks.extend(found)
            manifests[md5] = manifest
            run = c.get_run(e["mlflow_run_id"])
            t = run.data.tags
            # dvc.lock: the stage's current out (or a consumer's recorded dep)
            current = lock.get(stage)
            checks.append(Check(f"dvc.lock stage {stage}", f"{name}: md5 in dvc.lock",
                                current is not None,
                                "current" if current == md5 else
                                (f"superseded: dvc.lock now records {current}" if current else "stage not in dvc.lock")))
            if current == md5:  # a current out: dvc.lock's deps must name the same inputs as MLflow
                for role in INPUT_ROLES:
                    path, want = t.get(f"{role}.path"), t.get(f"{role}.md5")
                    if path and want:
                        got = lock_deps.get(stage, {}).get(path)
                        checks.append(Check(f"dvc.lock stage {stage}", f"{name}: dvc.lock dep {path} = MLflow {role}.md5",
                                            got == want, f"dvc.lock {got}, MLflow {want}"))
            # manifest (read from the remote) vs the MLflow run
            if manifest is not None:
                ids = {manifest.get("mlflow_run_id")} | {b.get("mlflow_run_id") for b in manifest.get("batches") or []}
                checks.append(Check(f"{stage} manifest.json", f"{name}: manifest names MLflow run {run.info.run_id}",
                                    run.info.run_id in ids, f"manifest runs {sorted(filter(None, ids))}"))
                for role in INPUT_ROLES:
                    want = t.get(f"{role}.md5")
                    if want or manifest.get(role):
                        got = (manifest.get(role) or {}).get("md5")
                        checks.append(Check(f"{stage} manifest.json", f"{name}: manifest {role} md5 = MLflow tag",
                                            got == want, f"manifest {got}, tag {want}"))
                if e.get("batch"):
                    names = {b.get("md5") for b in manifest.get("batches") or []}
                    checks.append(Check(f"{stage} manifest.json", f"{name}: manifest lists batch "
                                        f"{e['batch']['name']} {e['batch']['md5']}", e["batch"]["md5"] in names))
            checks.append(Check(f"run {run.info.run_id}", f"{name}: metrics recorded", bool(run.data.metrics),
                                ", ".join(sorted(run.data.metrics)[:6])))
            # registered versions along the chain: metrics and the promotion decision
            mv_ref = t.get("model.version")
            if mv_ref:
                vname, _, vnum = mv_ref.rpartition("/")
                v = c.get_model_version(vname, vnum)
                checks.append(Check(f"models:/{vname}/{vnum}", "version md5 = run md5",
                                    v.tags.get("dvc.md5") == md5, f"version {v.tags.get('dvc.md5')}"))
                if t.get("stage") and ws.stages.get(t["stage"]) and ws.stages[t["stage"]].model in gated_models:
                    checks.append(Check(f"models:/{vname}/{vnum}", "evaluation metrics recorded on the version",
                                        bool(registry.metrics_of(v)), ", ".join(sorted(registry.metrics_of(v)))))
                    decision = v.tags.get("promotion.decision")
                    checks.append(Check(f"models:/{vname}/{vnum}", "promotion decision recorded",
                                        decision in ("promoted", "rejected") and bool(v.tags.get("promotion.reason")),
                                        f"{decision}: {v.tags.get('promotion.reason')}"))
                    if registry.CHAMPION in v.aliases:
                        checks.append(Check(f"models:/{vname}/{vnum}", "champion was promoted by the gate",
                                            decision == "promoted", str(decision)))
    finally:
        reader.close()
    ok = all(ch.ok for ch in checks)
    return {"model": mv.name, "version": str(mv.version), "uri": uri, "ok": ok,
            "failed": [asdict(ch) for ch in checks if not ch.ok], "checks": [asdict(ch) for ch in checks],
            "batches": info.get("batches", [])}
