"""Continuous batching of scoring steps inside a tier replica.

While the model runs one batch, new requests queue up; as soon as it is free, everything queued
(up to `max_batch_size`) runs as the next batch. Only when the model was idle does the first
request wait up to `wait_s` for company. (`serve.batch` forms the next batch while the previous
one still runs, after its short timeout, so a busy replica kept getting batches of one.)

Which queued requests make the next batch is decided by weighted fair queueing across tenants
(`tenancy.FairQueue`; each request says whose share it is), so a tenant flooding the replica only
queues behind its own work. Requests of one share are taken in arrival order.

Batches run on one worker thread; other work that must not overlap a forward pass (freeing a
session's cache) runs on the same thread between batches (`run_between_batches`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from ..tenancy.fairness import DEFAULT_SHARE, FairQueue, Share

Item = TypeVar("Item")
Result = TypeVar("Result")
T = TypeVar("T")


class ContinuousBatcher(Generic[Item, Result]):
    def __init__(self, run_batch: Callable[[list[Item]], list[Result | Exception]], *, max_batch_size: int,
                 wait_s: float, name: str):
        """`run_batch` is blocking (a forward pass); it runs on one worker thread, so the event loop
        keeps accepting requests meanwhile. It returns one result per item, or an exception for an
        item that failed alone (that caller gets it raised; the others their results)."""
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-forward")
        self._pending: FairQueue[tuple[Item, asyncio.Future]] = FairQueue()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Item, share: Share = DEFAULT_SHARE) -> Result:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run_forever())
        future = loop.create_future()
        self._pending.push((item, future), share)
        self._arrived.set()
        return await future

    async def run_between_batches(self, fn: Callable[..., T], *args) -> T:
        """Run blocking `fn(*args)` on the batches' thread: after the batch in progress, never
        during one."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        idle = True
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                idle = True
            if idle and self.wait_s and len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            taken = []
            while self._pending and len(taken) < self.max_batch_size:
                item, future = self._pending.pop()
                if not future.done():  # drop cancelled callers
                    taken.append((item, future))
            idle = False
            if not taken:
                continue
            try:
                results = await loop.run_in_executor(self._thread, self.run_batch, [item for item, _ in taken])
            except Exception as error:  # the whole batch failed: every caller gets the error
                for _, future in taken:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(taken, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
