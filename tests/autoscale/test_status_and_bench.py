"""`speccascade status` formatting and the autoscale benchmark's trace loading and headline."""

from __future__ import annotations

import json

import pytest

from speccascade.bench.autoscale import headline, load_trace
from speccascade.commands.status import format_status

from .test_policy import Cluster, Traffic


def test_status_shows_each_tier_and_the_inputs_of_the_last_decision():
    cluster = Cluster(initial={"Router": 1, "Drafter": 2, "Expert": 1})
    cluster.run(Traffic(tokens_per_s=60.0, deferral=0.4), 40)
    record = cluster.controller.last_record
    text = format_status("speccascade", {"Router": 1, "Drafter": 2, "Expert": 1}, record, now=record["time"] + 2)
    assert "last decision 2.0s ago" in text
    expert_line = next(line for line in text.splitlines() if line.strip().startswith("expert"))
    tier = record["tiers"]["expert"]
    assert f"{tier['target_replicas']:>6}" in expert_line and f"{tier['desired_replicas']:.2f}" in expert_line
    assert "200.0ms" in expert_line  # the measured seconds per verify call
    assert "deferral rate δ 0.400" in text
    assert "expert calls/s E" in text


def test_status_without_a_decision_says_so():
    text = format_status("speccascade", {"Drafter": 1, "Expert": 2}, None, now=0.0)
    assert "no deferral-aware autoscaling decision" in text and "Expert" in text


def test_recorded_trace_is_stretched_and_rescaled(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"bin_s": 10, "request_rate": [0.1, 0.1, 0.4, 0.1], "deferral": [0.1, 0.2, 0.3, 0.4]}))
    trace = load_trace(path, peak_request_rate=1.0, stretch=6)
    assert trace.bin_s == 60
    assert max(trace.request_rate) == pytest.approx(1.0)
    assert trace.deferral == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="lacks key 'deferral'"):
        (tmp_path / "bad.json").write_text(json.dumps({"bin_s": 10, "request_rate": [1]}))
        load_trace(tmp_path / "bad.json", peak_request_rate=1.0, stretch=1)


def test_headline_pairs_each_queue_point_with_the_cheapest_deferral_point_no_slower():
    def row(policy, knob, replica_s, p95):
        return {"policy": policy, "label": f"{policy} {knob}", "knob": knob, "expert_replica_s": replica_s,
                "expert_wait_p95_s": p95}

    results = [row("deferral", "0.6", 100.0, 0.01), row("deferral", "0.8", 80.0, 0.2),
               row("queue", "1", 90.0, 0.3), row("queue", "0.5", 95.0, 0.005)]
    rows = {r["queue"]: r for r in headline(results)}
    assert rows["queue 1"]["deferral"] == "deferral 0.8"
    assert rows["queue 1"]["expert_saving"] == pytest.approx(1 - 80 / 90)
    assert rows["queue 0.5"]["deferral"] is None  # nothing as fast: no claim


def test_status_sums_the_tenant_load_of_the_router_replicas():
    from speccascade.commands.status import format_tenant_load

    assert "no router replica" in format_tenant_load({"active": {}, "waiting": 0, "decoding": 0, "replicas": 0})
    text = format_tenant_load({"active": {"acme": 3, "quiet": 1}, "waiting": 2, "decoding": 2, "replicas": 2})
    assert "acme 3, quiet 1" in text and "2 waiting" in text and "2 router replicas" in text
