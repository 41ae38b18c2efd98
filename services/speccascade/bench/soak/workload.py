"""The soak's workload: a deterministic plan of requests (method, rule, sampling, cancel or
deadline) by index and seed, and running one request as a client would, recording its outcome."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from ..workload import TASKS

# (method, rule, alpha): every rule as a cascade, and every baseline.
POLICIES = [
    ("cascade", "lossless", 0.0), ("cascade", "chow", 0.3), ("cascade", "diff", 0.2), ("cascade", "opt", 0.5),
    ("cascade", "token", 0.5), ("cascade", "lossy", 0.3), ("expert", "lossless", 0.0), ("drafter", "lossless", 0.0),
    ("token-cascade", "lossless", 0.3), ("sequence-cascade", "lossless", 0.3),
]
SAMPLINGS = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.7, top_p=0.95)}
UNARY_SHARE = 0.25  # of requests that are not cancelled by the client, this many use Generate (unary)


@dataclass(frozen=True)
class RequestSpec:
    """One request of the soak, fully determined by its index and the soak's seed."""

    index: int
    task: int
    method: str
    rule: str
    alpha: float
    sampling: str  # a key of SAMPLINGS
    seed: int
    block_size: int
    max_new_tokens: int
    action: str  # complete | cancel | deadline
    cancel_after_chunks: int
    unary: bool

    def build(self):
        from ...api.client import build_request

        return build_request(messages=[{"role": "user", "content": TASKS[self.task]}], method=self.method,
                             rule=self.rule, alpha=self.alpha, block_size=self.block_size,
                             max_new_tokens=self.max_new_tokens, seed=self.seed, **SAMPLINGS[self.sampling])

    @property
    def label(self) -> str:
        policy = self.method if self.method != "cascade" else f"{self.rule}({self.alpha:g})"
        return f"{policy}/{self.sampling}"


def plan_request(index: int, *, seed: int, cancel_share: float, deadline_share: float, max_new_tokens: int,
                 block_size: int) -> RequestSpec:
    rng = random.Random(f"{seed}:{index}")
    method, rule, alpha = rng.choice(POLICIES)
    draw = rng.random()
    action = "cancel" if draw < cancel_share else "deadline" if draw < cancel_share + deadline_share else "complete"
    return RequestSpec(
        index=index, task=rng.randrange(len(TASKS)), method=method, rule=rule, alpha=alpha,
        sampling=rng.choice(list(SAMPLINGS)), seed=rng.randrange(1 << 31), block_size=block_size,
        max_new_tokens=max_new_tokens, action=action, cancel_after_chunks=rng.randint(1, 4),
        unary=action != "cancel" and rng.random() < UNARY_SHARE,
    )


@dataclass
class Outcome:
    index: int
    label: str
    action: str
    status: str  # ok | failed | cancelled (by the client, on purpose) | deadline (expired, as planned)
    started_s: float  # since the soak started
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    deadline_s: float | None = None
    code: str = ""  # gRPC status code name of a request that did not complete
    detail: str = ""
    tier_retries: int = 0
    expert_only_fallback: bool = False
    resumes: int = 0  # times its router replica died under it and the client resumed it (or sent it again)
    token_ids: list[int] = field(default_factory=list)  # of completed requests


def run_request(client, spec: RequestSpec, *, deadline_s: float | None, clock_zero: float,
                request_id: str | None = None) -> Outcome:
    """Send one request as planned (cancel it after some chunks, or give it a deadline) and say how
    it ended. A completed request must end with its final chunk (finish reason and stats)."""
    import grpc

    from ...api.v1 import speccascade_pb2 as pb

    started = time.monotonic()
    outcome = Outcome(spec.index, spec.label, spec.action, "ok", started - clock_zero, 0.0, deadline_s=deadline_s)
    cancelled = False
    timeout = deadline_s if spec.action == "deadline" else None
    try:
        if spec.unary:
            resent = client.resent_calls
            try:
                response = client.generate(spec.build(), timeout=timeout, request_id=request_id)
            finally:
                outcome.resumes = client.resent_calls - resent
            outcome.ttft_s = time.monotonic() - started
            outcome.token_ids, final = list(response.token_ids), response
        else:
            call = client.stream(spec.build(), timeout=timeout, request_id=request_id)
            final, chunks = None, 0
            for chunk in call:
                if chunk.token_ids and outcome.ttft_s is None:
                    outcome.ttft_s = time.monotonic() - started
                outcome.token_ids += chunk.token_ids
                chunks += 1
                final = chunk
                outcome.resumes = call.resumes
                if spec.action == "cancel" and chunks >= spec.cancel_after_chunks and not chunk.HasField("stats"):
                    cancelled = True
                    call.cancel()
                    break
        if cancelled:
            outcome.status, outcome.code = "cancelled", "CANCELLED"
        elif final is None or not final.HasField("stats") or final.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
            outcome.status, outcome.code = "failed", "OK"
            outcome.detail = "the call ended without its final chunk (finish reason and stats)"
        else:
            outcome.tier_retries = final.stats.tier_retries
            outcome.expert_only_fallback = final.stats.expert_only_fallback
    except grpc.RpcError as error:
        code = error.code()
        outcome.code, outcome.detail = code.name, (error.details() or "")[:300]
        if spec.action == "deadline" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            outcome.status = "deadline"
        elif cancelled and code == grpc.StatusCode.CANCELLED:
            outcome.status = "cancelled"
        else:
            outcome.status = "failed"
    outcome.latency_s = time.monotonic() - started
    outcome.tokens = len(outcome.token_ids)
    if outcome.status != "ok":
        outcome.token_ids = []
    return outcome
