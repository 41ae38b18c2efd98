"""Weighted fair queueing: a flood queues behind itself; weights split service; FIFO for contrast."""

from __future__ import annotations

import asyncio

import pytest
from speccascade.tenancy import AdmissionGate, FairQueue, Share


def served_order(fair: bool) -> list[str]:
    queue: FairQueue[str] = FairQueue(fair=fair)
    for i in range(8):
        queue.push(f"flood-{i}", Share("flood"))
    queue.push("quiet-0", Share("quiet"))
    return [queue.pop() for _ in range(len(queue))]


def test_a_quiet_flow_goes_ahead_of_a_floods_backlog():
    assert served_order(fair=True).index("quiet-0") <= 1
    assert served_order(fair=False).index("quiet-0") == 8  # FIFO: behind the whole flood


def test_weights_split_service_in_proportion():
    queue: FairQueue[str] = FairQueue()
    for i in range(60):
        queue.push("heavy", Share("heavy", weight=2.0))
        queue.push("light", Share("light", weight=1.0))
    first = [queue.pop() for _ in range(30)]
    assert first.count("heavy") == pytest.approx(20, abs=1)


def test_pop_with_first_keeps_a_flows_items_in_order_while_the_tags_interleave_the_flows():
    """An item pushed back after part of its work is retagged behind its flow's later items; with
    `first` it still goes on before them, and the flows keep alternating as their tags say."""
    queue: FairQueue[tuple[str, int]] = FairQueue()
    for item in [("a", 1), ("a", 2), ("b", 1)]:
        queue.push(item, Share(item[0]))
    served = []
    for _ in range(6):
        item = queue.pop(first=lambda item: item[1])
        served.append(item)
        if len(served) < 5:
            queue.push(item, Share(item[0]))  # part of its work done: back in line
    assert served[:4] == [("a", 1), ("b", 1), ("a", 1), ("b", 1)]
    assert [n for flow, n in served if flow == "a"] == sorted(n for flow, n in served if flow == "a")
    plain: FairQueue[tuple[str, int]] = FairQueue()
    for item in [("a", 1), ("a", 2)]:
        plain.push(item, Share("a"))
    plain.push(plain.pop(), Share("a"))
    assert plain.pop() == ("a", 2)  # without `first`: by tag, the pushed-back item after its flow's later one


def test_admission_gate_lets_waiters_in_fairly_and_skips_the_cancelled():
    async def scenario():
        gate = AdmissionGate(capacity=1)
        order = []
        release = asyncio.Event()

        async def holder():
            async with gate.slot(Share("flood")):
                await release.wait()

        async def request(name, flow):
            async with gate.slot(Share(flow)):
                order.append(name)

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(request(f"flood-{i}", "flood")) for i in range(4)]
        cancelled = asyncio.create_task(request("gone", "quiet"))
        await asyncio.sleep(0)
        cancelled.cancel()
        waiters.append(asyncio.create_task(request("quiet", "quiet")))
        await asyncio.sleep(0)
        assert gate.active == 1 and gate.waiting == 6
        release.set()
        await asyncio.gather(first, *waiters)
        assert gate.active == 0
        return order

    order = asyncio.run(scenario())
    assert "gone" not in order and len(order) == 5
    assert order.index("quiet") <= 1
