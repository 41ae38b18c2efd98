"""The router's cumulative counters on top of its drained per-window counters."""

from __future__ import annotations

from speccascade.autoscale import signals as sig
from speccascade.engine.stats import COUNTER
from speccascade.serving.metrics import WindowCounters


def test_totals_keep_growing_across_drained_windows():
    window = WindowCounters()
    totals = sig.CumulativeCounters(sig.ROUTER_COUNTERS)
    window.rounds += 3
    window.drafted += 15
    window.skippable_rounds += 3
    first = totals.including(window.as_dict())
    assert (first[COUNTER.rounds], first[COUNTER.drafted], first[COUNTER.skippable_rounds]) == (3, 15, 3)
    totals.absorb(window.take().as_dict())  # someone drains the window (Router.take_window)
    window.rounds += 2
    window.deferred += 4
    second = totals.including(window.as_dict())
    assert second[COUNTER.rounds] == 5 and second[COUNTER.deferred] == 4 and second[COUNTER.drafted] == 15
    assert "window_seconds" not in second  # only counters are reported
    assert set(sig.ROUTER_COUNTERS) <= set(WindowCounters().as_dict())
