"""The model-backend interface: how the engine and the tiers run a causal LM.

A backend scores token sequences for sessions. Every job names the *whole* token sequence of its
session and where scoring starts; the backend keeps the longest cached prefix it can reuse, drops
the rest (rollback after a rejection is just this), and runs the model on the new suffix only. So
a call is always answerable from scratch, and a warm session only makes it cheaper. Several
sessions' jobs are scored in one forward pass.

The plan for one job (what to keep, what to run, which rows to return) is made here, once, for
every backend; a backend only implements how a planned batch runs (`_forward`) and how a
session's cache is cut back (`_truncate`).
"""

from __future__ import annotations

import abc
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...cascade import logits_to_probs
from .attention import use_grouped_query_sdpa
from .cpu_linear import packed_linears, use_onednn_linear

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
# CPU flags of native bf16 matrix units (Linux /proc/cpuinfo): Intel AMX, AVX512-BF16 (Intel, AMD Zen 4).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 flags (empty where bf16 matmuls are emulated, ~3x slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def parse_dtype(name: "str | torch.dtype", device: "str | torch.device" = "cpu") -> torch.dtype:
    """bf16, fp32, or auto: bf16 on a GPU and on a CPU with bf16 matrix units, fp32 on other CPUs
    (the log says which, and why)."""
    if isinstance(name, torch.dtype):
        return name
    text = str(name).lower()
    if text == "auto":
        device = resolve_device(device)
        if device.type == "cuda":
            chosen, why = torch.bfloat16, "a GPU"
        else:
            flags = cpu_bf16_flags()
            chosen = torch.bfloat16 if flags else torch.float32
            why = f"this CPU has {', '.join(flags)}" if flags else \
                "this CPU has no bf16 matrix units (no AMX or AVX512-BF16), where bf16 is emulated and slower"
        log.info("dtype auto: %s (%s)", "bf16" if chosen is torch.bfloat16 else "fp32", why)
        return chosen
    try:
        return DTYPES[text]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of: auto, bf16, fp32") from None


def resolve_device(name: "str | torch.device" = "auto") -> torch.device:
    """"auto": the first CUDA device when there is one, else the CPU; or any torch device name."""
    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; expected auto, cpu, cuda or cuda:N")
    return device


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case (the cache is a prefix), at C speed
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def logits_to_keep(new_tokens: int, rows: int, device: torch.device | str = "cpu") -> int | Tensor:
    """transformers' `logits_to_keep` for the last `rows` of a pass over `new_tokens` positions.

    An int makes the model slice its hidden states (`[:, -rows:]`); a partial slice of a pass over
    several tokens reaches the output layer as a matmul that torch runs as a batched one, copying
    the whole [vocabulary, hidden] weight first: on a CPU, +0.5 s a pass for a 0.5B model in bf16
    (a 2-token pass took 820 ms instead of 60). The positions as a tensor make the model gather
    those rows into a tensor of their own, which goes through a plain matmul. All rows: the int."""
    if rows >= new_tokens:
        return rows
    return torch.arange(new_tokens - rows, new_tokens, device=device)


@dataclass(frozen=True)
class CacheKwargs:
    """How this transformers version's model call takes a cache: transformers 5.2x renamed
    `past_key_values` to `cache` and dropped `cache_position`, 5.1x needs both old names."""

    cache_name: str
    takes_cache_position: bool

    @classmethod
    def of(cls, model) -> "CacheKwargs":
        parameters = inspect.signature(model.forward).parameters
        return cls("cache" if "cache" in parameters else "past_key_values", "cache_position" in parameters)

    def __call__(self, cache, positions: Tensor | None = None) -> dict:
        """Keyword arguments passing `cache`, and where the new tokens go ([n]) if the model takes it."""
        kwargs = {self.cache_name: cache}
        if self.takes_cache_position and positions is not None:
            kwargs["cache_position"] = positions
        return kwargs


@dataclass(eq=False)
class BackendSession:
    """The cached state of one sequence in one backend."""

    tokens: list[int] = field(default_factory=list)  # the tokens whose keys/values are cached
    last_row: Tensor | None = None  # [V] distribution after `tokens`, if known
    last_used: float = field(default_factory=time.monotonic)

    @property
    def cached_length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ScoreJob:
    session: BackendSession
    tokens: Sequence[int]
    start: int


# A token chosen on the device whose id the host has not read yet (`ModelBackend.step`): it stands
# in the session's token list until `settle` writes the id, and matches no real token meanwhile.
UNSETTLED = -1

# How a forward pass ran (`ModelBackend.steps`): `graph`, a captured CUDA graph replayed; `eager`, on
# a backend that captures none (hf, or any backend on the CPU); `wide`, graphs captured but the step
# feeds more tokens a row than any of them (a prefill chunk: eager by design); `uncaptured`, a step
# that would fit a graph but whose shape was not captured (more rows or a longer window than those
# captured, or cut by the graph memory budget): the eager fallback a GPU deployment should not see.
STEP_KINDS = ("graph", "eager", "wide", "uncaptured")


@dataclass
class Plan:
    """One job's share of a forward pass."""

    session: BackendSession
    first_row: Tensor | None  # [V] reused from the session, if scoring starts where its cache ends
    new_tokens: list[int]  # run the model on these, after the kept cache
    rows_needed: int  # distributions to take from this pass, for the last positions of new_tokens


class ModelBackend(abc.ABC):
    """A causal LM with per-session caches, scoring batches of jobs into next-token distributions.

    Distributions are float32 probabilities at temperature 1 over the first `vocab_size` output
    ids (a pair compares distributions over the ids its tokenizer has; rows past them are padding
    and get no mass), on the backend's device.
    """

    kind: str = ""

    def __init__(self, model, *, name: str, vocab_size: int | None = None):
        # Serving never trains: no pass, eager or captured in a CUDA graph, keeps autograd state
        # (a capture with grad enabled holds every activation in the graph pool).
        self.model = model.eval().requires_grad_(False)
        # On the CPU, batched (masked) passes of grouped-query models attend without copying each
        # key/value head per query head (attention.py).
        self.grouped_query_sdpa = use_grouped_query_sdpa(self.model)
        # fp32 linear layers on the CPU through oneDNN, not the BLAS's slow few-row sgemm (cpu_linear.py).
        self.onednn_linears = use_onednn_linear(self.model)
        self.packed_linears = packed_linears(self.model)  # of those, on a weight in oneDNN's blocked layout
        self.name = name
        self.config = model.config
        self.output_rows = int(model.get_output_embeddings().weight.shape[0])
        self.vocab_size = self.output_rows if vocab_size is None else int(vocab_size)
        if not 0 < self.vocab_size <= self.output_rows:
            raise ValueError(
                f"model {name!r} has {self.output_rows} output rows, fewer than the {self.vocab_size} ids of its "
                "tokenizer: it cannot score every token"
            )
        self.context_window = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 1 << 30
        first = next(model.parameters())
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.forward_calls = 0
        self.steps: dict[str, int] = dict.fromkeys(STEP_KINDS, 0)  # forward passes by how they ran
        # Sessions whose cache was taken for another's (the static backend's slots, all in use):
        # each recomputes its context on its next call.
        self.slot_evictions = 0
        self.cache_kwargs = CacheKwargs.of(model)
        # Scoring and releasing exclude each other: a release from another thread waits for the pass
        # in progress (which may be using the session), so it never frees a cache under a forward.
        self._lock = threading.RLock()
        # Held around each forward pass: a lock shared with other processes on the same cores
        # (serving.cpu_turns), or nothing.
        self.pass_guard: AbstractContextManager = nullcontext()

    def _count_step(self, how: str) -> None:
        self.forward_calls += 1
        self.steps[how] += 1

    # ---- what a backend implements ----

    @abc.abstractmethod
    def new_session(self) -> BackendSession:
        """An empty session."""

    @abc.abstractmethod
    def session_bytes(self, session: BackendSession) -> int:
        """Device memory the session's cache holds."""

    def release(self, session: BackendSession) -> None:
        """Free the session's cache now; the session stays usable (it recomputes). Safe from any
        thread: it waits for a pass in progress."""
        with self._lock:
            self._release(session)

    def _release(self, session: BackendSession) -> None:
        self.truncate(session, 0)

    @abc.abstractmethod
    def _truncate(self, session: BackendSession, keep: int) -> None:
        """Cut the session's cached keys/values back to its first `keep` tokens."""

    @abc.abstractmethod
    def _forward(self, plans: list[Plan], ids: Tensor | None = None) -> list[Tensor]:
        """Run each plan's new tokens after its session's kept cache, in one pass, extending the
        caches; return the distributions at each plan's last `rows_needed` positions,
        [rows_needed, vocab_size] float32 (see `probabilities`). `ids` ([len(plans), 1] on the
        device), when given, are the new tokens' ids of one-token plans, which the host has not
        read (`step`)."""

    def _prepare(self, sessions: list[BackendSession]) -> None:
        """Before planning a pass over `sessions`: make room for them (a backend with a fixed number of
        cache slots frees and assigns slots here, so the plans see each session's true cache)."""

    # ---- shared ----

    def truncate(self, session: BackendSession, keep: int) -> None:
        if keep < session.cached_length:
            self._truncate(session, keep)
            del session.tokens[keep:]
            session.last_row = None

    @torch.inference_mode()
    def score(self, jobs: Sequence[ScoreJob]) -> list[Tensor]:
        """For each job, the next-token distributions for tokens[start], ..., and the token after
        the last one: [len(tokens) - start + 1, vocab_size] float32.

        A session named by several jobs is scored in successive passes, in job order."""
        with self._lock:
            return self._score(jobs)

    def _score(self, jobs: Sequence[ScoreJob]) -> list[Tensor]:
        results: list[Tensor | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        while pending:
            wave, later, seen = [], [], set()
            for i in pending:
                (later if id(jobs[i].session) in seen else wave).append(i)
                seen.add(id(jobs[i].session))
            for i, rows in zip(wave, self._score_wave([jobs[i] for i in wave])):
                results[i] = rows
            pending = later
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def step(self, sessions: Sequence[BackendSession], tokens: Tensor) -> Tensor:
        """Extend each session by one token chosen on the device (`tokens`: [B] int64, never read
        by the host here) and return the distributions of the token after it, [B, vocab_size].

        This is how a drafter steps through a block without a host sync per token: the sessions
        record the tokens as UNSETTLED until `settle` gives their ids, once per block."""
        if len({id(session) for session in sessions}) < len(sessions):
            raise ValueError("step: a session named twice in one step would advance its cache twice")
        with self._lock:
            self._prepare(list(sessions))
            plans = [Plan(session, None, [UNSETTLED], 1) for session in sessions]
            rows = self._run(plans, ids=tokens.view(-1, 1))
            for plan, row in zip(plans, rows):
                plan.session.tokens.append(UNSETTLED)
                plan.session.last_row = row[-1]
            return torch.stack([row[-1] for row in rows])

    def settle(self, session: BackendSession, ids: Sequence[int]) -> None:
        """The ids of the session's trailing UNSETTLED tokens, in order (fewer when its cache was cut
        back meanwhile: then only those still cached)."""
        tokens = session.tokens
        unsettled = 0
        while unsettled < len(tokens) and tokens[len(tokens) - 1 - unsettled] == UNSETTLED:
            unsettled += 1
        if unsettled:
            tokens[len(tokens) - unsettled:] = list(ids[:unsettled])

    def distributions(self, session: BackendSession, tokens: Sequence[int], start: int) -> Tensor:
        return self.score([ScoreJob(session, tokens, start)])[0]

    def next_distribution(self, session: BackendSession, tokens: Sequence[int]) -> Tensor:
        """[V]: the distribution of the token after `tokens`."""
        return self.distributions(session, tokens, len(tokens))[0]

    def probabilities(self, logits: Tensor) -> Tensor:
        """[..., output_rows] logits -> [..., vocab_size] float32 probabilities."""
        return logits_to_probs(logits[..., : self.vocab_size])

    def _run(self, plans: list[Plan], ids: Tensor | None = None) -> list[Tensor]:
        """`_forward`, and if it fails, the plans' sessions emptied: a pass that raised may have
        extended some caches and not others, and a cache must always hold exactly its session's
        tokens (the next call recomputes them)."""
        try:
            with self.pass_guard:
                return self._forward(plans, ids)
        except BaseException:
            for plan in plans:  # unconditionally: the cache may hold keys its token list does not name
                self._truncate(plan.session, 0)
                plan.session.tokens.clear()
                plan.session.last_row = None
            raise

    def kept_length(self, session: BackendSession, tokens: Sequence[int], start: int) -> int:
        """How many of `tokens` a pass scoring them from `start` takes from the session's cache (it
        feeds the rest): what `plan` keeps."""
        common = common_prefix_length(session.tokens, tokens)
        if common == session.cached_length == start and session.last_row is not None:
            return start  # the cache ends exactly where scoring starts: its stored row is the first one
        # Keep what is cached and still valid, but recompute at least position start - 1, whose
        # logits give the first wanted row.
        return min(common, start - 1)

    def plan(self, job: ScoreJob) -> Plan:
        session, tokens, start = job.session, job.tokens, job.start
        if not 1 <= start <= len(tokens):
            raise ValueError(f"start={start} must be in [1, {len(tokens)}] for {len(tokens)} tokens")
        session.last_used = time.monotonic()
        keep = self.kept_length(session, tokens, start)
        first_row = session.last_row if keep == start else None
        self.truncate(session, keep)
        rows_wanted = len(tokens) - start + 1
        return Plan(session, first_row, list(tokens[keep:]), rows_wanted - (first_row is not None))

    def _score_wave(self, jobs: list[ScoreJob]) -> list[Tensor]:
        """Jobs of distinct sessions, in one forward pass."""
        self._prepare([job.session for job in jobs])
        plans = [self.plan(job) for job in jobs]
        to_run = [plan for plan in plans if plan.new_tokens]
        computed = iter(self._run(to_run) if to_run else [])
        results = []
        for plan in plans:
            if not plan.new_tokens:
                results.append(plan.first_row.unsqueeze(0))
                continue
            rows = next(computed)  # [rows_needed, V]
            plan.session.tokens.extend(plan.new_tokens)
            plan.session.last_row = rows[-1]
            if plan.first_row is not None:
                rows = torch.cat([plan.first_row.unsqueeze(0), rows], dim=0)
            results.append(rows)
        return results
