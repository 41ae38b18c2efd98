"""The queueing simulation behind `speccascade bench autoscale`: its bookkeeping and its cascade."""

from __future__ import annotations

import pytest
from speccascade.autoscale.settings import settings_from_dict
from speccascade.bench.autoscale.simulate import Simulation, Trace


def fixed(drafter: int, expert: int, policy: str = "deferral"):
    return settings_from_dict({
        "policy": policy, "look_back_period_s": 30, "deferral_window_s": 10, "metrics_interval_s": 5,
        "drafter": {"min_replicas": drafter, "max_replicas": drafter},
        "expert": {"min_replicas": expert, "max_replicas": expert},
    })


def test_fixed_replicas_cost_and_cascade_statistics():
    trace = Trace(bin_s=60, request_rate=[0.5] * 20, deferral=[0.1] * 20)
    result = Simulation(trace, fixed(6, 3), drafter_call_s=0.4, expert_call_s=0.2, request_tokens=64, seed=3).run()
    assert result.drafter_replica_s == pytest.approx(6 * 1200)
    assert result.expert_replica_s == pytest.approx(3 * 1200)
    # Under chow a round reaches the expert iff some of its 5 positions defers.
    share = result.expert_calls / result.drafter_calls
    assert share == pytest.approx(1 - 0.9 ** 5, abs=0.02)
    # Roughly the offered requests (0.5/s for 1200 s) finish, minus those still running at the end.
    assert 0.8 * 600 < result.requests_done <= 0.5 * 1200 * 1.15
    assert result.tokens >= 64 * result.requests_done


def test_too_few_replicas_make_calls_wait_and_more_replicas_do_not():
    trace = Trace(bin_s=60, request_rate=[0.6] * 15, deferral=[0.4] * 15)
    short = Simulation(trace, fixed(10, 1), drafter_call_s=0.4, expert_call_s=0.3, seed=1).run()
    ample = Simulation(trace, fixed(10, 9), drafter_call_s=0.4, expert_call_s=0.3, seed=1).run()
    assert short.expert_wait_p95_s > 1.0
    assert ample.expert_wait_p95_s < 0.3


def test_deferral_policy_follows_a_deferral_step_in_the_simulation():
    rates = [0.5] * 40
    deferral = [0.03] * 20 + [0.45] * 20
    trace = Trace(bin_s=60, request_rate=rates, deferral=deferral)
    settings = settings_from_dict({
        "look_back_period_s": 30, "deferral_window_s": 10, "metrics_interval_s": 5,
        "drafter": {"max_replicas": 20, "upscale_delay_s": 10, "downscale_delay_s": 120, "service_time_s": 0.4},
        "expert": {"max_replicas": 12, "upscale_delay_s": 10, "downscale_delay_s": 120, "service_time_s": 0.2},
    })
    result = Simulation(trace, settings, drafter_call_s=0.4, expert_call_s=0.2, startup_s=10, seed=2).run()
    tl = result.timeline
    before = [e for t, e in zip(tl["t"], tl["expert_target"]) if 900 <= t < 1200]
    after = [e for t, e in zip(tl["t"], tl["expert_target"]) if 2100 <= t < 2400]
    drafter_before = [d for t, d in zip(tl["t"], tl["drafter_target"]) if 900 <= t < 1200]
    drafter_after = [d for t, d in zip(tl["t"], tl["drafter_target"]) if 2100 <= t < 2400]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(after) >= 3 * mean(before)  # ~6.5x the expert calls per round
    assert mean(drafter_after) <= 1.3 * mean(drafter_before)  # ~1.15x the rounds per token
