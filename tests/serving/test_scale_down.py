"""A scale-down on a real cluster: the drafter replica Serve stops keeps answering the sessions it
holds (their calls come to it directly, past Serve) until they end, so none of them is recomputed
elsewhere; without the drain (`drain_timeout_s: 0`) they are. Every stream gives the in-process
output either way."""

from __future__ import annotations

import threading

import pytest
from ray import serve
from speccascade.api.client import SpecCascadeClient
from speccascade.serving.replicas import replica_ids, tier_replica_stats

from ..served import PROMPT, app_args, in_process_policy, wait_for_running, wait_until

APP = "speccascade-scale-down"
# Serve replaces all three deployments when the app is deployed again (a new version of each), so
# the expert's and the router's replicas drain too: long enough that no stream outlasts them on a
# loaded machine, leaving the drafter's drain the only one under test.
OTHERS_DRAIN_S = 120.0
# A round a token: streams that last seconds, long enough to outlive the moment Serve stops the drafter
# replicas (with 160 tokens, CI once saw every stream finish first: no moved stream at drain 0).
OPTIONS = dict(seed=3, max_new_tokens=320, block_size=1)


@pytest.mark.parametrize("drain_timeout_s", [30.0, 0.0])
def test_a_stopping_drafter_replica_finishes_its_sessions_instead_of_losing_them(local_stack, tiny_pair,
                                                                                 local_engine, drain_timeout_s):
    expected = in_process_policy(local_engine, "cascade", "lossless", 0.0, {}, **OPTIONS).token_ids
    drafter = {"drain_timeout_s": drain_timeout_s}
    others = {"expert": {"drain_timeout_s": OTHERS_DRAIN_S}, "router": {"drain_timeout_s": OTHERS_DRAIN_S}}
    two = app_args(*tiny_pair, drafter={**drafter, "replicas": {"min_replicas": 2, "max_replicas": 2}}, **others)
    endpoints = local_stack.deploy(two, name=APP, route_prefix=f"/{APP}")
    try:
        wait_for_running(APP, ["Drafter", "Expert", "Router"])
        assert wait_until(lambda: len(replica_ids(APP, "Drafter")) == 2, timeout=60)
        finished: list = []

        def stream() -> None:
            with SpecCascadeClient(endpoints.grpc_target, application=APP) as client:
                finished.append(list(client.stream(prompt=PROMPT, rule="lossless", alpha=0.0, **OPTIONS)))

        def holding() -> list[int]:
            return [stats.cache.sessions for stats in tier_replica_stats(APP, "Drafter")]

        # Streams until each drafter replica holds one (sessions are placed by hashing their ids).
        streams: list[threading.Thread] = []
        while len(streams) < 12 and not (len(held := holding()) == 2 and min(held) >= 1):
            streams.append(threading.Thread(target=stream))
            streams[-1].start()
            wait_until(lambda: sum(holding()) >= len(streams) - len(finished), timeout=5)
        assert len(held) == 2 and min(held) >= 1, f"sessions per drafter replica: {held}"

        one = app_args(*tiny_pair, drafter={**drafter, "replicas": {"min_replicas": 1, "max_replicas": 1}}, **others)
        local_stack.deploy(one, name=APP, route_prefix=f"/{APP}")  # Serve stops one of the two
        assert wait_until(lambda: len(replica_ids(APP, "Drafter")) == 1, timeout=60)
        for thread in streams:
            thread.join(timeout=120)
        assert len(finished) == len(streams)
        how = []  # (context resends, tier retries) per stream
        for chunks in finished:
            assert [t for c in chunks for t in c.token_ids] == expected
            stats = chunks[-1].stats
            how.append((stats.context_resends, stats.tier_retries))
        moved = sum(1 for resends, retries in how if resends > 0 or retries > 0)
        if drain_timeout_s:
            # No session lost its drafter: none sent again whole, no call retried.
            assert moved == 0, f"(context resends, tier retries) per stream: {how}"
        else:
            assert moved >= 1, f"no stream moved: (context resends, tier retries) per stream {how}"  # recomputed
    finally:
        serve.delete(APP)
