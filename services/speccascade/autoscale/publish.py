"""Making the deferral-aware policy's decisions visible to operators: Prometheus gauges, and the
decision record on the application's status board for `speccascade status`."""

from __future__ import annotations

import logging
import time

from .signals import REASON_KINDS

log = logging.getLogger(__name__)


class DecisionPublisher:
    """Makes the last decision visible: Prometheus gauges, and the decision record on the
    application's status board (`speccascade.status_board`), which `speccascade status` reads.
    Runs inside the Serve controller; a no-op without Ray.

    The gauges are the controller's own view of one decision (one writer), not per-replica
    figures, so exporting these rates and ratios does not mis-aggregate."""

    BOARD_MIN_INTERVAL_S = 1.0  # the control loop runs every 0.1 s; the status board needs no such rate

    def __init__(self):
        self._gauges = None
        self._poster = None
        self._last_post = 0.0

    def _make_gauges(self):
        from ray.util.metrics import Gauge

        return {
            "replicas": Gauge("speccascade_autoscale_replicas",
                              description="Replicas per tier: current, target, desired (fractional).",
                              tag_keys=("tier", "kind")),
            "input": Gauge("speccascade_autoscale_decision_input",
                           description="Inputs of the last deferral-aware autoscaling decision.",
                           tag_keys=("input",)),
            "tier_input": Gauge("speccascade_autoscale_tier_input",
                                description="Per-tier inputs of the last decision (floor, service time).",
                                tag_keys=("tier", "input")),
            "reason": Gauge("speccascade_autoscale_reason",
                            description="Why each tier's target is what it is: 1 for the last decision's "
                                        "reason, 0 for the others.",
                            tag_keys=("tier", "reason")),
        }

    def publish(self, record: dict, app_name: str | None) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - Ray is a dependency of the serving path
            return
        if not ray.is_initialized():
            return
        try:
            if self._gauges is None:
                self._gauges = self._make_gauges()
            for role, tier in record["tiers"].items():
                for kind, key in (("current", "current_replicas"), ("target", "target_replicas"),
                                  ("desired", "desired_replicas")):
                    self._gauges["replicas"].set(float(tier[key]), tags={"tier": role, "kind": kind})
                self._gauges["tier_input"].set(float(tier["queue_floor"]), tags={"tier": role, "input": "queue_floor"})
                for kind in REASON_KINDS:
                    self._gauges["reason"].set(float(kind == tier["reason_kind"]), tags={"tier": role, "reason": kind})
                if tier["service_time_s"] is not None:
                    self._gauges["tier_input"].set(float(tier["service_time_s"]),
                                                   tags={"tier": role, "input": "service_time_s"})
            for name, value in (record["demand"] or {}).items():
                if value is not None:
                    self._gauges["input"].set(float(value), tags={"input": name})
            now = time.monotonic()
            if app_name is not None and now - self._last_post >= self.BOARD_MIN_INTERVAL_S:
                from ..status_board import AUTOSCALING, StatusPoster

                if self._poster is None or self._poster.app_name != app_name:
                    self._poster = StatusPoster(app_name)
                self._poster.post(AUTOSCALING, "policy", record)
                self._last_post = now
        except Exception:  # visibility must never break scaling
            log.warning("could not publish the autoscaling decision", exc_info=True)
