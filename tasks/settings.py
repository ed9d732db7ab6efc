"""The ``pipeline`` section of params.yaml: compute per stage, the promotion gates, the
schedule ``hyperbagel serve`` registers and the retraining watch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.gates import GateParams
from tasks.ray_runner import ComputeParams


class ScheduleParams(BaseModel):
    """When the ``pipeline`` deployment runs (``hyperbagel serve``)."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field(None, description="cron of the pipeline deployment, e.g. '0 3 * * *' (null: no schedule)")
    timezone: str = Field("UTC", description="IANA time zone of the cron")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from prefect.schedules import validate_cron_string  # Prefect's own rule (no R/H keywords)

        try:
            return validate_cron_string(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a valid cron expression (5 fields: minute hour day month weekday)") from None

    @field_validator("timezone")
    @classmethod
    def _valid_tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as UTC or Europe/Paris)") from None
        return v


class RetrainParams(BaseModel):
    """Retraining on new data: where batches land and how often the watch is polled."""

    model_config = ConfigDict(extra="forbid")

    watch: str | None = Field(None, description="folder or s3://bucket/prefix where new batches land (null: off)")
    data_stage: str | None = Field(None, description="the data stage batches are added to (null: the first data stage)")
    poll_interval_s: int = Field(300, ge=5, le=7 * 24 * 3600, description="seconds between polls of the watch")

    @field_validator("watch")
    @classmethod
    def _valid_watch(cls, v: str | None) -> str | None:
        if v and "://" in v and not v.startswith("s3://"):
            raise ValueError(f"{v!r}: the watch is a local folder or an s3://bucket/prefix")
        return v or None


class PipelineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray runtime (default: all)")
    compute: ComputeParams = Field(default_factory=ComputeParams, description="Ray Train resources of every stage")
    compute_overrides: dict[str, dict] = Field(default_factory=dict,
                                               description="per-stage changes to `compute`, by stage name")
    promotion: dict[str, GateParams] = Field(default_factory=dict,
                                             description="gate per registered model name")
    schedule: ScheduleParams = Field(default_factory=ScheduleParams, description="the pipeline deployment's cron")
    retrain: RetrainParams = Field(default_factory=RetrainParams, description="retraining on new data")

    def compute_for(self, stage: str) -> ComputeParams:
        return ComputeParams.model_validate({**self.compute.model_dump(), **self.compute_overrides.get(stage, {})})


Params = PipelineParams


def pipeline_params(ws) -> PipelineParams:
    """The workspace profile's ``pipeline`` section, validated (a bad value names its key)."""
    from components import config as cfg

    return cfg.validate_section("pipeline", __name__, ws.resolved_params().get("pipeline"), ws.profile)
