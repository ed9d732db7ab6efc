"""Model registry: resolve model URIs, gate and promote versions, walk the lineage."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import checkpoints
from components.gates import Decision, GateParams, decide
from tasks.project import INPUT_ROLES

CHAMPION, PREVIOUS = "champion", "previous"
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+|latest))$")


class ModelNotFound(LookupError):
    pass


def resolve(c, uri: str):
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/NAME/latest`` (the newest version,
    gated or not) -> ModelVersion (clear error otherwise)."""
    from mlflow.exceptions import MlflowException

    m = URI.match(uri.strip())
    if not m:
        raise ModelNotFound(f"{uri!r} is not a model URI; use models:/NAME@ALIAS, models:/NAME/VERSION "
                            "or models:/NAME/latest")
    name = m["name"]
    try:
        if m["alias"]:
            return c.get_model_version_by_alias(name, m["alias"])
        if m["version"] == "latest":
            versions = c.search_model_versions(f"name='{name}'")
            if versions:
                return c.get_model_version(name, str(max(int(v.version) for v in versions)))
            raise MlflowException(f"no versions of {name}")
        return c.get_model_version(name, m["version"])
    except MlflowException:
        known = sorted(rm.name for rm in c.search_registered_models())
        if name not in known:
            raise ModelNotFound(f"no registered model {name!r}; registered: {', '.join(known) or 'none'}") from None
        aliases = sorted(c.get_registered_model(name).aliases)
        raise ModelNotFound(f"{uri!r} not found; {name} has aliases: {', '.join(aliases) or 'none'} "
                            f"(models:/{name}/latest is its newest version, gated or not)") from None


def metrics_of(mv) -> dict[str, float]:
    out = {}
    for k, v in mv.tags.items():
        if k.startswith("metric."):
            try:
                out[k[len("metric."):]] = float(v)
            except ValueError:
                pass
    return out


def download_checkpoint(c, mv, dest: Path) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dest)))


def verify_version(c, mv, local: Path | None = None) -> str:
    """The version's checkpoint bytes must hash to the md5 it was registered with."""
    expected = mv.tags.get("dvc.md5")
    if not expected:
        raise checkpoints.ChecksumMismatch(f"{mv.name} v{mv.version} records no checkpoint md5")
    if local is not None and local.exists():
        checkpoints.verify_md5(local, expected, what=f"{mv.name} v{mv.version} checkpoint")
        return expected
    with tempfile.TemporaryDirectory() as tmp:
        path = download_checkpoint(c, mv, Path(tmp))
        checkpoints.verify_md5(path, expected, what=f"{mv.name} v{mv.version} checkpoint")
    return expected


@dataclass
class PromotionResult:
    model: str
    version: str
    decision: Decision
    champion: str | None
    previous: str | None


def promote(c, name: str, version: str, gate: GateParams, local: Path | None = None) -> PromotionResult:
    """Gate ``name`` v``version``; on pass make it ``champion`` (the former one becomes ``previous``)."""
    mv = c.get_model_version(name, version)
    try:
        verify_version(c, mv, local)
        teacher = teacher_reference(c, mv, gate.teacher) if gate.teacher else None
        decision = decide(metrics_of(mv), gate.rules, teacher)
    except checkpoints.ChecksumMismatch as e:
        decision = Decision(False, f"integrity: {e}")
    c.set_model_version_tag(name, version, "promotion.decision", "promoted" if decision.passed else "rejected")
    c.set_model_version_tag(name, version, "promotion.reason", decision.reason[:5000])
    current = _alias_version(c, name, CHAMPION)
    previous = _alias_version(c, name, PREVIOUS)
    if decision.passed and current != str(version):
        if current is not None:
            c.set_registered_model_alias(name, PREVIOUS, current)
            previous = current
        c.set_registered_model_alias(name, CHAMPION, str(version))
        current = str(version)
    return PromotionResult(name, str(version), decision, current, previous)


def teacher_reference(c, mv, teacher: str) -> dict[str, float] | None:
    """The metrics of the ``teacher`` version the candidate was distilled from (found in its lineage
    by checkpoint md5); if none of its ancestors is a registered ``teacher`` version, the champion's."""
    from mlflow.exceptions import MlflowException

    try:
        ancestors = {e.get("md5") for e in lineage(c, f"models:/{mv.name}/{mv.version}")["chain"]}
        for tv in c.search_model_versions(f"name='{teacher}'"):
            if tv.tags.get("dvc.md5") in ancestors:
                return metrics_of(tv)
        return metrics_of(c.get_model_version_by_alias(teacher, CHAMPION))
    except MlflowException:
        return None


def _alias_version(c, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


# ---------------------------------------------------------------- lineage

def _run_by_md5(c, experiment_ids: list[str], md5: str):
    runs = c.search_runs(experiment_ids, filter_string=f"tags.`dvc.md5` = '{md5}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def lineage(c, uri: str) -> dict[str, Any]:
    """The chain from a registered version back to its data sets, one entry per stage."""
    mv = resolve(c, uri)
    run = c.get_run(mv.run_id)
    exp_ids = [run.info.experiment_id]
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    todo = [run]
    while todo:
        r = todo.pop(0)
        t = r.data.tags
        md5 = t.get("dvc.md5", "")
        if md5 in seen:
            continue
        seen.add(md5)
        chain.append({
            "stage": t.get("stage"), "dvc_path": t.get("dvc.out"), "md5": md5,
            "params_hash": t.get("params.hash"), "git_sha": t.get("git.sha"),
            "mlflow_run_id": r.info.run_id, "prefect_flow_run_id": t.get("prefect.flow_run_id"),
            **{role: {"stage": t.get(f"{role}.stage"), "md5": t.get(f"{role}.md5")} if t.get(f"{role}.md5") else None
               for role in ("parent", "teacher", "data")},
            "metrics": {k: v for k, v in r.data.metrics.items() if not k.startswith("train/")},
        })
        if t.get("batch.md5"):  # a data version made by adding a batch to the previous one
            chain[-1]["kind"] = "ingest"
            chain[-1]["batch"] = {"name": t.get("batch.name"), "md5": t["batch.md5"], "source": t.get("batch.source")}
            chain[-1]["previous"] = {"stage": t.get("previous.stage"), "md5": t.get("previous.md5")}
        for role in (*INPUT_ROLES, "previous"):
            pmd5 = t.get(f"{role}.md5")
            if pmd5 and pmd5 not in seen:
                pr = _run_by_md5(c, exp_ids, pmd5)
                if pr is None:
                    chain.append({"stage": t.get(f"{role}.stage"), "md5": pmd5, "missing": True,
                                  "dvc_path": t.get(f"{role}.path")})
                    seen.add(pmd5)
                else:
                    todo.append(pr)
    return {"model": mv.name, "version": str(mv.version), "aliases": list(mv.aliases),
            "promotion": {"decision": mv.tags.get("promotion.decision"), "reason": mv.tags.get("promotion.reason")},
            "metrics": metrics_of(mv), "chain": chain,
            "batches": [e["batch"] for e in chain if e.get("batch")]}


def gate_for(pipeline_params, model: str) -> GateParams:
    return pipeline_params.promotion.get(model) or GateParams()
