"""Continuous batching of tier calls inside a replica, with chunked prefill.

While the model runs one batch, new calls queue up; as soon as it is free, everything queued (up to
`max_batch_size`) runs as the next batch. A lone session's call runs the moment it arrives at an
idle model, and under load batches form by themselves from what queued during the previous pass.
On cores shared with the other tier (`turns`), the batch forms once the replica has the cores'
turn, and may wait a bounded moment for the calls the other tier's turn has just answered
(`_take_turn`, `_gather`); never for a lone session's.

A call whose context the model has not yet seen (a new prompt, or a session that lost its cache)
would make its batch's pass long for everyone in it, and, batched, make every row as long as the
longest. Such calls (more than `Prefill.threshold` context tokens uncached) queue apart and are
prefilled in passes of their own, one after each batch, each pass at most `Prefill.budget` tokens
(`prefill_chunk_tokens`) a prompt, and as many such chunks as prompts wait, up to `Prefill.prompts`
(`prefill_pass_prompts`), shared in fair order (`Prefill.run`), never more prompts than a batch
holds (`max_batch_size`): a running stream's next step waits for at most one such pass, and a
burst of new prompts is prefilled several to a pass rather than one chunk of one prompt per batch.
While no stream is decoding on the replica (every session it serves waits for its prefill:
`Prefill.live`), nobody's step waits behind a pass, and a pass's whole budget (`Prefill.prompts`
chunks) is shared evenly by the prompts waiting: a lone prompt is prefilled in a few large passes
rather than many small ones, each of which reads every weight.
Once its context is cached, a call joins the batches like any other.

Which queued calls make the next batch (and which prompt gets the next chunk) is decided by
weighted fair queueing across tenants (`tenancy.FairQueue`; each call says whose share it is), so a
tenant flooding the replica only queues behind its own work. For prefill it is fair per chunk: a
tenant's long prompt gives way after each chunk while another tenant's prompt waits
(`_requeue_for_other_tenants`), and a tenant's own prompts are fed in the order they came. Calls
of a cancelled caller, or of a session that ended (`ended`), are dropped before they run.

A session has at most one live call: a new call for a session (`session_of`) supersedes one still
queued or running for it (a router's retry after a timeout, or a draft that replaces a pre-draft
the verdict made useless), whose caller has stopped waiting for it. The older call fails with
`SupersededError` — before it runs if it is still queued; a running draft stops at its next step —
so no batch ever holds two calls of one session, which would advance one cache twice.

Batches run on one worker thread; other work that must not overlap a forward pass (freeing a
session's cache) runs on the same thread between batches (`run_between_batches`). A pass's error
goes to its callers; a fault in the batcher's own work between passes (a bug) fails every call it
holds, with that error, is logged, and the worker goes on with the calls that come next: no caller
is left waiting.

`progress()` says whether the model is getting through its work: the router asks when a call has
waited longer than its timeout, to tell a replica that is only busy (the call keeps its place in the
queue) from one that is stuck (the call is retried elsewhere).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from ..tenancy.fairness import DEFAULT_SHARE, FairQueue, Share

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
T = TypeVar("T")


class SupersededError(RuntimeError):
    """A call replaced by a newer call for the same session before it finished."""


class Turns(Protocol):
    """The shared cores' turn (`cpu_turns.CpuTurns`): `try_acquire` and `release` are quick (the
    event loop calls them), `acquire` waits (the forward thread calls it); it carries the sessions
    whose calls the last holder answered."""

    def acquire(self) -> Sequence[str]: ...

    def try_acquire(self) -> Sequence[str] | None: ...

    def release(self, handoff: Sequence[str] = ()) -> None: ...


# How long a replica that took the turn waits for the calls handed over to it (see `_gather`): a
# share of its own recent batch time, so the wait stays small against the passes it fills, and at
# most GATHER_MAX_S.
GATHER_SHARE = 0.25
GATHER_MAX_S = 0.05


@dataclass(frozen=True)
class Progress:
    """A replica's forward thread as seen from outside."""

    queued: int  # calls waiting for a batch or for their prefill
    running: bool  # a pass is on the forward thread now
    still_s: float  # seconds since a pass last started or ended

    def moving(self, window_s: float) -> bool:
        """Whether a pass started or ended within the last `window_s` seconds."""
        return self.still_s < window_s


@dataclass(frozen=True)
class Prefill(Generic[Item]):
    """How a replica prefills long contexts apart from its batches."""

    pending: Callable[[Item], int]  # context tokens the call's step would run uncached (an estimate, event loop)
    # Forward thread: one pass feeding up to `tokens` context tokens, shared by the calls in order, at
    # most `share` to each: run(calls, tokens, share); for each call, True once its context is cached.
    run: Callable[[list[Item], int, int], list[bool]]
    threshold: int  # calls with more pending tokens than this are prefilled first
    budget: int  # context tokens per prompt in a pass while streams decode (`prefill_chunk_tokens`)
    prompts: int = 1  # a pass feeds up to `budget` tokens to each of this many waiting prompts
    # The sessions the replica serves now, not ended (event loop). While every one of them is
    # waiting for its prefill, no stream's step waits behind a pass, and a pass's whole budget
    # (`budget` x `prompts`) is shared by the prompts waiting, all of it to a lone one. None: assume
    # some stream is always decoding.
    live: Callable[[], Iterable[Hashable]] | None = None


@dataclass(eq=False)
class Queued(Generic[Item]):
    item: Item
    future: asyncio.Future
    share: Share
    enqueued_at: float = field(default_factory=time.perf_counter)
    prefill_s: float = 0.0  # forward-pass seconds spent on its prefill chunks
    prefilling: bool = False  # waiting for its context to be prefilled


def _arrival(queued: Queued) -> float:
    """A prompt's place among its tenant's; one whose caller left is last, so it never takes a live
    prompt's turn (it is dropped when its own comes)."""
    return math.inf if queued.future.done() else queued.enqueued_at


class ContinuousBatcher(Generic[Item, Result]):
    def __init__(self, run_batch: Callable[[list[Queued]], list[Result | Exception]], *, max_batch_size: int,
                 name: str, prefill: Prefill | None = None,
                 ended: Callable[[Item], Exception | None] = lambda item: None,
                 session_of: Callable[[Item], Hashable] | None = None, turns: Turns | None = None,
                 holds: Callable[[Hashable], bool] = lambda session: False):
        """`run_batch` is blocking (a forward pass); it runs on one worker thread, so the event loop
        keeps accepting calls meanwhile. It returns one result per queued call, or an exception for
        a call that failed alone (that caller gets it raised; the others their results).
        `ended(item)` is the error of a call whose session has ended (None while it lives);
        `session_of(item)` names the call's session (None: every call is its own). With `turns`,
        the replica takes the shared cores' turn before it forms a batch and holds it until the
        batch and the prefill pass after it are done (see `_run_forever`); `holds(session)` says
        whether this replica serves the session (a session handed over on the turn that it does
        not hold is not waited for)."""
        self.run_batch = run_batch
        self.name = name
        self.max_batch_size = max_batch_size
        self.prefill = prefill
        self.ended = ended
        self.session_of = session_of
        self.turns = turns
        self.holds = holds
        self.gathers = 0  # turns on which the replica waited for calls handed over to it
        self.gather_s = 0.0  # seconds it waited, all told
        self._batch_s = 0.0  # a moving average of its batches' time (the gather's bound)
        self._latest: dict[Hashable, Queued] = {}  # each session's newest call, until it finishes
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-forward")
        self._ready: FairQueue[Queued] = FairQueue()
        self._prefilling: FairQueue[Queued] = FairQueue()
        self._chunking: list[Queued] = []  # the calls whose prompts the next prefill pass feeds
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._running = False
        self._moved_at = time.monotonic()  # a pass last started or ended

    def progress(self) -> Progress:
        return Progress(queued=len(self._ready) + len(self._prefilling) + len(self._chunking), running=self._running,
                        still_s=time.monotonic() - self._moved_at)

    async def _on_thread(self, fn: Callable[..., T], *args) -> T:
        """Run one pass on the forward thread, noting when it starts and ends."""
        self._running, self._moved_at = True, time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        finally:
            self._running, self._moved_at = False, time.monotonic()

    async def submit(self, item: Item, share: Share = DEFAULT_SHARE) -> tuple[Result, Queued]:
        """Queue a call; its result, with its queue entry (when it was queued, its prefill time)."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run_forever())
        queued = Queued(item, loop.create_future(), share)
        if self.session_of is not None:
            key = self.session_of(item)
            older = self._latest.get(key)
            if older is not None and not older.future.done():
                older.future.set_exception(SupersededError(f"call superseded by a newer call for session {key!r}"))
                older.future.exception()  # retrieved: nobody awaits a superseded call any more
            self._latest[key] = queued
            queued.future.add_done_callback(lambda _, key=key: self._forget(key, queued))
        if self.prefill is not None and self.prefill.pending(item) > self.prefill.threshold:
            queued.prefilling = True
            self._prefilling.push(queued, share)
        else:
            self._ready.push(queued, share)
        self._arrived.set()
        return await queued.future, queued

    def sessions_waiting(self) -> frozenset[Hashable]:
        """The sessions with a call queued or running (`session_of`), from any thread: a snapshot
        of a dict the event loop updates (its keys are strings, so copying it runs no Python code
        and the GIL keeps it whole)."""
        return frozenset(self._latest)

    def _forget(self, key: Hashable, queued: Queued) -> None:
        if self._latest.get(key) is queued:
            del self._latest[key]

    def wake(self) -> None:
        """Look at the queues again now (a session ended: its queued calls are dropped)."""
        if self._arrived is not None:
            self._arrived.set()

    async def run_between_batches(self, fn: Callable[..., T], *args) -> T:
        """Run blocking `fn(*args)` on the batches' thread: after the pass in progress, never
        during one."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _alive(self, queued: Queued) -> bool:
        """False (and the caller told so) for a call whose caller left or whose session ended."""
        if queued.future.done():
            return False
        error = self.ended(queued.item)
        if error is not None:
            queued.future.set_exception(error)
            return False
        return True

    def _take_batch(self, taken: list[Queued]) -> None:
        """Fill `taken` with the next batch. A call is in `taken` before it is looked at, so a fault
        in looking (`_run_forever`) still reaches its caller."""
        while self._ready and len(taken) < self.max_batch_size:
            taken.append(self._ready.pop())
            if not self._alive(taken[-1]):
                taken.pop()

    def _next_prefill(self) -> tuple[list[Queued], int, int]:
        """The calls the next prefill pass feeds, its budget and each call's most: those it fed
        before, still alive, then more in fair order while the budget has room. While a stream
        decodes (its next step waits for this pass), the budget is a chunk per waiting prompt, up to
        `Prefill.prompts` chunks, and a chunk the most for each; while none does, `Prefill.prompts`
        chunks, shared evenly by the prompts waiting (a lone prompt gets them all: fewer, larger
        passes; a burst as many as while streams decode: every prompt cached by the same pass)."""
        self._chunking = [queued for queued in self._chunking if self._alive(queued)]
        if not self._chunking and not self._prefilling:  # the usual case: no session is asked about
            return self._chunking, 0, 0
        if self._chunking and self._prefilling:
            self._requeue_for_other_tenants()
        chunk = self.prefill.budget
        waiting = max(len(self._chunking) + len(self._prefilling), 1)
        if self._decoding():
            budget, share = chunk * min(waiting, self.prefill.prompts), chunk
        else:
            budget = chunk * self.prefill.prompts
            share = max(chunk, -(-budget // waiting))
        tokens = sum(min(self.prefill.pending(queued.item), share) for queued in self._chunking)
        # A pass is a batch too: at most max_batch_size sessions (the static backend's slots hold that many).
        while self._prefilling and tokens < budget and len(self._chunking) < self.max_batch_size:
            # In hand before it is looked at, as in _take_batch; each tenant's prompts in the order they came.
            self._chunking.append(self._prefilling.pop(first=_arrival))
            if self._alive(self._chunking[-1]):
                tokens += min(self.prefill.pending(self._chunking[-1].item), share)
            else:
                self._chunking.pop()
        return self._chunking, budget, share

    def _requeue_for_other_tenants(self) -> None:
        """Fairness across tenants per chunk, not per prompt: while another tenant's prompt waits, the
        prompts fed before go back to the fair queue, their tenants charged a chunk again, rather
        than keep the pass's budget until they are cached (a long prompt would hold a short one of
        another tenant back for all its chunks). Within a tenant, prompts are still fed in the order
        they came (`_arrival`): each cached as soon as its tenant's share allows, not all of them in
        turn. While only their own tenants' prompts wait, nothing changes and they stay."""
        feeding = {queued.share.flow for queued in self._chunking}
        if all(queued.share.flow in feeding or queued.future.done() for queued in self._prefilling):
            return
        for queued in self._chunking:
            self._prefilling.push(queued, queued.share)
        self._chunking = []

    def _decoding(self) -> bool:
        """Whether some session on the replica is past its prefill (or might be: `Prefill.live` not
        given), so that its next step would wait behind a prefill pass."""
        if self.prefill.live is None or self.session_of is None:
            return True
        for key in self.prefill.live():
            latest = self._latest.get(key)
            if latest is None or not latest.prefilling:
                return True
        return False

    def _has_work(self) -> bool:
        return bool(self._ready) or (self.prefill is not None and bool(self._prefilling or self._chunking))

    async def _run_forever(self) -> None:
        while True:
            if not self._has_work():
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch: list[Queued] = []
            try:
                if self.turns is not None:
                    await self._take_turn()
                self._take_batch(batch)
                prefilling, budget, share = self._next_prefill() if self.prefill is not None else ([], 0, 0)
                if batch:
                    await self._run(batch)
                if prefilling:
                    await self._prefill(list(prefilling), budget, share)
            except Exception as error:  # the batcher's own bookkeeping failed (a pass's error goes to its callers)
                log.exception("%s batcher failed between passes; failing the %d call(s) it held",
                              self.name, len(batch) + self.progress().queued)
                self._release_turn_after_thread()
                self._fail_all(batch, error)
                continue
            except BaseException:
                self._release_turn_after_thread()
                raise
            if self.turns is not None:
                try:
                    self.turns.release(self._answered(batch))
                except Exception:  # the turn is given back before the note is written (cpu_turns)
                    log.exception("%s could not hand the turn over with its note", self.name)

    def _release_turn_after_thread(self) -> None:
        """Give the turn back once the forward thread is done: it may still be in this turn's pass, or
        taking the turn (a release without the turn held does nothing)."""
        if self.turns is not None:
            self._thread.submit(self.turns.release, ())

    def _fail_all(self, batch: list[Queued], error: Exception) -> None:
        """Fail every call the batcher holds with `error`: the batch it had taken and all that queued.
        A fault outside the passes is a bug whose next occurrence may be the same call's, so no call
        is kept for a retry that could fail forever; each caller hears of it and the worker goes on
        with the calls that come next."""
        held = list(batch) + self._chunking
        self._chunking = []
        for queue in (self._ready, self._prefilling):
            while queue:
                held.append(queue.pop())
        fail_each(held, error)

    async def _take_turn(self) -> None:
        """On cores shared with another tier, the batch forms once this replica has the turn: the
        calls that arrived while the other tier's passes ran join it, instead of waiting for a whole
        further batch (a draft batch is gamma passes) behind one formed before the wait; and the
        calls the other tier's turn just answered, on their way here, are awaited a moment
        (`_gather`). Batches grow with the load and the sessions fall into step: a tier's batch
        goes on to the other tier together."""
        handed = self.turns.try_acquire()  # a free turn (the usual case at one stream): no thread hop
        if handed is None:
            handed = await self._on_thread(self.turns.acquire)
        await self._gather(handed)

    def _answered(self, batch: list[Queued]) -> list[str]:
        """The sessions whose calls in `batch` got their results."""
        if self.session_of is None:
            return []
        return [str(self.session_of(queued.item)) for queued in batch
                if queued.future.done() and not queued.future.cancelled() and queued.future.exception() is None]

    async def _gather(self, handed: Sequence[str]) -> None:
        """Wait, a moment at most, until every session handed over with the turn that this replica
        holds has its next call queued here (or has ended). Those calls left the other tier as it
        gave the turn back and take a router hop (a few milliseconds) to arrive; a batch formed
        without them would leave them a whole batch behind, the sessions split into groups that
        take turns at half the batch size. A lone session's call is queued before the replica asks
        for the turn: it never waits. The wait is bounded by a share of the replica's own recent
        batch time, and counted (`gathers`, `gather_s`)."""
        if not handed or self.session_of is None or self._batch_s <= 0.0:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + min(GATHER_MAX_S, GATHER_SHARE * self._batch_s)
        waited = False
        while any(key not in self._latest and self.holds(key) for key in handed):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waited = True
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        if waited:
            self.gathers += 1
            self.gather_s += loop.time() - started

    async def _prefill(self, calls: list[Queued], budget: int, share: int) -> None:
        started = time.perf_counter()
        try:
            done = await self._on_thread(self.prefill.run, [queued.item for queued in calls], budget, share)
        except Exception as error:  # the pass's calls fail (the caches of a failed pass are emptied)
            self._chunking = [queued for queued in self._chunking if queued not in calls]
            fail_each(calls, error)
            return
        elapsed = time.perf_counter() - started
        for queued, cached in zip(calls, done):
            queued.prefill_s += elapsed
            if cached:
                self._chunking.remove(queued)
                queued.prefilling = False
                self._ready.push(queued, queued.share)

    async def _run(self, batch: list[Queued]) -> None:
        started = time.perf_counter()
        try:
            results = await self._on_thread(self.run_batch, batch)
            if len(results) != len(batch):  # which result is whose is unknown: none is given out
                raise RuntimeError(f"{self.name} pass returned {len(results)} results for a batch of {len(batch)}")
        except Exception as error:  # the whole batch failed: every caller gets the error
            fail_each(batch, error)
            return
        elapsed = time.perf_counter() - started
        self._batch_s = elapsed if self._batch_s == 0.0 else 0.8 * self._batch_s + 0.2 * elapsed
        for queued, result in zip(batch, results):
            if queued.future.done():
                continue
            if isinstance(result, Exception):
                queued.future.set_exception(result)
            else:
                queued.future.set_result(result)


def fail_each(calls: Iterable[Queued], error: Exception) -> None:
    """Fail every call not yet answered with `error`, each caller with an exception object of its
    own: an exception collects the frames it is raised through in its traceback, so one object
    re-raised by many callers grows with each of them and mixes their tracebacks. An exception that
    cannot be copied as it is (its constructor takes other arguments than it keeps, or builds its
    message from them) is shared."""
    for queued in calls:
        if not queued.future.done():
            queued.future.set_exception(_own_copy(error))


def _own_copy(error: Exception) -> Exception:
    try:
        clone = copy.copy(error)  # the class called again with `error.args`, and its __dict__ copied
    except Exception:
        return error
    if type(clone) is not type(error) or clone.args != error.args or str(clone) != str(error):
        return error
    if isinstance(getattr(error, "__notes__", None), list):
        clone.__notes__ = list(error.__notes__)  # a note added to one caller's copy is its own
    clone.__cause__, clone.__suppress_context__ = error.__cause__, error.__suppress_context__
    clone.__context__ = error.__context__
    return clone.with_traceback(error.__traceback__)
