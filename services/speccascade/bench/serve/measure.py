"""What `bench serve` measures: each request in-process and served, back to back; the served
system at several concurrent streams; a load of long prompts; bytes on the wire. Every figure
comes with the per-round split of where the time went, read from the requests' own stats."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..timing import StreamTiming, percentile, time_stream

# Where a round's time goes, by the stats' field names (ms per round in the report).
PHASES = {
    "drafter queue": "drafter_queue_seconds", "drafter forward": "drafter_forward_seconds",
    "drafter tokens": "drafter_decide_seconds", "expert queue": "expert_queue_seconds",
    "expert forward": "expert_forward_seconds", "verification": "expert_decide_seconds",
    "tier calls + (de)serialisation": "transport_seconds",  # Serve or the direct channel
}
OTHER = "router loop + text"  # the loop's own time, waiting for no tier call: the loop itself, detokenising, streaming
ROUND = "round (wall time)"


@dataclass
class Breakdown:
    """Milliseconds per round, by phase, summed over some requests, and the rounds' wall time. A
    tier call is counted whole in its phases, also where it ran beside the loop's own work (the next
    draft while the round before streams) or beside another call (a pre-draft beside the verify,
    the expert's early prefill beside the first draft): the phases and the rest then add up to more
    than the rounds took."""

    rounds: int = 0
    ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys([*PHASES, OTHER, ROUND], 0.0))

    def add(self, stats) -> None:
        """`stats`: a request's stats (the engine's GenerationStats or the API's message)."""
        self.rounds += stats.rounds
        for phase, name in PHASES.items():
            self.ms[phase] += 1e3 * getattr(stats, name)
        # drafter_seconds and expert_seconds are what the loop waited for (never two at once).
        self.ms[OTHER] += 1e3 * max(0.0, stats.wall_seconds - stats.drafter_seconds - stats.expert_seconds)
        self.ms[ROUND] += 1e3 * stats.wall_seconds

    def per_round(self) -> dict[str, float]:
        return {phase: total / self.rounds for phase, total in self.ms.items()} if self.rounds else {}


@dataclass
class Paired:
    """One request in-process, then served."""

    task: str
    sampling: str
    in_process: StreamTiming
    served: StreamTiming
    identical: bool
    # Page faults per round: of this process while it decoded in-process, of both tiers' processes
    # while they served the request.
    page_faults_per_round: tuple[float, float] = (0.0, 0.0)

    @property
    def token_ratio(self) -> float:
        return percentile(self.served.token_gaps_s, 0.5) / percentile(self.in_process.token_gaps_s, 0.5)

    @property
    def ttft_ratio(self) -> float:
        return self.served.ttft_s / self.in_process.ttft_s


@dataclass
class PipelinedRequest:
    """One request served with each pipelining mode, back to back."""

    task: str
    sampling: str
    timings: dict[str, StreamTiming]  # mode -> timing
    identical: bool  # every mode's output the same
    predrafts: dict[str, tuple[int, int, int]]  # mode -> (made, used, wasted drafter passes)

    def speedup(self, mode: str, base: str = "off") -> float:
        """Per-token latency without pipelining / with `mode`."""
        return percentile(self.timings[base].token_gaps_s, 0.5) / percentile(self.timings[mode].token_gaps_s, 0.5)


@dataclass
class Concurrency:
    streams: int
    tokens: int
    wall_s: float
    token_p50_ms: float  # per-token latency a stream sees
    mean_drafter_batch: float
    mean_expert_batch: float
    breakdown: Breakdown
    pipeline: str = "off"
    predrafts: tuple[int, int] = (0, 0)  # made, used
    failures: list[str] = field(default_factory=list)  # the gRPC status of each stream that failed
    page_faults_per_round: dict[str, float] = field(default_factory=dict)  # per tier process
    # Per tier: the share of the wall time its forward thread ran batches, the turns on which it
    # waited for calls handed over by the other tier, and those waits' milliseconds.
    tier_activity: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per tier: its forward passes by how they ran (graph, eager, wide, uncaptured: `STEP_KINDS`) and
    # the sessions that lost their static slot to another's (slot_evictions).
    tier_steps: dict[str, dict[str, int]] = field(default_factory=dict)
    requests_per_stream: int = 1  # sent one after the other by each stream (a closed loop)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass
class Load:
    """A guidellm-style load: `streams` concurrent clients, `prompt_tokens`-token prompts."""

    streams: int
    prompt_tokens: int
    requests: int
    finished: int
    ttft_s: list[float]
    itl_s: list[float]  # inter-token latency, per token
    baseline_ttft_s: list[float]  # the same prompts one stream at a time
    baseline_itl_s: list[float]


class Timed:
    """A stream of chunks, kept and timed; its last chunk's stats are the request's."""

    def __init__(self, chunks):
        self.chunks: list = []
        self.timing = time_stream(self._keep(chunks))

    def _keep(self, chunks):
        for chunk in chunks:
            self.chunks.append(chunk)
            yield chunk

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def stats(self):
        last = self.chunks[-1]
        return last.result.stats if getattr(last, "result", None) is not None else last.stats


def run_paired(engine, client, requests: Sequence[tuple[str, str, dict]], advance: Callable[[], None],
               breakdowns: dict[str, Breakdown], handles, paired: list[Paired]) -> None:
    """Each (task, sampling label, options) in-process then served, interleaved request by request,
    so the machine's drift hits both alike; each pair goes into `paired` as it is measured (a bench
    stopped midway keeps what it had)."""
    from ...api.client import build_request
    from ...engine.request import GenerationRequest
    from ...options import SamplingParams
    from ...serving.heap import page_faults

    for task, label, options in requests:
        sampling = {k: options[k] for k in ("temperature", "top_p") if k in options}
        common = {k: v for k, v in options.items() if k not in sampling}
        before = page_faults()
        local = Timed(engine.stream(GenerationRequest(**common, sampling=SamplingParams(**sampling))))
        local_faults = page_faults() - before
        tiers_before = tier_stats(handles)
        remote = Timed(client.stream(build_request(**options)))
        tiers_after = tier_stats(handles)
        served_faults = sum(tiers_after[name]["page_faults"] - tiers_before[name]["page_faults"] for name in handles)
        breakdowns["in-process"].add(local.stats)
        breakdowns["served"].add(remote.stats)
        paired.append(Paired(task, label, local.timing, remote.timing, local.tokens == remote.tokens,
                             (local_faults / max(local.stats.rounds, 1), served_faults / max(remote.stats.rounds, 1))))
        advance()


def tier_stats(handles) -> dict[str, dict]:
    """Per tier, its replica's counters since it started (`ModelTier.batch_stats`)."""
    return {name: handle.batch_stats.remote().result() for name, handle in handles.items()}


def run_pipelined(client, requests: Sequence[tuple[str, str, dict]], modes: Sequence[str],
                  advance: Callable[[], None], results: list[PipelinedRequest]) -> None:
    """Each (task, sampling label, options) served once per pipelining mode, mode after mode; each
    request's figures go into `results` as they are measured."""
    from ...api.client import build_request

    for task, label, options in requests:
        timed = {mode: Timed(client.stream(build_request(**options, pipeline=mode))) for mode in modes}
        outputs = [t.tokens for t in timed.values()]
        results.append(PipelinedRequest(
            task, label, {mode: t.timing for mode, t in timed.items()}, all(o == outputs[0] for o in outputs),
            {mode: (t.stats.predrafts, t.stats.predrafts_used, t.stats.predraft_wasted_passes)
             for mode, t in timed.items()}))
        advance()


def concurrent(target: str, app: str, build: Callable[[int], object], streams: int, handles,
               pipeline: str = "off", requests_per_stream: int = 1) -> Concurrency:
    """`streams` client threads at once, each sending `requests_per_stream` requests one after the
    other (a closed loop, as load tools run a fixed concurrency); stream `i`'s `j`-th request is
    `build(i + j)`. With one request per stream the figure is a burst's: all prompts arrive together
    and the wall time runs to the slowest stream's last round, while the others have finished and
    the batch shrinks; more requests per stream weigh those edges less, as a service's steady load
    would. A stream that fails is counted, not timed, and sends no more."""
    import grpc

    from ...api.client import SpecCascadeClient
    from ...engine.backends.base import STEP_KINDS

    before = tier_stats(handles)
    results: list[Timed] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        with SpecCascadeClient(target, application=app) as client:
            for sent in range(requests_per_stream):
                try:
                    timed = Timed(client.stream(build(index + sent)))
                except grpc.RpcError as error:
                    with lock:
                        failures.append(f"{error.code().name}: {error.details()}")
                    return
                with lock:
                    results.append(timed)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = tier_stats(handles)
    counted = [f"steps_{how}" for how in STEP_KINDS] + ["slot_evictions"]
    grew = {name: {key: after[name][key] - before[name][key] for key in
                   ("batches", "batched_requests", "page_faults", "busy_s", "turn_gathers", "turn_gather_ms", *counted)}
            for name in handles}
    steps = {name: {key.removeprefix("steps_"): int(g[key]) for key in counted} for name, g in grew.items()}
    means = {name: g["batched_requests"] / g["batches"] if g["batches"] else 0.0 for name, g in grew.items()}
    activity = {name: {"busy_share": g["busy_s"] / wall, "turn_gathers": g["turn_gathers"],
                       "turn_gather_ms": g["turn_gather_ms"]} for name, g in grew.items()}
    breakdown = Breakdown()
    for timed in results:
        breakdown.add(timed.stats)
    gaps = [g for timed in results for g in timed.timing.token_gaps_s]
    predrafts = (sum(t.stats.predrafts for t in results), sum(t.stats.predrafts_used for t in results))
    rounds = max(sum(t.stats.rounds for t in results), 1)
    faults = {name: g["page_faults"] / rounds for name, g in grew.items()}
    return Concurrency(streams, sum(t.timing.tokens for t in results), wall, 1e3 * percentile(gaps, 0.5),
                       means["Drafter"], means["Expert"], breakdown, pipeline, predrafts, failures, faults, activity,
                       steps, requests_per_stream)


def synthetic_prompt(tokenizer, tokens: int, seed: int) -> str:
    """About `tokens` tokens of random words, as load tools make them (guidellm's synthetic data)."""
    words = ["data", "model", "value", "function", "return", "list", "string", "number", "result", "index",
             "system", "request", "server", "token", "batch", "cache", "layer", "output", "input", "stream"]
    rng = random.Random(seed)
    text = ""
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += " ".join(rng.choice(words) for _ in range(8)) + " "
    return text


def load(target: str, app: str, prompts: Sequence[str], *, streams: int, max_new_tokens: int,
         timeout_s: float) -> tuple[int, list[float], list[float]]:
    """Send every prompt, `streams` at a time (closed loop); (finished, TTFTs, inter-token gaps)."""
    from ...api.client import SpecCascadeClient, build_request

    pending = list(enumerate(prompts))
    lock = threading.Lock()
    ttfts: list[float] = []
    gaps: list[float] = []
    finished = [0]

    def client_loop() -> None:
        with SpecCascadeClient(target, application=app, timeout=timeout_s) as client:
            while True:
                with lock:
                    if not pending:
                        return
                    index, prompt = pending.pop(0)
                request = build_request(prompt, max_new_tokens=max_new_tokens, seed=index)
                try:
                    timing = time_stream(client.stream(request))
                except Exception:  # counted as not finished
                    continue
                with lock:
                    finished[0] += 1
                    ttfts.append(timing.ttft_s)
                    gaps.extend(timing.token_gaps_s)

    threads = [threading.Thread(target=client_loop) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return finished[0], ttfts, gaps


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"median {statistics.median(ordered):.2f} [{ordered[0]:.2f}-{ordered[-1]:.2f}]"
