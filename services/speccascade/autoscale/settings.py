"""Operator autoscaling policies: a YAML document (see `deploy/autoscaling/`), validated into
`AutoscalingSettings`, and turned into the two pieces of a Ray Serve application config that carry
it: the application-level `autoscaling_policy` and each deployment's `autoscaling_config`.

The same document is the `policy_kwargs` of the deferral-aware policy, so what an operator writes
is exactly what the Serve controller runs; the Helm chart passes it through unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ..config.base import MaxReplicas, ReplicaBounds, StrictModel

DEFERRAL_POLICY_FUNCTION = "speccascade.autoscale.policy:DeferralAwarePolicy"
RAY_METRICS_INTERVAL_DEFAULT_S = 10.0  # Ray's AutoscalingConfig.metrics_interval_s default


class TierScaling(ReplicaBounds):
    """How one deployment scales: its replica bounds, and how the policy moves within them."""

    max_replicas: MaxReplicas = 4
    target_utilization: float = Field(
        0.7, gt=0, le=1,
        description="Busy fraction each replica should run at: replicas = busy seconds per second / this.",
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="How long a scale-up must be wanted before it happens.")
    downscale_delay_s: float = Field(300.0, ge=0, description="How long a scale-down must be wanted before it happens.")
    max_step: int = Field(2, ge=1, description="Most replicas added or removed by one decision.")
    hysteresis: float = Field(
        0.1, ge=0, lt=1,
        description="Scale down only when demand is this fraction below what fewer replicas could carry.",
    )
    queue_floor_ongoing_per_replica: float = Field(
        8.0, gt=0,
        description="Burst safety floor: at least ongoing requests / this replicas, without the upscale delay.",
    )
    target_ongoing_requests: float = Field(
        2.0, gt=0,
        description="Ongoing requests per replica for the `queue` policy (and the router under both).",
    )
    service_time_s: float | None = Field(
        None, gt=0, description="Seconds per call assumed until replicas have reported a measured one.",
    )


class DeploymentNames(StrictModel):
    """The Serve deployment names of the three tiers in the application."""

    drafter: str = Field("Drafter", min_length=1, description="The drafter deployment.")
    expert: str = Field("Expert", min_length=1, description="The expert deployment.")
    router: str = Field("Router", min_length=1, description="The router (ingress) deployment.")

    @model_validator(mode="after")
    def _distinct(self) -> "DeploymentNames":
        names = [self.drafter, self.expert, self.router]
        if len(set(names)) != 3:
            raise ValueError(f"deployment names must differ, got drafter={self.drafter!r}, "
                             f"expert={self.expert!r}, router={self.router!r}")
        return self


class AutoscalingSettings(StrictModel):
    """An operator's autoscaling policy for the whole application."""

    policy: Literal["deferral", "queue"] = Field(
        "deferral",
        description="`deferral`: the deferral-aware application policy; `queue`: Ray Serve's own "
                    "per-deployment queue-length policy (for comparison).",
    )
    look_back_period_s: float = Field(30.0, gt=0, description="Window for rates and queue depth.")
    deferral_window_s: float = Field(
        10.0, gt=0,
        description="Shorter, most recent window for the deferral rate and accepted length (ratios of "
                    "many positions settle fast, so they can react before the load rates do).",
    )
    metrics_interval_s: float = Field(
        RAY_METRICS_INTERVAL_DEFAULT_S, gt=0, description="How often replicas push their signals to the controller.",
    )
    deployments: DeploymentNames = Field(default_factory=DeploymentNames, description="Deployment names.")
    drafter: TierScaling = Field(default_factory=lambda: TierScaling(service_time_s=0.25),
                                 description="The drafter tier.")
    expert: TierScaling = Field(default_factory=lambda: TierScaling(service_time_s=0.5),
                                description="The expert tier.")
    router: TierScaling = Field(default_factory=lambda: TierScaling(min_replicas=1, max_replicas=1),
                                description="The router tier (scaled on ongoing requests).")

    @model_validator(mode="after")
    def _windows(self) -> "AutoscalingSettings":
        if self.deferral_window_s > self.look_back_period_s:
            raise ValueError(
                f"deferral_window_s={self.deferral_window_s} is longer than "
                f"look_back_period_s={self.look_back_period_s}; Ray keeps only the look-back window"
            )
        if self.metrics_interval_s >= self.look_back_period_s:
            raise ValueError(
                f"metrics_interval_s={self.metrics_interval_s} must be shorter than "
                f"look_back_period_s={self.look_back_period_s}"
            )
        return self

    def tier(self, role: str) -> TierScaling:
        return {"drafter": self.drafter, "expert": self.expert, "router": self.router}[role]


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def settings_from_dict(data: Any, *, source: str = "autoscaling policy") -> AutoscalingSettings:
    """Validate a policy document; a ValueError names every bad key and value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return AutoscalingSettings.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = _location(item["loc"])
            if item["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown key")
            elif item["type"] == "value_error" or not item["loc"]:
                problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
            else:
                problems.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
        raise ValueError(f"{source}: " + "; ".join(problems)) from None


def load_settings(path: str | Path) -> AutoscalingSettings:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"autoscaling policy file {str(path)!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ValueError(f"autoscaling policy file {str(path)!r} is not valid YAML: {error}") from None
    return settings_from_dict(data, source=str(path))


# --------------------------------------------------------------------------------------------
# Serve config pieces
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServeAutoscaling:
    """What goes into a Serve application config: `autoscaling_policy` (None for `queue`) and the
    `deployments` entries carrying each tier's `autoscaling_config`."""

    autoscaling_policy: dict | None
    deployments: list[dict]


def _deployment_autoscaling_config(settings: AutoscalingSettings, tier: TierScaling) -> dict:
    config: dict[str, Any] = {
        "min_replicas": tier.min_replicas,
        "max_replicas": tier.max_replicas,
        "target_ongoing_requests": tier.target_ongoing_requests,
        "look_back_period_s": settings.look_back_period_s,
    }
    if tier.initial_replicas is not None:
        config["initial_replicas"] = tier.initial_replicas
    if settings.metrics_interval_s != RAY_METRICS_INTERVAL_DEFAULT_S:
        config["metrics_interval_s"] = settings.metrics_interval_s
    if settings.policy == "deferral":
        # The deferral-aware policy applies its own delays, step limit and hysteresis; Ray's
        # wrapper around an application policy would add its delays on top, so they are zero.
        config["upscale_delay_s"] = 0.0
        config["downscale_delay_s"] = 0.0
    else:
        config["upscale_delay_s"] = tier.upscale_delay_s
        config["downscale_delay_s"] = tier.downscale_delay_s
    return config


def serve_autoscaling(settings: AutoscalingSettings) -> ServeAutoscaling:
    names = settings.deployments
    deployments = [
        {"name": getattr(names, role), "autoscaling_config": _deployment_autoscaling_config(settings, settings.tier(role))}
        for role in ("router", "drafter", "expert")
    ]
    policy = None
    if settings.policy == "deferral":
        policy = {"policy_function": DEFERRAL_POLICY_FUNCTION, "policy_kwargs": settings.model_dump(mode="json", exclude_none=True)}
    return ServeAutoscaling(autoscaling_policy=policy, deployments=deployments)


def apply_to_application(application: dict, settings: AutoscalingSettings) -> dict:
    """A copy of a Serve application config (one entry of `applications:`) with the policy's
    pieces merged in: deployments are matched by name, other deployment options are kept, and a
    fixed `num_replicas` gives way to autoscaling."""
    out = copy.deepcopy(application)
    pieces = serve_autoscaling(settings)
    if pieces.autoscaling_policy is None:
        out.pop("autoscaling_policy", None)
    else:
        out["autoscaling_policy"] = pieces.autoscaling_policy
    by_name = {d["name"]: d for d in out.setdefault("deployments", [])}
    for piece in pieces.deployments:
        entry = by_name.get(piece["name"])
        if entry is None:
            out["deployments"].append(copy.deepcopy(piece))
        else:
            entry.pop("num_replicas", None)
            entry["autoscaling_config"] = copy.deepcopy(piece["autoscaling_config"])
    return out


def helm_values(settings: AutoscalingSettings) -> dict:
    """The chart's `autoscaling:` values for a policy: both Serve config pieces, which the chart
    passes through verbatim (`autoscalingPolicy` onto the application, `deployments` merged into
    its deployments by name)."""
    pieces = serve_autoscaling(settings)
    return {"autoscaling": {"autoscalingPolicy": pieces.autoscaling_policy or {}, "deployments": pieces.deployments}}


def main(argv: list[str] | None = None) -> int:
    """`python -m speccascade.autoscale.settings POLICY.yaml [--serve-config CONFIG.yaml]`: validate
    a policy file and print the Helm values that carry it (`helm install ... -f <this output>`),
    or, with --serve-config, that Serve config with the policy merged into every application
    (for `serve deploy`)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m speccascade.autoscale.settings", description=main.__doc__)
    parser.add_argument("policy", type=Path, help="an operator policy file, e.g. deploy/autoscaling/deferral.yaml")
    parser.add_argument("--serve-config", type=Path, default=None,
                        help="a Serve config (e.g. deploy/gpu-cluster.yaml) to print with the policy merged in")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.policy)
        if args.serve_config is None:
            out = helm_values(settings)
        else:
            try:
                out = yaml.safe_load(args.serve_config.read_text())
            except FileNotFoundError:
                raise ValueError(f"Serve config {str(args.serve_config)!r} does not exist") from None
            if not isinstance(out, dict) or not isinstance(out.get("applications"), list):
                raise ValueError(f"Serve config {str(args.serve_config)!r} has no `applications:` list")
            out["applications"] = [apply_to_application(app, settings) for app in out["applications"]]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
