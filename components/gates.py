"""The promotion gate: a candidate's metrics against its teacher's and fixed thresholds.

Pure logic (no MLflow): ``tasks/registry.py`` feeds it the metrics recorded on the
model versions and acts on the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class Rule(BaseModel):
    """One condition: ``metric`` ≥ ``min`` and/or ``metric`` ≥ teacher's ``metric`` − ``max_drop``."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(min_length=1)
    min: float | None = None
    max_drop: float | None = Field(None, ge=0, description="allowed drop below the teacher's value")


class GateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(None, description="registered model whose champion is the reference")
    rules: list[Rule] = Field(default_factory=list)


@dataclass
class Decision:
    passed: bool
    reason: str


def decide(candidate: dict[str, float], rules: list[Rule], teacher: dict[str, float] | None = None) -> Decision:
    """Apply every rule; the reason lists each check with the numbers it compared."""
    failures: list[str] = []
    checks: list[str] = []
    for r in rules:
        if r.metric not in candidate:
            failures.append(f"{r.metric} missing from the candidate's metrics")
            continue
        value = float(candidate[r.metric])
        if r.min is not None:
            ok = value >= r.min
            (checks if ok else failures).append(f"{r.metric}={value:.4g} {'>=' if ok else '<'} min {r.min:.4g}")
        if r.max_drop is not None:
            if teacher is None or r.metric not in teacher:
                failures.append(f"{r.metric}: no teacher value to compare with")
                continue
            bound = float(teacher[r.metric]) - r.max_drop
            ok = value >= bound
            (checks if ok else failures).append(
                f"{r.metric}={value:.4g} {'>=' if ok else '<'} teacher {teacher[r.metric]:.4g} - {r.max_drop:g}")
    if failures:
        return Decision(False, "; ".join(failures))
    return Decision(True, "; ".join(checks) if checks else "no rules")
