"""The router's cumulative counters on top of its drained per-window counters."""

from __future__ import annotations

from speccascade.autoscale import signals as sig
from speccascade.tiers.metrics import WindowCounters


def test_totals_keep_growing_across_drained_windows():
    window = WindowCounters()
    totals = sig.CumulativeCounters(sig.ROUTER_COUNTERS)
    window.rounds += 3
    window.drafted += 15
    window.skippable_rounds += 3
    first = totals.including(window.as_dict())
    assert (first[sig.ROUNDS], first[sig.DRAFTED], first[sig.SKIPPABLE_ROUNDS]) == (3, 15, 3)
    totals.absorb(window.take().as_dict())  # someone drains the window (Router.take_window)
    window.rounds += 2
    window.deferred += 4
    second = totals.including(window.as_dict())
    assert second[sig.ROUNDS] == 5 and second[sig.DEFERRED] == 4 and second[sig.DRAFTED] == 15
    assert "window_seconds" not in second  # only counters are reported
    assert set(sig.ROUTER_COUNTERS) <= set(WindowCounters().as_dict())
