"""`speccascade bench serve` on tiny models: it starts the application (in a child process, with
its own Ray cluster), pairs in-process and served requests prompt by prompt, and the fp32 outputs
agree token for token."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from speccascade.app.launcher import free_port
from speccascade.bench import machine
from speccascade.bench.serve import cli, measure
from speccascade.bench.serve.measure import OTHER, PHASES, ROUND, Breakdown, Concurrency
from speccascade.engine.stats import GenerationStats

from .test_soak_bench import child_env


def test_the_breakdown_shows_the_loops_own_time_and_the_rounds_wall_time_apart_from_overlapping_calls():
    """Two rounds, 100 ms: the loop waited 50 ms for tier calls, whose phases add up to 70 (a next
    draft ran 20 ms while the loop streamed the round before). The loop's own time is the 50 ms it
    waited for no call; the round's wall time is 50 ms a round, not the sum of the rows."""
    stats = GenerationStats(rounds=2, wall_seconds=0.100, drafter_seconds=0.020, expert_seconds=0.030,
                            drafter_forward_seconds=0.030, drafter_decide_seconds=0.005, expert_forward_seconds=0.025,
                            expert_decide_seconds=0.004, transport_seconds=0.006)
    breakdown = Breakdown()
    breakdown.add(stats)
    per_round = breakdown.per_round()
    assert per_round[OTHER] == pytest.approx(25.0)
    assert per_round[ROUND] == pytest.approx(50.0)
    assert sum(per_round[phase] for phase in PHASES) == pytest.approx(35.0)
    assert set(per_round) == {*PHASES, OTHER, ROUND}


def test_bench_serve_on_tiny_models_pairs_in_process_and_served_requests(tiny_model_dirs, tmp_path):
    drafter, expert = tiny_model_dirs
    env = child_env(OMP_NUM_THREADS="1")
    out = tmp_path / "serve.json"
    command = [sys.executable, "-m", "speccascade.cli", "bench", "serve", "--drafter", drafter, "--expert", expert,
               "--dtype", "fp32", "--prompts", "2", "--sampling", "greedy,unfiltered", "--max-new-tokens", "12",
               "--streams", "1,2", "--requests-per-stream", "2",
               "--load-streams", "2", "--load-requests", "4", "--load-prompt-tokens", "40",
               "--load-max-new-tokens", "8", "--pipeline", "on,off", "--grpc-port", str(free_port()),
               "--http-port", str(free_port()), "--cpu-lock-file", str(tmp_path / "cpu.lock"),
               "--json", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(Path(out).read_text())
    assert report["tiers"].endswith(f"passes take turns on {tmp_path / 'cpu.lock'}; tier calls over direct")
    paired = report["paired"]
    assert [p["sampling"] for p in paired] == ["greedy", "T=1.0, unfiltered"] * 2
    # fp32: served == in-process, greedy and sampled (unfiltered: whole rows over the direct channel, in pieces)
    assert all(p["identical"] for p in paired), paired
    assert "per-token served / in-process by sampling: greedy" in done.stdout
    assert all(r["token"] > 0 and r["ttft"] > 0 for r in report["paired_ratios"])
    # Page faults per round, of this process in-process and of the tiers served (vocabulary-sized
    # tensors are mapped afresh in the tiers, whose allocator returns large blocks at once).
    assert all(p["page_faults_per_round"][0] >= 0 and p["page_faults_per_round"][1] > 0 for p in paired)
    assert all(set(c["page_faults_per_round"]) == {"Drafter", "Expert"} for c in report["concurrency"])
    assert "page faults per round" in done.stdout
    # Each tier's forward thread was busy part of each concurrency run's wall time; with turns it
    # may wait for calls handed over (counted: turns and milliseconds, never negative).
    for c in report["concurrency"]:
        assert set(c["tier_activity"]) == {"Drafter", "Expert"}
        assert all(0 < a["busy_share"] < 1 and a["turn_gathers"] >= 0 and a["turn_gather_ms"] >= 0
                   for a in c["tier_activity"].values())
    assert "passes ran Drafter" in done.stdout
    # How every pass ran: on the CPU all eager (no graphs), and sessions kept their slots.
    for c in report["concurrency"]:
        for steps in c["tier_steps"].values():
            assert steps["eager"] > 0 and steps["graph"] == steps["wide"] == steps["uncaptured"] == 0
            assert steps["slot_evictions"] == 0
    assert "forward passes Drafter" in done.stdout and "no slot evictions" in done.stdout
    # Where the rounds' time went, from the requests' own stats: the served rounds spent time in Ray
    # and in the tiers' batchers, the in-process ones in neither.
    served, local = report["breakdown_ms_per_round"]["served"], report["breakdown_ms_per_round"]["in-process"]
    assert served["tier calls + (de)serialisation"] > 0 and served["expert forward"] > 0
    assert local["tier calls + (de)serialisation"] < served["tier calls + (de)serialisation"]
    assert local["drafter queue"] == local["expert queue"] == 0
    assert [(c["streams"], c["pipeline"]) for c in report["concurrency"]] == [(1, "on"), (1, "off"), (2, "on"),
                                                                               (2, "off")]
    # Each stream sent its two requests one after the other (a closed loop): more than one request's
    # tokens a stream, all finished.
    assert all(c["requests_per_stream"] == 2 and not c["failures"] and c["tokens"] > 12 * c["streams"]
               for c in report["concurrency"])
    assert "2 requests per stream" in done.stdout
    assert all(p["identical"] for p in report["pipelined"])  # pipelining on and off: the same output
    assert all(p["predrafts"]["off"][0] == 0 and p["predrafts"]["on"][0] > 0 for p in report["pipelined"])
    assert report["load"]["finished"] == report["load"]["requests"] == 4
    assert len(report["load"]["ttft_s"]) == 4 and report["load"]["baseline_ttft_s"]
    assert report["wire"]["greedy (ids + max q)"][1] > 0
    assert "identical outputs" in done.stdout + done.stderr


def test_an_unknown_sampling_mode_is_refused_naming_the_known_ones():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown sampling mode.*topk.*greedy, nucleus, unfiltered"):
        cli._samplings("greedy,topk")
    assert cli._samplings("unfiltered, greedy") == ["unfiltered", "greedy"]


def test_requests_per_stream_must_be_positive(capsys):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    assert parser.parse_args(["serve"]).requests_per_stream == 1
    assert parser.parse_args(["serve", "--requests-per-stream", "3"]).requests_per_stream == 3
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):  # argparse refuses it through the shared `positive_int`
            parser.parse_args(["serve", "--requests-per-stream", bad])
        assert f"expected a positive integer, got {bad!r}" in capsys.readouterr().err


def test_tiers_pinned_to_a_core_each_or_taking_turns():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    parse = lambda *extra: parser.parse_args(["serve", *extra])  # noqa: E731
    assert cli.tier_settings(parse()) == {"drafter": {}, "expert": {}}  # the config's settings
    pinned = cli.tier_settings(parse("--pin-tiers"))
    assert pinned["drafter"] == {"cpu_affinity": [0], "torch_threads": 1, "cpu_lock_file": None}
    assert pinned["expert"]["cpu_affinity"] == [1]
    assert cli.tier_settings(parse("--cpu-lock-file", "none")) == {"drafter": {"cpu_lock_file": None},
                                                                    "expert": {"cpu_lock_file": None}}
    assert cli.tier_settings(parse("--cpu-lock-file", "/tmp/t.lock"))["expert"] == {"cpu_lock_file": "/tmp/t.lock"}
    assert parse().tier_transport is None and parse("--tier-transport", "grpc").tier_transport == "grpc"
    with pytest.raises(SystemExit):
        parse("--tier-transport", "carrier-pigeon")


def test_a_stopped_bench_serve_still_reports_what_it_measured(tmp_path, monkeypatch, capsys):
    """`timeout` (SIGTERM) mid-run: the figures so far are printed and written, marked incomplete,
    with the streams that failed counted (a run of 50 minutes is not lost to its last phase), and
    before the cluster stops: Serve's shutdown can take longer than the grace `timeout --kill-after`
    gives, so figures written after it would die with the process."""
    figures_path = tmp_path / "figures.json"
    written_when_the_cluster_stopped = []

    def measure_all(args, report, stack):
        stack.callback(lambda: written_when_the_cluster_stopped.append(figures_path.exists()))
        report.phase = "4 concurrent streams, pipelining off"
        report.concurrency.append(Concurrency(4, 96, 2.0, 50.0, 1.5, 1.2, Breakdown(), "off", (0, 0),
                                              ["UNAVAILABLE: the expert tier has no healthy replica"]))
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, "measure_all", measure_all)
    monkeypatch.setattr(machine, "real_model_lock", contextlib.nullcontext)
    args = argparse.Namespace(tiny=False, shapes=None, shapes_dir=None, drafter=None, expert=None, rule="lossless",
                              alpha=0.0, block_size=5, max_new_tokens=64, dtype="fp32", json=figures_path)
    with pytest.raises(SystemExit) as stopped:
        cli.run(args)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not cli._exit_on_sigterm  # the handler is put back
    assert written_when_the_cluster_stopped == [True]
    figures = json.loads(figures_path.read_text())
    assert figures["complete"] is False and figures["phase"] == "4 concurrent streams, pipelining off"
    assert figures["concurrency"][0]["failures"] == ["UNAVAILABLE: the expert tier has no healthy replica"]
    printed = capsys.readouterr()
    assert "stopped before the end, while 4 concurrent streams, pipelining off" in printed.err
    assert "3/4" in printed.out and "1 failed with UNAVAILABLE" in printed.out


def test_paired_requests_are_kept_one_by_one(monkeypatch):
    """A bench stopped during the paired comparison keeps the pairs it finished (they are written
    into the report as they are measured, not returned at the end)."""
    class Source:
        def __init__(self, stop_at=None):
            self.calls, self.stop_at = 0, stop_at

        def stream(self, request):
            self.calls += 1
            if self.calls == self.stop_at:
                raise SystemExit(128 + signal.SIGTERM)
            return iter(())

    timed = []
    monkeypatch.setattr(measure, "Timed", lambda chunks: timed.append(chunks) or types.SimpleNamespace(
        timing=None, tokens=[1, 2], stats=types.SimpleNamespace(rounds=1)))
    monkeypatch.setattr(measure, "tier_stats", lambda handles: {})
    monkeypatch.setattr("speccascade.engine.request.GenerationRequest", lambda **options: options)
    breakdowns = {"in-process": types.SimpleNamespace(add=lambda stats: None),
                  "served": types.SimpleNamespace(add=lambda stats: None)}
    paired = []
    requests = [(f"task {i}", "greedy", {"messages": [{"role": "user", "content": "hi"}]}) for i in range(3)]
    with pytest.raises(SystemExit):
        measure.run_paired(Source(), Source(stop_at=3), requests, lambda: None, breakdowns, {}, paired)
    assert [p.task for p in paired] == ["task 0", "task 1"] and all(p.identical for p in paired)


def test_the_device_script_refuses_what_it_cannot_run(tmp_path):
    """`scripts/device_bench.sh` (one call on a lent GPU) stops at once, saying why, on an unknown
    argument or without its carry, and says so in the log it brings back."""
    script = Path(__file__).parents[2] / "scripts" / "device_bench.sh"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "CARRY": str(tmp_path / "missing.tar.xz"),
           "PYTHON": sys.executable, "SITE": str(tmp_path / "site")}
    wrong = subprocess.run(["bash", str(script), "--gpu"], env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "usage:" in wrong.stderr
    missing = subprocess.run(["bash", str(script), "--tiny"], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    log = (tmp_path / "out" / "log").read_text()
    assert "environment (tiny)" in log and f"no {tmp_path / 'missing.tar.xz'}: pack it first" in log
