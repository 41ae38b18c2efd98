"""The launcher's port choice: ports a proxy binds later must be ones no port-0 bind can take."""

from __future__ import annotations

import os
import random
import signal
import socket

import pytest
from speccascade.app import launcher
from speccascade.app.launcher import free_port


def test_free_ports_lie_below_the_ephemeral_range_and_are_bindable():
    low, _ = launcher.ephemeral_port_range()
    rng = random.Random(0)
    for _ in range(50):
        port = free_port(rng)
        assert launcher.LOWEST_CHOSEN_PORT <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when returned


def test_a_port_in_use_is_skipped():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]

        class Replay(random.Random):
            """Offers the busy port first, then an ordinary choice."""
            offered = False

            def randrange(self, start, stop):
                if not self.offered:
                    self.offered = True
                    return busy
                return super().randrange(start, stop)

        port = free_port(Replay(1))
        assert port != busy


def test_a_range_starting_too_low_chooses_above_it(monkeypatch):
    monkeypatch.setattr(launcher, "ephemeral_port_range", lambda: (1024, 50000))
    assert all(50000 < free_port(random.Random(seed)) < 65536 for seed in range(20))


def test_no_free_port_is_an_error_naming_the_range(monkeypatch):
    monkeypatch.setattr(launcher, "ephemeral_port_range", lambda: (32768, 60999))
    monkeypatch.setattr(launcher.socket, "socket", lambda *a, **k: _Unbindable())
    with pytest.raises(RuntimeError, match="10000-32767"):
        free_port(random.Random(0))


class _Unbindable:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        raise OSError(98, "Address already in use")


def test_the_stack_environment_fills_in_only_what_is_unset_and_only_while_the_cluster_starts(monkeypatch):
    """The local cluster's processes inherit the defaults; an operator's own value stands, and the
    process that started the cluster keeps its environment as it was."""
    monkeypatch.setenv("SPECCASCADE_TEST_OPERATOR_SET", "mine")
    monkeypatch.delenv("SPECCASCADE_TEST_UNSET", raising=False)
    with launcher._environment({"SPECCASCADE_TEST_OPERATOR_SET": "default", "SPECCASCADE_TEST_UNSET": "1"}):
        assert os.environ["SPECCASCADE_TEST_OPERATOR_SET"] == "mine"
        assert os.environ["SPECCASCADE_TEST_UNSET"] == "1"
    assert os.environ["SPECCASCADE_TEST_OPERATOR_SET"] == "mine"
    assert "SPECCASCADE_TEST_UNSET" not in os.environ


def test_the_local_clusters_processes_run_serves_periodic_work_once_a_second(ray_cluster):
    """Serve's controller loop and every Serve process's metrics flush run ten times a second by
    default, beside the tiers' passes on the same cores: the local stack slows both in every
    process its cluster starts (the controller and the proxies among them)."""
    import ray
    from speccascade.app.launcher import LOCAL_SERVE_ENV

    assert LOCAL_SERVE_ENV == {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}

    @ray.remote(num_cpus=0)
    def worker_environment() -> dict:
        return {name: os.environ.get(name) for name in LOCAL_SERVE_ENV}

    assert ray.get(worker_environment.remote()) == LOCAL_SERVE_ENV
    for name in LOCAL_SERVE_ENV:  # this process, which started the cluster, is as it was
        assert os.environ.get(name) is None


def test_tier_and_router_replicas_flush_serves_metrics_once_a_second_wherever_they_run():
    """On a cluster the chart starts, the replicas' own environment is what slows the flush."""
    from speccascade.app import SERVE_METRICS_ENV, router_actor_options, tier_actor_options
    from speccascade.config import AppConfig

    assert SERVE_METRICS_ENV == {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}
    config = AppConfig.model_validate({})
    for options in (tier_actor_options(config.drafter), tier_actor_options(config.expert),
                    router_actor_options(config.router)):
        assert options["runtime_env"]["env_vars"].items() >= SERVE_METRICS_ENV.items()


def test_starting_the_cluster_keeps_this_process_sigterm_handler(monkeypatch):
    """`ray.init` puts a failure handler of its own over SIGTERM (it prints a stack trace and kills
    the process): a command that stops cleanly on SIGTERM (bench serve under `timeout`: print what
    it measured, stop the cluster) must still have its handler once the cluster runs."""
    import ray
    from ray import serve

    def ray_init_taking_sigterm(**options):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what the C++ failure handler does to Python's

    monkeypatch.setattr(ray, "init", ray_init_taking_sigterm)
    monkeypatch.setattr(serve, "start", lambda **options: None)
    own = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, own)
    try:
        launcher.LocalStack(grpc_port=free_port(), http_port=free_port(), num_cpus=1).start()
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stack_stopped_by_its_caller_stops_after_a_failed_deployment_only_when_the_caller_closes(monkeypatch):
    """With `stop_with`, the cluster's stop is the caller's from the moment it runs: a deployment
    that fails (or is interrupted: bench serve under `timeout`) leaves it to the caller, who first
    writes what it measured; without, a failed deployment stops the stack at once."""
    from contextlib import ExitStack

    events = []
    monkeypatch.setattr(launcher.LocalStack, "start", lambda self: events.append("start") or self)
    monkeypatch.setattr(launcher.LocalStack, "stop", lambda self: events.append("stop"))

    def deploy_interrupted(self, config, **where):
        raise SystemExit(143)

    monkeypatch.setattr(launcher.LocalStack, "deploy", deploy_interrupted)
    with pytest.raises(SystemExit), ExitStack() as caller:
        caller.callback(events.append, "caller's own cleanup")
        try:
            launcher.start_serve_config(None, stop_with=caller, grpc_port=free_port(), http_port=free_port())
        finally:
            events.append("figures written")
    assert events == ["start", "figures written", "stop", "caller's own cleanup"]
    events.clear()
    with pytest.raises(SystemExit):
        launcher.start_serve_config(None, grpc_port=free_port(), http_port=free_port())
    assert events == ["start", "stop"]
