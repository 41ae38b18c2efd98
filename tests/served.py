"""Helpers of the tests that run the served application on a local Ray cluster (the fixtures that
start it are in conftest.py): the application's arguments on the tiny pair, the in-process twin
of a served request, and waiting for the cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from speccascade.engine.request import GenerationRequest
from speccascade.options import SamplingParams

SERVE_APP = "speccascade"
PROMPT = "def add(a, b):"

# Every rule and every baseline; the server's block size is 4 (app_args).
POLICIES = [
    ("cascade", "lossless", 0.0), ("cascade", "chow", 0.3), ("cascade", "diff", 0.1), ("cascade", "opt", 0.3),
    ("cascade", "token", 0.3), ("cascade", "token_v1", 0.3), ("cascade", "token_v2", 0.3), ("cascade", "lossy", 0.3), ("expert", "lossless", 0.3), ("drafter", "lossless", 0.3),
    ("token-cascade", "lossless", 0.3), ("sequence-cascade", "lossless", 0.3),
]
SAMPLINGS = {"greedy": {}, "sampled": dict(temperature=0.7, top_p=0.95)}


class UncalledTierHandle:
    """A tier's deployment handle for a router core that is never to call it: its name, its
    application, and `options` (the router picks the transport once, at start)."""

    def __init__(self, name: str, app_name: str = "speccascade"):
        self.deployment_name, self.app_name = name, app_name

    def options(self, **_options) -> "UncalledTierHandle":
        return self


def app_args(drafter_dir: str, expert_dir: str, **overrides) -> dict:
    """The application on the tiny pair, fp32; `overrides` update a section each."""
    tier = {"dtype": "fp32", "kv_cache_budget_mb": 64}
    args = {
        "drafter": {"model": drafter_dir, **tier},
        "expert": {"model": expert_dir, **tier},
        "router": {"tier_call_timeout_s": 60.0},  # generous: a replica restart on a loaded machine
        "policy": {"rule": "lossless", "alpha": 0.0, "block_size": 4, "max_new_tokens": 32,
                   "max_new_tokens_cap": 400},
    }
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value}
    return args


def in_process(engine, method="expert", **kwargs):
    kwargs.setdefault("max_new_tokens", 32)
    return engine.generate(GenerationRequest(prompt=kwargs.pop("prompt", PROMPT), method=method, **kwargs))


def in_process_policy(engine, method, rule, alpha, sampling: dict, *, seed: int, max_new_tokens: int,
                      block_size: int = 4, pipeline: str = "auto"):
    return engine.generate(GenerationRequest(
        prompt=PROMPT, method=method, rule=rule, alpha=alpha, block_size=block_size, max_new_tokens=max_new_tokens,
        sampling=SamplingParams(**sampling), seed=seed, pipeline=pipeline))


def wait_until(condition, timeout=15.0, period=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(period)
    return condition()


def cached_sessions(tier_handles) -> dict[str, int]:
    return {name: tier_handles[name].cache_stats.remote().result().sessions for name in ("Drafter", "Expert")}


def wait_for_running(app: str, deployments: list[str], timeout: float = 120.0) -> None:
    """Until each of `deployments` of `app` has a running replica (others may never: a tier that
    cannot be placed)."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and all(
            status.deployments.get(d) and status.deployments[d].replica_states.get("RUNNING", 0) > 0
            for d in deployments
        ):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{deployments} of {app} not running after {timeout}s")


@contextmanager
def deployed(app: str, args: dict, *, routers: int = 1) -> Iterator[None]:
    """The application `app` built from `args`, deployed beside the session's, until the block
    ends (then deleted); its three deployments running, with `routers` router replicas."""
    from ray import serve
    from speccascade.app import build_app
    from speccascade.serving.replicas import replica_actor_names

    serve._run(build_app(args), name=app, route_prefix=f"/{app}", _blocking=False)
    try:
        wait_for_running(app, ["Router", "Drafter", "Expert"])
        assert len(replica_actor_names(app, "Router")) == routers
        yield
    finally:
        serve.delete(app)
