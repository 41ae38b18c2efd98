"""Checks shared by configuration models; no heavy imports (the autoscaling policy runs inside
the Serve controller)."""

from __future__ import annotations


def check_replica_bounds(min_replicas: int, max_replicas: int, initial_replicas: int | None) -> None:
    """min <= initial <= max, with errors that name the values."""
    if min_replicas > max_replicas:
        raise ValueError(f"min_replicas={min_replicas} is above max_replicas={max_replicas}")
    if initial_replicas is not None and not min_replicas <= initial_replicas <= max_replicas:
        raise ValueError(f"initial_replicas={initial_replicas} is outside [{min_replicas}, {max_replicas}]")
