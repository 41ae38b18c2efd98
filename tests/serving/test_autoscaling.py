"""Deferral-aware autoscaling end to end on the local Ray cluster (tiny fp32 models).

The application is deployed the way KubeRay and `serve deploy` do it (a declarative config with
the application-level `autoscaling_policy` rendered from an operator policy), then driven over
gRPC with a steady load: first `chow` with a lenient alpha (almost no position defers, so blocks
skip the expert), then with a strict one (every position defers). The expert tier must grow
while the drafter tier stays within one replica of where it was.

Windows are short (look-back 6 s, replicas push every 0.5 s) so the test takes about two minutes.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from speccascade.autoscale.settings import apply_to_application, settings_from_dict
from speccascade.serving.replicas import running_count

from ..served import app_args

APP = "speccascade-autoscale"
CLIENTS = 4
LENIENT_ALPHA, STRICT_ALPHA = 0.95, 0.0  # chow defers iff max q < 1 - alpha
PROMPTS = ["def add(a, b):", "class Stack:", "import os\n", "# sort a list\n", "for i in range(10):"]

POLICY = {
    "look_back_period_s": 6, "deferral_window_s": 3, "metrics_interval_s": 0.5,
    "router": {"min_replicas": 1, "max_replicas": 1},
    # The tiny models compute in milliseconds, so the expert's utilisation target is tiny: a fully
    # verified load then needs several expert replicas, a skipped one needs one. The drafter's
    # service time is noisy on a shared 2-core machine (it competes with the expert for the CPUs),
    # hence its longer upscale delay.
    "drafter": {"min_replicas": 1, "max_replicas": 4, "target_utilization": 0.9, "upscale_delay_s": 10,
                "downscale_delay_s": 600, "max_step": 2, "service_time_s": 0.01},
    "expert": {"min_replicas": 1, "max_replicas": 3, "target_utilization": 0.01, "upscale_delay_s": 2,
               "downscale_delay_s": 600, "max_step": 2, "service_time_s": 0.005},
}


def running(app_status, deployment: str) -> int:
    return running_count(app_status.deployments[deployment].replica_states)


@pytest.fixture(scope="module")
def autoscaled_app(grpc_port, tiny_pair):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    elastic = {"replicas": {"min_replicas": 1, "max_replicas": 4}}  # overridden by the policy's bounds
    application = apply_to_application(
        {"name": APP, "route_prefix": "/autoscale", "import_path": "speccascade.app:build_app",
         "args": app_args(*tiny_pair, drafter=elastic, expert=elastic, router=elastic)},
        settings_from_dict(POLICY),
    )
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[application]), _blocking=True)
    try:
        yield f"127.0.0.1:{grpc_port}"
    finally:
        serve.delete(APP)


class Load:
    """CLIENTS threads generating back to back with the current alpha."""

    def __init__(self, target: str):
        from speccascade.api.client import SpecCascadeClient

        self.client = SpecCascadeClient(target, application=APP, timeout=60)
        self.alpha = LENIENT_ALPHA
        self.stop = threading.Event()
        self.completed = 0
        self.errors: list[BaseException] = []
        self.pool = ThreadPoolExecutor(CLIENTS)
        self.futures = [self.pool.submit(self._worker, i) for i in range(CLIENTS)]

    def _worker(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                self.client.generate(prompt=PROMPTS[(index + n) % len(PROMPTS)], rule="chow", alpha=self.alpha,
                                     block_size=4, max_new_tokens=48, seed=index * 1000 + n)
                self.completed += 1
            except Exception as error:  # recorded and asserted on, never swallowed
                self.errors.append(error)
                return
            n += 1

    def close(self) -> None:
        self.stop.set()
        for future in self.futures:
            future.result(timeout=120)
        self.pool.shutdown()
        self.client.close()


def observe(seconds: float, until=None) -> list[dict]:
    """Poll replica counts and the policy's last decision every half second."""
    from ray import serve
    from speccascade.commands.status import read_decision

    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        app = serve.status().applications[APP]
        decision = read_decision(APP)
        samples.append({"drafter": running(app, "Drafter"), "expert": running(app, "Expert"), "decision": decision})
        if until is not None and until(samples[-1]):
            break
        time.sleep(0.5)
    return samples


def test_expert_scales_with_the_deferral_rate_while_the_drafter_holds(autoscaled_app, capsys):
    from speccascade.commands import status as status_command

    load = Load(autoscaled_app)
    try:
        lenient = observe(20)
        steady = lenient[-1]
        demand = steady["decision"]["demand"]
        assert demand is not None and demand["rounds_per_s"] > 0, "router signals must reach the policy"
        assert demand["deferral_rate"] < 0.2
        assert demand["skippable_share"] == pytest.approx(1.0)
        assert steady["expert"] == 1
        assert steady["decision"]["tiers"]["expert"]["service_time_s"] < 1.0  # measured, not the prior
        drafter_before = steady["drafter"]

        load.alpha = STRICT_ALPHA
        # Replicas take a while to start on a busy machine: wait for the second one to run.
        strict = observe(100, until=lambda s: s["expert"] >= 2)
        decision = strict[-1]["decision"]
        assert strict[-1]["expert"] >= 2, [(s["expert"], s["decision"]["tiers"]["expert"]["target_replicas"])
                                           for s in strict]
        assert decision["tiers"]["expert"]["target_replicas"] == 3  # max_replicas: demand is far above
        assert decision["demand"]["deferral_rate"] > 0.9
        assert decision["demand"]["expert_calls_per_round"] > 0.9
        assert all(abs(s["drafter"] - drafter_before) <= 1 for s in lenient[-10:] + strict), \
            [(s["drafter"], s["decision"] and s["decision"]["tiers"]["drafter"]["desired_replicas"])
             for s in lenient + strict]

        # `speccascade status` shows the replicas and the decision's inputs.
        status_command.run(type("Args", (), {"address": "auto", "app": APP, "json": False})())
        shown = capsys.readouterr().out
        assert "expert" in shown and "deferral rate δ" in shown and "Expert" in shown
        print(shown)
    finally:
        load.close()
    print("drafter/expert running, lenient:", [(s["drafter"], s["expert"]) for s in lenient],
          "strict:", [(s["drafter"], s["expert"]) for s in strict], "requests:", load.completed)
    assert not load.errors, load.errors[:3]
    assert load.completed > 0
