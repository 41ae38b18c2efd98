"""`speccascade status` formatting."""

from __future__ import annotations

from speccascade.commands.status import format_status

from ..autoscale.test_policy import Cluster, Traffic


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


def test_status_sums_the_tenant_load_of_the_router_replicas():
    from speccascade.commands.status import format_tenant_load

    assert "no router replica" in format_tenant_load({"active": {}, "waiting": 0, "decoding": 0, "replicas": 0})
    text = format_tenant_load({"active": {"acme": 3, "quiet": 1}, "waiting": 2, "decoding": 2, "replicas": 2})
    assert "acme 3, quiet 1" in text and "2 waiting" in text and "2 router replicas" in text
