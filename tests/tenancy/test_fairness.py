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
