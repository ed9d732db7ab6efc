"""The ``pipeline`` section of params.yaml: compute per stage and the promotion gates."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from components.gates import GateParams
from tasks.ray_runner import ComputeParams


class PipelineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray runtime (default: all)")
    compute: ComputeParams = Field(default_factory=ComputeParams, description="Ray Train resources of every stage")
    compute_overrides: dict[str, dict] = Field(default_factory=dict,
                                               description="per-stage changes to `compute`, by stage name")
    promotion: dict[str, GateParams] = Field(default_factory=dict,
                                             description="gate per registered model name")

    def compute_for(self, stage: str) -> ComputeParams:
        return ComputeParams.model_validate({**self.compute.model_dump(), **self.compute_overrides.get(stage, {})})


Params = PipelineParams
