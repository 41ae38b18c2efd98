"""Weighted fair queueing across tenants, for the router's admission and the tiers' batch forming.

Start-time fair queueing (Goyal, Vin and Cheng, SIGCOMM 1996): an item of flow f (a tenant) with
cost c arriving at virtual time V gets the start tag S = max(V, F_f) and moves the flow's finish
tag to F_f = S + c / w_f; items are served in order of start tag, and V becomes the tag of the item
served. A flow that sends eight times more work than its share only ever queues behind itself: a
quiet flow's next item is tagged near V and goes ahead of the flood's backlog. With `fair=False`
the queue is plain FIFO (for comparison).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True)
class Share:
    """Whose work an item is, and the weight of that tenant's share."""

    flow: str = ""
    weight: float = 1.0


DEFAULT_SHARE = Share()


@dataclass(frozen=True)
class Tag:
    flow: str
    start: float
    finish: float
    order: int


@dataclass
class FairQueue(Generic[Item]):
    fair: bool = True
    _heap: list = field(default_factory=list)
    _virtual_time: float = 0.0
    _finish: dict[str, float] = field(default_factory=dict)
    _sequence: itertools.count = field(default_factory=itertools.count)

    def tag(self, share: Share = DEFAULT_SHARE, cost: float = 1.0) -> Tag:
        """Charge `cost` to the share's flow: the tag its item is served by."""
        order = next(self._sequence)
        if not self.fair:
            return Tag(share.flow, float(order), float(order), order)
        start = max(self._virtual_time, self._finish.get(share.flow, 0.0))
        finish = self._finish[share.flow] = start + cost / share.weight
        return Tag(share.flow, start, finish, order)

    def push(self, item: Item, share: Share = DEFAULT_SHARE, cost: float = 1.0) -> Tag:
        tag = self.tag(share, cost)
        heapq.heappush(self._heap, (tag.start, tag.order, tag.flow, item))
        return tag

    def serve(self, tag: Tag) -> None:
        """An item tagged `tag` is being served (popped, or admitted without waiting)."""
        if self.fair:
            self._virtual_time = max(self._virtual_time, tag.start)

    def pop(self, first: Callable[[Item], float] | None = None) -> Item:
        """The item with the lowest start tag. With `first`, that tag serves its flow's item that
        comes first by `first(item)` instead (the tags stay where they are, the flow's items trade
        places under them): a flow's items keep that order among themselves however they were
        tagged, e.g. an item pushed back after part of its work goes on before its flow's later ones."""
        start, order, flow, item = heapq.heappop(self._heap)
        if self.fair:
            self._virtual_time = start
        if first is not None:
            i = min((i for i, entry in enumerate(self._heap) if entry[2] == flow),
                    key=lambda i: first(self._heap[i][3]), default=None)
            if i is not None and first(self._heap[i][3]) < first(item):
                self._heap[i], item = (*self._heap[i][:3], item), self._heap[i][3]
        return item

    def withdraw(self, tag: Tag) -> None:
        """An item that leaves unserved gives back its flow's charge, if nothing was charged since."""
        if self.fair and self._finish.get(tag.flow) == tag.finish:
            self._finish[tag.flow] = tag.start

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Item]:
        """The items queued, in no particular order."""
        return (entry[3] for entry in self._heap)


class AdmissionGate:
    """At most `capacity` holders at once; waiters are let in by weighted fair queueing."""

    def __init__(self, capacity: int, *, fair: bool = True):
        self.capacity = capacity
        self.active = 0
        self._waiting: FairQueue[asyncio.Future] = FairQueue(fair=fair)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self, share: Share = DEFAULT_SHARE, cost: float = 1.0) -> AsyncIterator[None]:
        if self.active < self.capacity and not self._waiting:
            self.active += 1
            self._waiting.serve(self._waiting.tag(share, cost))  # served at once, but charged all the same
        else:
            granted = asyncio.get_running_loop().create_future()
            tag = self._waiting.push(granted, share, cost)
            try:
                await granted  # the releasing holder passes its slot on (active stays counted)
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release()  # granted just as we were cancelled: pass it on
                else:
                    self._waiting.withdraw(tag)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            waiter = self._waiting.pop()
            if not waiter.done():  # a cancelled waiter is skipped
                waiter.set_result(None)
                return
        self.active -= 1
