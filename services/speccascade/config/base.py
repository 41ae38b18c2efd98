"""What every configuration model shares: strictness (unknown keys are errors, values frozen) and
the replica bounds of a deployment. Torch-free: the autoscaling policy's settings import it
inside the Serve controller."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, validated values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


MinReplicas = Annotated[int, Field(ge=0, description="Fewest replicas.")]
MaxReplicas = Annotated[int, Field(ge=1, description="Most replicas.")]
InitialReplicas = Annotated[int | None, Field(ge=0, description="Replicas at start (default: min_replicas).")]


def check_replica_bounds(min_replicas: int, max_replicas: int, initial_replicas: int | None) -> None:
    """min <= initial <= max, with errors that name the values."""
    if min_replicas > max_replicas:
        raise ValueError(f"min_replicas={min_replicas} is above max_replicas={max_replicas}")
    if initial_replicas is not None and not min_replicas <= initial_replicas <= max_replicas:
        raise ValueError(f"initial_replicas={initial_replicas} is outside [{min_replicas}, {max_replicas}]")


class ReplicaBounds(StrictModel):
    """Replica count bounds of a deployment. A subclass may change a default by annotating the
    field with the same type (`max_replicas: MaxReplicas = 4`); the constraints stay these."""

    min_replicas: MinReplicas = 1
    max_replicas: MaxReplicas = 1
    initial_replicas: InitialReplicas = None

    @model_validator(mode="after")
    def _ordered(self):
        check_replica_bounds(self.min_replicas, self.max_replicas, self.initial_replicas)
        return self
