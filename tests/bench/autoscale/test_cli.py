"""The autoscale benchmark's trace loading and headline."""

from __future__ import annotations

import json

import pytest
from speccascade.bench.autoscale.cli import headline, load_trace


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
