"""`speccascade bench soak` on tiny models: it starts its own service (in a child process, with its
own Ray cluster), loads it for a few seconds with cancels, deadlines and a replica kill, and
reports failures, sessions left, memory and identical outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from speccascade.app.launcher import free_port
from speccascade.bench.soak.report import linear_slope
from speccascade.bench.soak.workload import POLICIES, plan_request
from speccascade.cli import main

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark run in a child process: this checkout's package first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), os.environ.get("PYTHONPATH", "")]),
            **extra}


def test_the_request_plan_is_a_function_of_the_index_and_mixes_everything():
    plans = [plan_request(i, seed=0, cancel_share=0.1, deadline_share=0.05, max_new_tokens=16, block_size=4)
             for i in range(400)]
    assert plans[7] == plan_request(7, seed=0, cancel_share=0.1, deadline_share=0.05, max_new_tokens=16,
                                    block_size=4)
    assert {(p.method, p.rule, p.alpha) for p in plans} == set(POLICIES)
    assert {p.sampling for p in plans} == {"greedy", "sampled"}
    actions = [p.action for p in plans]
    assert 0.05 < actions.count("cancel") / len(plans) < 0.15 and actions.count("deadline") > 5
    assert not any(p.unary for p in plans if p.action == "cancel")  # cancels happen mid-stream


def test_linear_slope():
    assert linear_slope([(0, 1.0), (60, 2.0), (120, 3.0)]) == pytest.approx(1 / 60)
    with pytest.raises(ValueError, match="two different times"):
        linear_slope([(5, 1.0), (5, 2.0)])


def test_bench_soak_on_tiny_models_with_cancels_deadlines_and_a_kill(tiny_model_dirs, tmp_path):
    drafter, expert = tiny_model_dirs
    env = child_env(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "speccascade.cli", "bench", "soak", "--drafter", drafter, "--expert", expert,
               "--dtype", "fp32", "--clients", "2", "--minutes", "0.4", "--sample-every", "6", "--kill-every", "14",
               "--cancel-share", "0.3", "--deadline-share", "0.2", "--deadline-s", "0.05", "--max-new-tokens", "16",
               "--settle-s", "5", "--slope-skip-minutes", "0", "--reference-limit", "8", "--reference-repeats", "2",
               "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--out", str(tmp_path),
               "--name", "tiny"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "tiny.json").read_text())
    summary = report["summary"]
    assert summary["failed"] == 0, summary["failures"]
    assert summary["ok"] > 0 and summary["cancelled"] > 0 and summary["deadline"] > 0
    assert summary["sessions_left"]["Drafter"] == 0 and summary["sessions_left"]["Expert"] == 0
    assert summary["sessions_left"]["router_active"] == 0
    assert [k["deployment"] for k in summary["kills"]] == ["Expert"]
    reference = summary["reference"]
    assert reference["compared"] > 0 and not reference["reference_failed"]
    # fp32: a request with a fixed seed gives the same tokens whatever happened around it.
    assert reference["greedy"]["identical"] == reference["greedy"]["compared"]
    assert reference["sampled"]["identical"] == reference["sampled"]["compared"]
    floor = reference["replay_vs_replay"]
    assert floor["compared"] == reference["compared"] and not floor["differed"]
    phases = [s["phase"] for s in report["samples"]]
    assert phases.count("load") >= 3 and phases[-1] == "settled"
    assert all(r["rss_bytes"] > 0 for s in report["samples"] for rs in s["tiers"].values() for r in rs)
    assert summary["memory"]["Drafter"] or summary["memory"]["Expert"]  # a slope where a replica lived long enough
    # The router's memory is sampled too (the leak of ended sessions' calls grew there, not in the tiers).
    assert all(len(s["routers"]) == 1 and s["routers"][0]["rss_bytes"] > 0 for s in report["samples"])
    assert summary["memory"]["Router"]
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    assert "ok" in done.stderr and "min]" in done.stderr  # progress lines while it ran
    # --report summarizes a finished soak again from its JSON, to the same figures.
    assert main(["bench", "soak", "--report", str(tmp_path / "tiny.json")]) == 0
    assert json.loads((tmp_path / "tiny.json").read_text())["summary"] == summary


def test_the_kill_order_names_deployments_and_refuses_others():
    import argparse

    from speccascade.bench.soak.cli import kill_order

    assert kill_order("Router") == ("Router",)
    assert kill_order("Expert, Router,Drafter") == ("Expert", "Router", "Drafter")
    for bad in ("", "router", "Expert,Proxy"):
        with pytest.raises(argparse.ArgumentTypeError, match="--kill-order takes deployments from Expert, Drafter"):
            kill_order(bad)


def test_router_replicas_and_tier_processes_override_the_configs_and_take_valid_numbers_only():
    import argparse

    from speccascade.app.launcher import ServeOverrides
    from speccascade.commands.serve import non_negative_int, positive_int

    config = {"router": {"tier_call_timeout_s": 120, "replicas": {"min_replicas": 1, "max_replicas": 4}}}
    applied = ServeOverrides(router_replicas=2).apply(config)
    assert applied["router"] == {"tier_call_timeout_s": 120, "replicas": {"min_replicas": 2, "max_replicas": 2}}
    assert ServeOverrides().apply(config)["router"] == config["router"]  # unset: the config's
    assert ServeOverrides(tier_transport="grpc").apply(config)["router"] == {**config["router"], "tier_transport": "grpc"}
    tiers = ServeOverrides(allocator="tcmalloc", cpu_kernel_cache=1, cpu_spin_count=0).apply(config)
    assert tiers["drafter"] == tiers["expert"] == {"allocator": "tcmalloc", "cpu_kernel_cache": 1, "cpu_spin_count": 0}
    assert non_negative_int("0") == 0
    for bad in ("-1", "two"):  # --cpu-spin-count's
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 0"):
            non_negative_int(bad)
    assert positive_int("3") == 3
    for bad in ("0", "-1", "two"):  # also --cpu-kernel-cache's
        with pytest.raises(argparse.ArgumentTypeError, match="expected a positive integer"):
            positive_int(bad)


def test_the_replay_comparison_counts_the_resumed_requests_apart():
    from functools import partial

    from speccascade.bench.soak.runner import compare_with_reference
    from speccascade.bench.soak.workload import Outcome

    plan = partial(plan_request, seed=0, cancel_share=0.0, deadline_share=0.0, max_new_tokens=8, block_size=4)
    outcomes = [Outcome(i, plan(i).label, "complete", "ok", 0.0, 1.0, resumes=r) for i, r in enumerate([1, 0, 2])]
    tokens = {0: [1, 2, 3], 1: [4, 5], 2: [6, 7, 9]}
    report = compare_with_reference(tokens, {0: [1, 2, 3], 1: [4, 5], 2: [6, 7, 8]}, plan, outcomes)
    assert report["compared"] == 3 and report["resumed"] == {"compared": 2, "identical": 1}
    (differed,) = report["differed"]
    assert differed["index"] == 2 and differed["first_difference_at"] == 2 and differed["resumes"] == 2
