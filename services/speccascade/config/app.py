"""Typed configuration of the Serve application: validated once, at the edge (the builder's
`args`, the Helm chart's `serveConfigV2`, the CLI). Every field documents itself; validators name
the bad value."""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..models.catalog import DRAFTER_DEFAULT, EXPERT_DEFAULT
from ..options import (
    ALPHA_RANGES,
    DEFAULT_ALPHA,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_RULE,
    MAX_BLOCK_SIZE,
    MAX_NEW_TOKENS_CAP,
    Pipeline,
    Rule,
    validate_alpha,
)
from .base import ReplicaBounds, StrictModel

# Model execution (`speccascade.engine.backends`): transformers over a dynamic cache per session,
# or preallocated per-slot K/V buffers with CUDA graphs.
BackendKind = Literal["hf", "static"]
BACKEND_KINDS: tuple[str, ...] = get_args(BackendKind)
# The C allocator of a tier process (`serving.heap`).
AllocatorName = Literal["auto", "glibc", "jemalloc", "tcmalloc"]
ALLOCATOR_NAMES: tuple[str, ...] = get_args(AllocatorName)
# How the router calls the tiers (`serving.clients`): Serve's gRPC channel between replicas, or Ray actor calls.
TierTransport = Literal["direct", "grpc", "ray"]
DtypeName = Literal["auto", "bf16", "fp32"]  # auto: bf16 on GPUs and CPUs with bf16 matrix units, else fp32
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
STATIC_DEFAULT_MAX_LEN = 4096  # tokens per static slot when the model's window is larger (memory grows with it)


class Placement(StrictModel):
    """Where a deployment's replicas run: Ray actor options for each replica."""

    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per replica (0 lets tiers share a small machine).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions allowed).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description='Ray custom resources per replica, e.g. {"expert_tier": 1} to pin to a node group.',
        # The validator below, as JSON Schema (the Helm chart's values.schema.json).
        json_schema_extra={"propertyNames": {"minLength": 1},
                           "additionalProperties": {"type": "number", "exclusiveMinimum": 0}},
    )
    accelerator_type: str | None = Field(None, description='Ray accelerator type, e.g. "A100" or "L4".')
    memory_bytes: int | None = Field(None, ge=0, description="Heap memory reserved per replica, in bytes.")

    @field_validator("resources")
    @classmethod
    def _positive_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not name or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount <= 0:
                raise ValueError(f"resource {name!r}={amount!r} must be a positive number")
        return value

    def ray_actor_options(self) -> dict:
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        return options


class Replicas(ReplicaBounds):
    """Replica count bounds of a deployment; min == max gives a fixed count."""


class StaticBackendConfig(StrictModel):
    """Settings of the `static` backend: preallocated per-slot K/V buffers."""

    slots: int = Field(32, ge=1, le=1024, description="Sessions whose caches one replica holds at once; more are "
                                                       "reclaimed least-recently-used (and recompute). At least "
                                                       "the router's tenancy.max_decoding_requests.")
    max_len: int | None = Field(None, ge=16, description="Tokens per slot (default: the model's context window, "
                                                          "at most 4096).")
    cuda_graphs: bool = Field(True, description="Replay decode and verify steps as CUDA graphs captured at start "
                                                "(GPU only; batches up to max_batch_size, blocks up to 16).")
    graph_memory_mb: int = Field(2048, ge=0, le=1 << 20,
                                 description="Device memory the captured graphs may take (their shared pool); shapes "
                                             "past it run eagerly. The log lists what was captured.")


class TierConfig(StrictModel):
    """A model tier (drafter or expert)."""

    model: str = Field(description="Model source: packaged name, local directory, .gguf file or hub id.")
    dtype: DtypeName = Field(
        "auto", description="Weights and compute dtype. auto: bf16 on a GPU and on a CPU with bf16 matrix units "
                            "(AMX, AVX512-BF16); fp32 on other CPUs, where bf16 is emulated and ~3x slower (the pair "
                            "then takes twice the memory).")
    backend: BackendKind = Field("hf", description="Model execution: `hf` (transformers over a dynamic cache per "
                                                   "session) or `static` (preallocated slots, CUDA graphs on GPUs).")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="Where the model runs: auto (CUDA when the replica has a GPU), cpu, cuda or "
                                    "cuda:N. With several GPUs and auto, the model is placed across them.")
    static: StaticBackendConfig = Field(default_factory=StaticBackendConfig,
                                        description="Settings of the static backend.")
    placement: Placement = Field(default_factory=Placement, description="Where each replica runs.")
    replicas: Replicas = Field(default_factory=Replicas, description="Replica bounds.")
    max_batch_size: int = Field(8, ge=1, le=256, description="Most tier calls batched into one forward pass. A batch "
                                                            "forms from what queued while the model was busy; "
                                                            "nothing waits for company.")
    prefill_chunk_tokens: int = Field(
        256, ge=16, le=65536,
        description="Tokens of new contexts prefilled per pass, shared by the prompts waiting (each prompt at most "
                    "this many a pass). Prompts are prefilled in passes between the decode batches, so a running "
                    "stream's step waits for at most one pass.")
    prefill_pass_prompts: int = Field(
        1, ge=1, le=256,
        description="Waiting prompts one prefill pass may feed prefill_chunk_tokens each: a pass's budget grows with "
                    "the prompts waiting, up to this many chunks. 1: one chunk a pass, shared. More prefills a burst "
                    "of new prompts in fewer, larger passes (a pass's fixed cost, reading the weights, is paid once "
                    "for all), while a running stream's step may wait for that larger pass. While no stream decodes "
                    "on the replica, a pass feeds prefill_chunk_tokens x this many, shared evenly by the prompts "
                    "waiting (a lone prompt gets all of it).")
    kv_cache_budget_mb: int = Field(1024, ge=1, description="KV cache memory per replica before LRU eviction.")
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600,
        description="When a replica stops (scale-down, upgrade, deletion) and the router calls the tiers directly "
                    "(router.tier_transport: direct), it keeps answering the sessions it holds, whose calls come "
                    "straight from the router, until each has ended or this long has passed; a session still "
                    "running then moves to another replica, which recomputes its cache.")
    session_idle_timeout_s: float = Field(
        300.0, gt=0, le=86400,
        description="A session cache with no call for this long is reclaimed (its router replica may have "
                    "died mid-request and will never release it; a live but stalled request just recomputes). "
                    "Released session ids are remembered as long, so a call that arrives after its session's "
                    "release is refused instead of caching the session again.")
    max_ongoing_requests: int = Field(32, ge=1, description="Concurrent calls a replica accepts.")
    cpu_affinity: list[int] | None = Field(
        None, description="CPU cores the replica's process runs on (Linux): e.g. each tier on a core of its own, "
                          "so that drafting ahead overlaps verification on a small machine. Unset: any core.")
    torch_threads: int | None = Field(
        None, ge=1, le=256,
        description="Intra-op threads for forward passes. Default: torch's, which Ray caps at the replica's "
                    "num_cpus (and at 1 when num_cpus < 1) through OMP_NUM_THREADS.")
    allocator: AllocatorName = Field(
        "auto", description="The C allocator of the replica's process, from which torch takes every CPU tensor. "
                            "tcmalloc or jemalloc (preloaded; Debian/Ubuntu libtcmalloc-minimal4, libjemalloc2, in "
                            "the images): freed tensors are reused and CPU passes run faster (BENCHMARKS.md). glibc "
                            "(mmap threshold pinned, heap trimmed between batches): needs nothing installed; a CPU "
                            "pass maps and faults in its large tensors afresh. auto: tcmalloc where the replica's "
                            "node has it, else glibc (the replica's log says which). A replica without the "
                            "allocator asked for by name refuses to start.")
    cpu_kernel_cache: int = Field(
        256, ge=1, le=65536,
        description="Compiled CPU matmul kernels (oneDNN's, one per matrix shape a pass has met) the replica's "
                    "process keeps, in each of oneDNN's and torch's caches. Prompt chunks, verify blocks and "
                    "batches of every size keep adding shapes: at the libraries' default (1,024 each) the "
                    "kernels hold hundreds of MiB and a long run's memory grows for hours; too few, and passes "
                    "compile their kernels again (64 cost 25 % on the packaged drafter cycling through 48 "
                    "shapes, 256 nothing). No effect on a GPU's passes.")
    cpu_spin_count: int = Field(
        1_000, ge=0, le=100_000_000,
        description="How many times the replica's OpenMP threads (torch's CPU intra-op threads, libgomp) spin "
                    "for more work after each parallel operation before they sleep (GOMP_SPINCOUNT). libgomp's "
                    "default, 300,000, is several milliseconds: after a pass the idle threads keep holding cores "
                    "the other tier, the router and Ray need next. 1,000 made the tiny pair's served round ~9 % "
                    "faster at one stream and its throughput ~40 % higher at 8 streams on 2 cores "
                    "(BENCHMARKS.md). 0: sleep at once. "
                    "No effect on a GPU's passes.")
    cpu_lock_file: str | None = Field(
        None, min_length=1,
        description="A file the tiers of one CPU machine lock around each batch, so that their passes take "
                    "turns instead of running at once on the same cores (where each pass's threads would wait "
                    "for the other's); a tier forms its batch once it has the turn, with the calls the other "
                    "tier has just handed on; turns alternate while both have work (a second file, the path "
                    "+ '.waiting', says who waits). For tiers that share cores and each use all of them; give "
                    "both tiers the same path. Unset: no lock.")

    @field_validator("cpu_affinity")
    @classmethod
    def _cores(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(core < 0 for core in value)):
            raise ValueError(f"cpu_affinity={value!r} must list one or more CPU core numbers (>= 0)")
        return value

    @model_validator(mode="after")
    def _lock_only_on_the_cpu(self) -> "TierConfig":
        if self.cpu_lock_file and self.device.startswith("cuda"):
            raise ValueError(f"cpu_lock_file={self.cpu_lock_file!r} makes passes on the CPU take turns; this tier runs "
                             f"on device={self.device!r} (unset cpu_lock_file)")
        return self

    @model_validator(mode="after")
    def _batch_fits_the_slots(self) -> "TierConfig":
        # The static backend holds each session of a batch in a slot of its own.
        if self.backend == "static" and self.static.slots < self.max_batch_size:
            raise ValueError(
                f"static.slots={self.static.slots} is below max_batch_size={self.max_batch_size}: a batch of "
                f"max_batch_size sessions must fit the static backend's slots (raise static.slots or lower "
                f"max_batch_size)"
            )
        return self

    def sequence_limit(self, model_window: int) -> int:
        """Longest sequence this tier holds of a model with `model_window` positions: the window,
        or the static backend's slot length where that is shorter (the backend's own context
        window, which the in-process engine reads from it)."""
        if self.backend != "static":
            return model_window
        return min(model_window, self.static.max_len or STATIC_DEFAULT_MAX_LEN)

    def backend_options(self) -> dict:
        """Keyword arguments of the chosen backend beyond the common ones."""
        return {**self.static.model_dump(), "max_batch": self.max_batch_size} if self.backend == "static" else {}


class RouterConfig(StrictModel):
    """The router deployment: gRPC ingress and the draft-then-verify loop. Holds no model."""

    placement: Placement = Field(default_factory=Placement, description="Where each router replica runs.")
    replicas: Replicas = Field(default_factory=Replicas, description="Router replica bounds.")
    max_ongoing_requests: int = Field(64, ge=1, description="Concurrent requests a router replica accepts.")
    tier_call_timeout_s: float = Field(
        60.0, gt=0, description="Longest a tier call waits on a replica whose model runs no pass (stuck) before "
                                "it is retried; on a replica still running passes (busy) the call keeps waiting.")
    tier_call_attempts: int = Field(
        3, ge=1, le=20, description="Tries per tier call; a failed or timed-out call is retried (recomputed).")
    tier_down_cooldown_s: float = Field(
        10.0, ge=0, description="After a tier is found without running replicas, how long to answer "
                                "UNAVAILABLE (or decode expert-only) without trying it again.")
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600,
        description="When a router replica stops (scale-down, upgrade, deletion), Serve sends it no new requests "
                    "and waits up to this long for its streams to finish before it ends; a stream still running "
                    "then breaks off and its client resumes it on another replica (resume tokens).")
    allocator: AllocatorName = Field(
        "auto", description="The C allocator of the router replica's process, as a tier's (TierConfig.allocator; "
                            "on glibc the mmap threshold is pinned). With calls over gRPC the tiers' answers, whole "
                            "probability rows of ~1.5 MB included, are allocated from it.")
    tier_transport: TierTransport = Field(
        "direct", description="How the router's calls reach the tiers. direct: a session's first call to a tier goes "
                            "through Serve, which places it on a replica (session affinity); its later calls go "
                            "straight to that replica's own endpoint (a TCP port each tier replica opens: serving/direct.py), and back "
                            "through Serve if it cannot be reached. grpc: every call through Serve's gRPC channel to "
                            "the replica (each call's payload in its message). ray: Ray actor calls, where a payload over 100 KiB "
                            "(whole probability rows: the opt rule, unfiltered sampling, logprobs of a mixed target) "
                            "is put into Ray's shared-memory object store on its way.")
    resume_key_file: str | None = Field(
        None, description="File holding the key (at least 32 bytes) that signs streams' resume tokens, the same "
                          "for every router replica (the Helm chart mounts it from a Secret). Unset: a random key is "
                          "drawn once per Ray cluster and shared by the application's router replicas; tokens then "
                          "stop verifying when the cluster is replaced (a RayService upgrade), and a resume is "
                          "refused.")


def _alpha_ranges_schema(schema: dict) -> None:
    """ALPHA_RANGES as JSON Schema conditions on `alpha`, one per rule (and the default rule's when
    `rule` is left out), so the Helm chart's values.schema.json refuses what validate_alpha does."""

    def bounded(rule: Rule) -> dict:
        allowed = ALPHA_RANGES[rule]
        upper = "maximum" if allowed.high_inclusive else "exclusiveMaximum"
        return {"properties": {"alpha": {"minimum": allowed.low, upper: allowed.high}}}

    conditions = [{"if": {"properties": {"rule": {"const": rule.value}}, "required": ["rule"]}, "then": bounded(rule)}
                  for rule in ALPHA_RANGES]
    conditions.append({"if": {"not": {"required": ["rule"]}}, "then": bounded(Rule.parse(DEFAULT_RULE))})
    schema["allOf"] = conditions


class CascadePolicy(StrictModel):
    """Defaults for requests that do not set their own policy, and the limits requests must obey."""

    model_config = ConfigDict(json_schema_extra=_alpha_ranges_schema)

    rule: Rule = Field(DEFAULT_RULE, description="Default deferral rule.")
    alpha: float = Field(DEFAULT_ALPHA, description="Default alpha for the default rule.")
    block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=1, le=MAX_BLOCK_SIZE, description="Default block size gamma.")
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS_CAP, description="Default max_new_tokens.")
    max_new_tokens_cap: int = Field(2048, ge=1, le=MAX_NEW_TOKENS_CAP, description="Largest max_new_tokens allowed.")
    pipeline: Pipeline = Field(
        Pipeline.AUTO, description="Default pipelining: the drafter drafts the next block while the expert verifies "
                                   "(on, off, or auto: on while a session's pre-drafts hit and the drafter tier has "
                                   "room, and never where the tiers' passes take turns on shared cores, "
                                   "`cpu_lock_file`). The output is the same either way.")

    @model_validator(mode="after")
    def _consistent(self) -> "CascadePolicy":
        validate_alpha(self.rule, self.alpha)
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} is above max_new_tokens_cap={self.max_new_tokens_cap}"
            )
        return self


class TenancyConfig(StrictModel):
    """Who may call, and how the deployment is shared (see `speccascade.tenancy`)."""

    tenants_file: str | None = Field(
        None, description="Path of the tenants file (YAML, edited with `speccascade tenants`; the Helm chart mounts "
                          "it from a Secret). Unset: every call is answered without a key, and the router says so "
                          "at start.")
    reload_period_s: float = Field(
        5.0, gt=0, le=3600, description="How often each router replica looks for a changed tenants file, traffic "
                                        "or none (a mounted Secret changes in place): every route, the model list "
                                        "included, sees a change within this period. A broken file keeps the last "
                                        "good tenants.")
    fair_share: bool = Field(
        True, description="Weighted fair queueing across tenants in the router's admission and the tiers' batch "
                          "forming, by each tenant's weight; false: first come, first served.")
    max_decoding_requests: int = Field(
        32, ge=1, description="Requests one router replica decodes at once; more wait in the router and are let in "
                              "by fair share (keep it below router.max_ongoing_requests so they can wait there).")
    quota_scope: Literal["application", "replica"] = Field(
        "application", description="Where tenants' quotas (concurrency, output tokens per minute) are counted: "
                                   "`application`, in one ledger all router replicas share (a named Ray actor), so "
                                   "the limits hold for the application; `replica`, by each router replica alone "
                                   "(with R replicas a tenant gets up to R times its limits).")
    quota_ledger_unreachable: Literal["open", "closed"] = Field(
        "open", description="When the shared quota ledger does not answer: `open` admits by the router replica's own "
                            "count and logs it; `closed` refuses the request (UNAVAILABLE / HTTP 503, with a retry "
                            "hint).")
    quota_ledger_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Longest a router waits for the shared quota ledger's answer to an admission.")


class AppConfig(StrictModel):
    """The whole speccascade Serve application (the `args` of `speccascade.app:build_app`)."""

    drafter: TierConfig = Field(default_factory=lambda: TierConfig(model=DRAFTER_DEFAULT),
                                description="The drafter tier (small model, cheap accelerators).")
    expert: TierConfig = Field(default_factory=lambda: TierConfig(model=EXPERT_DEFAULT),
                               description="The expert tier (large model, large accelerators).")
    router: RouterConfig = Field(default_factory=RouterConfig, description="The router / gRPC ingress.")
    policy: CascadePolicy = Field(default_factory=CascadePolicy, description="Default cascade policy and limits.")
    tenancy: TenancyConfig = Field(default_factory=TenancyConfig, description="Tenants, their keys and fair share.")

    @property
    def tiers_take_turns(self) -> bool:
        """Whether the drafter's and the expert's passes take turns on shared cores (both tiers lock
        the same `cpu_lock_file`): then a drafter pass never runs while an expert pass does."""
        return self.drafter.cpu_lock_file is not None and self.drafter.cpu_lock_file == self.expert.cpu_lock_file

    @model_validator(mode="after")
    def _tenants_can_wait_in_the_router(self) -> "AppConfig":
        if self.tenancy.max_decoding_requests > self.router.max_ongoing_requests:
            raise ValueError(
                f"tenancy.max_decoding_requests={self.tenancy.max_decoding_requests} is above "
                f"router.max_ongoing_requests={self.router.max_ongoing_requests}: requests past the router's "
                "limit would queue in Serve, where fair share cannot order them")
        return self

    @model_validator(mode="after")
    def _static_slots_hold_every_session(self) -> "AppConfig":
        # A replica can hold a cache for every request a router decodes at once; with fewer slots
        # the sessions would evict each other and recompute their contexts on every call.
        for name in ("drafter", "expert"):
            tier = getattr(self, name)
            if tier.backend == "static" and tier.static.slots < self.tenancy.max_decoding_requests:
                raise ValueError(
                    f"{name}.static.slots={tier.static.slots} is below tenancy.max_decoding_requests="
                    f"{self.tenancy.max_decoding_requests}: a replica must hold a slot for every session a router "
                    f"decodes at once (raise static.slots or lower tenancy.max_decoding_requests)")
        return self
