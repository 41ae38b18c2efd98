"""Many requests through one loaded pair at once, for evaluation (`bench tradeoff --batch N`).

Each request runs the one decoding loop (`TextGeneration.stream_rounds`) with roles of its own.
Their calls do not run one by one: a call waits until every running request has made its call
(or ended), then each model's calls go as one batch through `engine.jobs`, the functions a tier
runs on its forward pass. Every draw is keyed by (request seed, position, purpose), so each output
is the one decoding it alone gives, whatever shares its passes. At most `concurrency` requests run
at once; the next starts as one ends. A call whose context the model has not cached past a few
tokens (a new prompt) is prefilled alone first, so one prompt never pads a whole batch.

A request's latency as a user alone would see it cannot be read off the clock here (its passes
were shared); it is modelled. Its prompt prefills ran alone and are measured; every other call is
charged its single-stream cost by size (`CallCosts`, measured on the same pair and sampling at the
start): a draft call of g tokens whose first pass feeds n tokens, a verify feeding n tokens.
`bench tradeoff --latency-sample K` checks the model against requests decoded alone.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from ..options import Pipeline
from .backends import ModelBackend, ScoreJob
from .blocks import EMPTY_BLOCK, CallReport, DraftPayload
from .generation import GenerationResult
from .jobs import (
    PREFILL_THRESHOLD,
    DraftJob,
    VerifyJob,
    context_to_cache,
    draft_blocks,
    scoring_job,
    verify_blocks_on,
)
from .request import GenerationRequest

DRAFTER, EXPERT = "drafter", "expert"


@dataclass
class CallLog:
    """What one request's calls were, for its latency model."""

    prefill_s: float = 0.0  # its prefills, each run alone: measured
    prefill_tokens: int = 0
    drafts: list[tuple[int, int]] = field(default_factory=list)  # (gamma, tokens its first pass fed)
    verifies: list[int] = field(default_factory=list)  # tokens each verify pass fed


@dataclass(frozen=True)
class BatchedGeneration:
    """One request's outcome: its result (or the error that ended it alone) and its calls."""

    result: GenerationResult | None
    error: BaseException | None
    calls: CallLog


@dataclass
class BatchStats:
    """How the run shared its passes: batches per model and the calls they carried."""

    wall_s: float = 0.0
    batches: dict[str, int] = field(default_factory=lambda: {DRAFTER: 0, EXPERT: 0})
    calls: dict[str, int] = field(default_factory=lambda: {DRAFTER: 0, EXPERT: 0})
    prefills: int = 0
    prefill_s: float = 0.0

    def calls_per_batch(self, model: str) -> float:
        return self.calls[model] / self.batches[model] if self.batches[model] else 0.0

    def as_dict(self) -> dict:
        return {"wall_s": self.wall_s, "batches": dict(self.batches), "calls": dict(self.calls),
                "calls_per_batch": {m: self.calls_per_batch(m) for m in self.batches},
                "prefills": self.prefills, "prefill_s": self.prefill_s}


@dataclass
class _Call:
    model: str
    job: DraftJob | VerifyJob
    log: CallLog
    future: asyncio.Future


class _Batches:
    """The calls of the running requests, run model by model once every running request waits."""

    def __init__(self, backends: dict[str, ModelBackend]):
        self.backends = backends
        self.waiting: dict[str, list[_Call]] = {DRAFTER: [], EXPERT: []}
        self.live = 0
        self.ready = asyncio.Event()
        self.stats = BatchStats()

    async def call(self, model: str, job, log: CallLog):
        call = _Call(model, job, log, asyncio.get_running_loop().create_future())
        self.waiting[model].append(call)
        self.check()
        return await call.future

    def check(self) -> None:
        if sum(map(len, self.waiting.values())) >= self.live:
            self.ready.set()

    def all_waiting(self) -> bool:
        waiting = sum(map(len, self.waiting.values()))
        return waiting > 0 and waiting >= self.live

    def run_waiting(self) -> None:
        for model, calls in self.waiting.items():
            self.waiting[model] = []
            if calls:
                self._run(model, calls)

    def _run(self, model: str, calls: list[_Call]) -> None:
        backend = self.backends[model]
        for call in calls:
            context = context_to_cache(call.job)
            session = call.job.session
            if len(context) - backend.kept_length(session, context, len(context)) > PREFILL_THRESHOLD:
                started = time.perf_counter()
                try:
                    backend.score([ScoreJob(session, context, len(context))])
                except Exception as error:  # noqa: BLE001 - the request fails alone
                    call.future.set_exception(error)
                    continue
                elapsed = time.perf_counter() - started
                call.log.prefill_s += elapsed
                call.log.prefill_tokens += len(context)
                self.stats.prefills += 1
                self.stats.prefill_s += elapsed
        calls = [call for call in calls if not call.future.done()]
        if not calls:
            return
        for call in calls:
            scored = scoring_job(call.job)
            fed = len(scored.tokens) - backend.kept_length(scored.session, scored.tokens, scored.start)
            if isinstance(call.job, DraftJob):
                call.log.drafts.append((call.job.gamma, fed))
            else:
                call.log.verifies.append(fed)
        self.stats.batches[model] += 1
        self.stats.calls[model] += len(calls)
        run = draft_blocks if model == DRAFTER else verify_blocks_on
        try:
            results, times = run(backend, [call.job for call in calls])
        except Exception:  # noqa: BLE001 - find the call that fails: each alone (a failed pass emptied the caches)
            for call in calls:
                try:
                    (result,), times = run(backend, [call.job])
                except Exception as error:  # noqa: BLE001
                    call.future.set_exception(error)
                else:
                    call.future.set_result((result, times))
            return
        for call, result in zip(calls, results):
            call.future.set_result((result, times))


class _BatchedDrafter:
    computes_apart = False  # the batches run one model at a time
    overlaps_expert = False

    def __init__(self, batches: _Batches, backend: ModelBackend, log: CallLog):
        self.batches, self.backend, self.log = batches, backend, log
        self.session = backend.new_session()

    async def draft(self, context, gamma, sampling, seed, payload):
        block, times = await self.batches.call(DRAFTER, DraftJob(self.session, list(context), gamma, sampling, seed,
                                                                 payload), self.log)
        return block, CallReport(forward_s=times.forward_s, decide_s=times.decide_s,
                                 wall_s=times.forward_s + times.decide_s)


class _BatchedExpert:
    def __init__(self, batches: _Batches, backend: ModelBackend, log: CallLog):
        self.batches, self.backend, self.log = batches, backend, log
        self.session = backend.new_session()

    async def verify(self, sequence, start, block, rule, alpha, sampling, seed, *, logprobs=None,
                     prompt_logprobs=None):
        outcome, times = await self.batches.call(EXPERT, VerifyJob(
            self.session, list(sequence), start, block, rule, alpha, sampling, seed, logprobs, prompt_logprobs),
            self.log)
        return outcome, CallReport(forward_s=times.forward_s, decide_s=times.decide_s,
                                   wall_s=times.forward_s + times.decide_s)

    async def prefill(self, prompt, rule, alpha, sampling, seed) -> None:
        return None  # the batches run one model at a time: the first verify prefills


def generate_many(engine, requests: Sequence[GenerationRequest], *, concurrency: int = 16,
                  on_done: Callable[[int, BatchedGeneration], None] | None = None
                  ) -> tuple[list[BatchedGeneration], BatchStats]:
    """Decode `requests` on `engine`'s pair, at most `concurrency` at once, their calls batched per
    model. Each result equals decoding its request alone (pipelining is off: it changes no output,
    and a request here has one call in flight at a time). A request that fails ends alone, with its
    error. `on_done(index, generation)` is called as each one ends."""
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency} must be at least 1")
    return asyncio.run(_generate_many(engine, list(requests), concurrency, on_done))


async def _generate_many(engine, requests: list[GenerationRequest], concurrency: int, on_done
                         ) -> tuple[list[BatchedGeneration], BatchStats]:
    batches = _Batches({DRAFTER: engine.drafter, EXPERT: engine.expert})
    outcomes: list[BatchedGeneration | None] = [None] * len(requests)

    async def one(index: int) -> None:
        log = CallLog()
        drafter = _BatchedDrafter(batches, engine.drafter, log)
        expert = _BatchedExpert(batches, engine.expert, log)
        result, error = None, None
        try:
            request = replace(requests[index], pipeline=Pipeline.OFF)
            prompt, limit = engine.prepare(request)
            chunks = engine.stream_rounds(request, prompt, limit, drafter, expert)
            try:
                async for chunk in chunks:
                    if chunk.result is not None:
                        result = chunk.result
            finally:
                await chunks.aclose()
        except Exception as failure:  # noqa: BLE001 - the request fails alone
            error = failure
        finally:
            engine.drafter.release(drafter.session)
            engine.expert.release(expert.session)
            batches.live -= 1
            batches.check()
        outcomes[index] = BatchedGeneration(result, error, log)
        if on_done is not None:
            on_done(index, outcomes[index])

    started = time.perf_counter()
    queue = list(range(len(requests)))
    tasks: list[asyncio.Task] = []
    while True:
        while queue and batches.live < concurrency:
            batches.live += 1
            tasks.append(asyncio.create_task(one(queue.pop(0))))
        if batches.live == 0:
            break
        await batches.ready.wait()
        batches.ready.clear()
        if batches.all_waiting():
            batches.run_waiting()
        await asyncio.sleep(0)  # the requests whose calls were answered run on to their next call
    await asyncio.gather(*tasks)
    batches.stats.wall_s = time.perf_counter() - started
    return outcomes, batches.stats  # type: ignore[return-value]


# ---- the single-stream latency model ----

def _interpolate(points: dict[int, float], x: int) -> float:
    """Piecewise-linear through the measured points, extended linearly past either end."""
    xs = sorted(points)
    if x in points:
        return points[x]
    if len(xs) == 1:
        return points[xs[0]]
    low, high = (xs[0], xs[1]) if x < xs[0] else (xs[-2], xs[-1]) if x > xs[-1] else \
        next((a, b) for a, b in zip(xs, xs[1:]) if a < x < b)
    slope = (points[high] - points[low]) / (high - low)
    return max(0.0, points[low] + slope * (x - low))


@dataclass(frozen=True)
class CallCosts:
    """Single-stream seconds of one request's calls on one pair, sampling and rule, by size.

    `draft_first[n]`: a one-token draft call whose pass feeds n tokens (0: the context was just
    prefilled, the call only chooses); `draft_step`: each further drafted token; `verify[n]`: a
    verify call whose pass feeds n tokens (1 + the block)."""

    draft_first: dict[int, float]
    draft_step: float
    verify: dict[int, float]

    def draft(self, gamma: int, fed: int) -> float:
        return _interpolate(self.draft_first, fed) + max(gamma - 1, 0) * self.draft_step

    def verify_cost(self, fed: int) -> float:
        return _interpolate(self.verify, fed)

    def model(self, log: CallLog) -> float:
        """The request's modelled single-stream latency, in seconds."""
        return (log.prefill_s + sum(self.draft(gamma, fed) for gamma, fed in log.drafts)
                + sum(self.verify_cost(fed) for fed in log.verifies))

    def as_dict(self) -> dict:
        return {"draft_first_s": {str(k): v for k, v in sorted(self.draft_first.items())},
                "draft_step_s": self.draft_step, "verify_s": {str(k): v for k, v in sorted(self.verify.items())}}

    @classmethod
    def measure(cls, engine, prompt: Sequence[int], request: GenerationRequest, *, repeats: int = 3) -> CallCosts:
        """Time the calls of `request`'s kind alone after `prompt` (prefilled, not timed): draft
        calls of 1 and gamma tokens feeding 0, 1 and 2 tokens, and verify calls of blocks of 0 to
        gamma tokens. Sizes alternate within each repeat, so drift hits them alike; medians."""
        drafter, expert = engine.drafter, engine.expert
        gamma = max(1, request.block_size)
        sampling, seed = request.sampling, request.seed or 0
        payload = DraftPayload.for_request(request.rule, sampling)
        prompt = list(prompt)
        filler = [prompt[-1], prompt[-2] if len(prompt) > 1 else prompt[-1]]
        d_session, e_session = drafter.new_session(), expert.new_session()
        drafter.score([ScoreJob(d_session, prompt, len(prompt))])
        expert.score([ScoreJob(e_session, prompt, len(prompt))])
        # Blocks to verify, drafted once (untimed), with this request's sampling and payload.
        (block,), _ = draft_blocks(drafter, [DraftJob(d_session, prompt, gamma, sampling, seed, payload)])
        first: dict[int, list[float]] = {0: [], 1: [], 2: []}
        full: list[float] = []
        verify: dict[int, list[float]] = {k + 1: [] for k in range(gamma + 1)}

        def timed(run) -> float:
            started = time.perf_counter()
            run()
            return time.perf_counter() - started

        try:
            for _ in range(repeats):
                for fed in (0, 1, 2):
                    context = prompt + filler[:fed]
                    drafter.truncate(d_session, len(prompt) - (fed == 0))
                    if fed == 0:  # the context cached, with its last row: the call only chooses
                        drafter.score([ScoreJob(d_session, context, len(context))])
                    job = DraftJob(d_session, context, 1, sampling, seed, payload)
                    first[fed].append(timed(lambda job=job: draft_blocks(drafter, [job])))
                drafter.truncate(d_session, len(prompt))
                job = DraftJob(d_session, prompt + filler[:1], gamma, sampling, seed, payload)
                full.append(timed(lambda job=job: draft_blocks(drafter, [job])))
                for k in range(gamma + 1):
                    sub = EMPTY_BLOCK if k == 0 else block.prefix(k)
                    # As in a round: the cache ends before the last context token; the pass feeds it and the block.
                    expert.truncate(e_session, len(prompt) - 1)
                    job = VerifyJob(e_session, prompt + list(sub.tokens), len(prompt), sub, request.rule,
                                    request.alpha, sampling, seed)
                    verify[k + 1].append(timed(lambda job=job: verify_blocks_on(expert, [job])))
        finally:
            drafter.release(d_session)
            expert.release(e_session)
        draft_first = {fed: statistics.median(times) for fed, times in first.items()}
        step = (statistics.median(full) - draft_first[1]) / (gamma - 1) if gamma > 1 else 0.0
        return cls(draft_first, max(step, 0.0), {fed: statistics.median(times) for fed, times in verify.items()})
