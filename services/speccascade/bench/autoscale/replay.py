"""A stand-in for the Ray Serve controller's autoscaling loop, for tests and simulations.

It keeps what the controller keeps (each deployment's reported counter samples and ongoing-request
samples, its current target, its policy state), builds real `ray.serve.config.AutoscalingContext`
objects from them, and runs a policy the way Ray 2.60 does:

- `deferral`: `speccascade.autoscale.policy.decide` wrapped in Ray's own application-level
  wrapper (`_apply_app_level_autoscaling_config`, which with the zero per-deployment delays that
  `serve_autoscaling` sets only rounds up and handles a cold start), then Ray's bounds;
- `queue`: Ray's `replica_queue_length_autoscaling_policy` with Ray's scaling factors and delay
  logic (`_apply_scaling_factors`, `_apply_delay_logic`, driven by the simulated clock instead of
  the wall clock), then Ray's bounds.

One pseudo-replica per deployment carries the summed counters (the policy sums over replicas).

This is the one module of speccascade that reaches into Serve's private names, and only a
benchmark uses it: an `AutoscalingContext` is built from `DeploymentID`, `ReplicaID` and
`TimeStampedValue`, which Serve constructs itself and does not export from a public module (ReplicaID
aside), and replaying Ray's own queue-length policy and application-level wrapper step by step
needs their underscore helpers. The serving path and the policy import none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ray.serve._private.common import DeploymentID, TimeStampedValue
from ray.serve.autoscaling_policy import (
    _apply_app_level_autoscaling_config,
    _apply_delay_logic,
    _apply_scaling_factors,
    _core_replica_queue_length_policy,
    _get_cold_start_scale_up_replicas,
)
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from ray.serve.request_router import ReplicaID

from ...autoscale.policy import decide
from ...autoscale.settings import AutoscalingSettings, serve_autoscaling

APP_NAME = "speccascade"


def make_context(
    name: str, *, target: int, running: int, raw_metrics: dict[str, list[TimeStampedValue]],
    ongoing_requests: float, config: AutoscalingConfig, policy_state: dict, now: float,
    app_name: str = APP_NAME,
) -> AutoscalingContext:
    deployment_id = DeploymentID(name=name, app_name=app_name)
    replica = ReplicaID(unique_id=f"{name}-replica", deployment_id=deployment_id)
    return AutoscalingContext(
        deployment_id=deployment_id, deployment_name=name, app_name=app_name,
        current_num_replicas=running, target_num_replicas=target,
        running_replicas=[replica] if running else [],
        total_num_requests=ongoing_requests, total_queued_requests=0.0,
        aggregated_metrics={}, raw_metrics={key: {replica: series} for key, series in raw_metrics.items()},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=policy_state, last_scale_up_time=None, last_scale_down_time=None,
        current_time=now, config=config,
    )


@dataclass
class DeploymentRecord:
    name: str
    config: AutoscalingConfig
    target: int
    running: int
    samples: dict[str, list[TimeStampedValue]] = field(default_factory=dict)  # recorded counters
    ongoing: list[TimeStampedValue] = field(default_factory=list)  # recorded ongoing requests
    visible_until: float = -math.inf  # samples up to here have been pushed to the controller
    policy_state: dict = field(default_factory=dict)


class ControllerStandIn:
    """Holds the three deployments of the application under one operator policy."""

    def __init__(self, settings: AutoscalingSettings, *, initial: dict[str, int] | None = None):
        self.settings = settings
        self.policy = settings.policy
        configs = {d["name"]: AutoscalingConfig(**d["autoscaling_config"]) for d in serve_autoscaling(settings).deployments}
        self.records: dict[str, DeploymentRecord] = {}
        for name, config in configs.items():
            start = (initial or {}).get(name, config.initial_replicas if config.initial_replicas is not None else config.min_replicas)
            self.records[name] = DeploymentRecord(name=name, config=config, target=start, running=start)
        self.last_record: dict | None = None  # the deferral policy's account of its last decision
        self._app_policy = _apply_app_level_autoscaling_config(self._deferral_policy)

    def record(self, name: str, now: float, counters: dict[str, float], ongoing_requests: float) -> None:
        """A replica records its counters (and its handles their ongoing requests) at `now`."""
        rec = self.records[name]
        for key, value in counters.items():
            rec.samples.setdefault(key, []).append(TimeStampedValue(now, float(value)))
        rec.ongoing.append(TimeStampedValue(now, float(ongoing_requests)))

    def push(self, now: float) -> None:
        """Replicas push what they recorded; the controller sees it from now on."""
        for rec in self.records.values():
            rec.visible_until = now
            start = now - self.settings.look_back_period_s
            rec.samples = {k: [p for p in s if p.timestamp >= start] for k, s in rec.samples.items()}
            rec.ongoing = [p for p in rec.ongoing if p.timestamp >= start]

    def set_running(self, name: str, running: int) -> None:
        self.records[name].running = running

    def _context(self, rec: DeploymentRecord, now: float, state: dict) -> AutoscalingContext:
        visible = {k: [p for p in s if p.timestamp <= rec.visible_until] for k, s in rec.samples.items()}
        ongoing = [p.value for p in rec.ongoing if p.timestamp <= rec.visible_until]
        return make_context(
            rec.name, target=rec.target, running=rec.running, raw_metrics=visible,
            ongoing_requests=sum(ongoing) / len(ongoing) if ongoing else 0.0,
            config=rec.config, policy_state=state, now=now,
        )

    def _deferral_policy(self, contexts):
        decisions, states, self.last_record = decide(contexts, self.settings)
        return decisions, states

    def decide(self, now: float) -> dict[str, int]:
        """One control-loop tick: returns and applies the new targets."""
        if self.policy == "deferral":
            contexts = {}
            for rec in self.records.values():
                ctx = self._context(rec, now, rec.policy_state)
                contexts[ctx.deployment_id] = ctx
            decisions, states = self._app_policy(contexts)
            for dep_id, replicas in decisions.items():
                rec = self.records[dep_id.name]
                rec.target = max(rec.config.min_replicas, min(rec.config.max_replicas, math.ceil(replicas)))
                rec.policy_state = states.get(dep_id, {})
        else:
            for rec in self.records.values():
                ctx = self._context(rec, now, rec.policy_state)
                cold = _get_cold_start_scale_up_replicas(ctx)
                if cold is not None:
                    replicas = cold
                else:
                    desired, _ = _core_replica_queue_length_policy(ctx)
                    desired = _apply_scaling_factors(desired, ctx.current_num_replicas, ctx.config)
                    replicas, rec.policy_state = _apply_delay_logic(
                        max(0, desired), ctx.target_num_replicas, ctx.config, dict(rec.policy_state), _now=now,
                    )
                rec.target = max(rec.config.min_replicas, min(rec.config.max_replicas, math.ceil(replicas)))
        return {name: rec.target for name, rec in self.records.items()}
