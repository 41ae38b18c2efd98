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


def test_a_soak_stopped_by_ctrl_c_ends_its_load_early_still_checks_and_writes_what_it_measured(tiny_model_dirs,
                                                                                                 tmp_path):
    """A 10-minute soak interrupted after its first samples: the load ends, the clients finish their
    requests, the settle and the replay still run, and the report says it was stopped early."""
    import signal
    import threading
    import time

    drafter, expert = tiny_model_dirs
    command = [sys.executable, "-m", "speccascade.cli", "bench", "soak", "--drafter", drafter, "--expert", expert,
               "--dtype", "fp32", "--clients", "2", "--minutes", "10", "--sample-every", "3", "--max-new-tokens", "16",
               "--settle-s", "5", "--slope-skip-minutes", "0", "--reference-limit", "4",
               "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--out", str(tmp_path),
               "--name", "stopped"]
    soak = subprocess.Popen(command, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(600, soak.kill)  # reading its output has no timeout of its own
    watchdog.start()
    lines = []
    try:
        for line in soak.stdout:  # progress lines: the start's, then one per sample
            lines.append(line)
            if sum("min] ok" in seen for seen in lines) >= 3:
                break
        interrupted_at = time.monotonic()
        soak.send_signal(signal.SIGINT)
        lines.extend(soak.stdout)
        assert soak.wait(timeout=300) == 0, "".join(lines)[-4000:]
    finally:
        watchdog.cancel()
        if soak.poll() is None:
            soak.kill()
    output = "".join(lines)
    assert time.monotonic() - interrupted_at < 240, output[-2000:]
    summary = json.loads((tmp_path / "stopped.json").read_text())["summary"]
    assert summary["interrupted"]["checks_skipped"] is False
    assert summary["interrupted"]["load_ended_at_min"] < 2 and summary["clients_stopped_at_min"] < 2
    assert summary["failed"] == 0 and summary["ok"] > 0
    assert summary["sessions_left"]["Drafter"] == 0 and summary["sessions_left"]["Expert"] == 0
    reference = summary["reference"]
    assert reference["compared"] > 0 and "skipped" not in reference
    assert reference["greedy"]["identical"] == reference["greedy"]["compared"]
    assert "stopping early" in output and "stopped early: the load ended at" in output


class StillProbe:
    """A service probe with nothing to report (no replicas to sample or kill)."""

    def tiers(self):
        return {}

    def routers(self):
        return []

    def router_active_sessions(self):
        return 0

    def wait_until_running(self, timeout_s):
        pass


def soak_with_stand_in_requests(monkeypatch, replay_s: float, **options):
    """A Soak whose requests complete at once (each's tokens: its index) and whose replayed ones take
    `replay_s` each, over a probe with nothing to report."""
    import argparse
    import contextlib
    import threading
    import time

    from rich.console import Console
    from speccascade.api import client as api_client
    from speccascade.bench.soak import runner
    from speccascade.bench.soak.workload import Outcome

    def request(client, spec, *, deadline_s, clock_zero, request_id=None):
        time.sleep(replay_s if "replay" in request_id else 0.01)
        return Outcome(spec.index, spec.label, spec.action, "ok", time.monotonic() - clock_zero, 0.01,
                       token_ids=[spec.index])

    monkeypatch.setattr(runner, "run_request", request)
    monkeypatch.setattr(api_client, "SpecCascadeClient", lambda *args, **kwargs: contextlib.nullcontext())
    args = argparse.Namespace(**{"minutes": 10.0, "sample_every": 0.2, "clients": 2, "settle_s": 0.1, "seed": 0,
                                 "cancel_share": 0.0, "deadline_share": 0.0, "deadline_s": 1.0, "max_new_tokens": 8,
                                 "block_size": 5, "kill_every": None, "reference_limit": 8, "reference_repeats": 2,
                                 **options})
    return runner.Soak(args, "localhost:1", "speccascade", StillProbe(), Console(quiet=True),
                       end_load=threading.Event(), skip_checks=threading.Event())


def test_a_second_ctrl_c_skips_the_soaks_settle_and_its_replay(monkeypatch):
    import threading
    import time

    soak = soak_with_stand_in_requests(monkeypatch, replay_s=0.0, settle_s=600.0)
    threading.Timer(0.5, soak.end_load.set).start()
    threading.Timer(1.0, soak.skip_checks.set).start()
    started = time.monotonic()
    soak.run()
    assert time.monotonic() - started < 30  # neither the 10 minutes nor the 600 s settle
    assert soak.load_ended_early_s is not None and soak.load_ended_early_s < 5
    assert [sample.phase for sample in soak.samples][-1] == "load"  # no settled sample: not counted
    assert soak.reference() == {"compared": 0, "skipped": True}


def test_a_replay_cut_short_compares_what_it_replayed_and_says_so(monkeypatch):
    import threading

    soak = soak_with_stand_in_requests(monkeypatch, replay_s=0.4)
    threading.Timer(0.5, soak.end_load.set).start()
    soak.run()
    assert [sample.phase for sample in soak.samples][-1] == "settled"
    threading.Timer(1.0, soak.skip_checks.set).start()  # while the first replay runs (8 requests, ~1.6 s)
    reference = soak.reference()
    assert reference["skipped"] is True and "replay_vs_replay" not in reference  # the second replay never ran
    assert 0 < reference["compared"] < 8 and not reference["differed"]


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
