"""Running the trade-off benchmark: one (configuration, problem) at a time, on one loaded pair.

Every finished pair is appended to a JSONL file at once, so an interrupted run loses at most the
pair in progress and a rerun skips what is there. Besides outputs, a run measures the drafter's
per-step cost relative to the expert's (c), which turns pass counts into a machine-independent
cost: drafter passes * c + expert passes.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..humaneval import STOP_SEQUENCES, Problem, check_completion, truncate_at_stop
from .configs import HF_ASSISTED, BenchConfig
from .records import MEASURED

# Decode steps timed per model when measuring c, after a prefill of the calibration prompt.
CALIBRATION_STEPS = 16
CALIBRATION_REPEATS = 3


@dataclass(frozen=True)
class Completion:
    """What one method produced for one prompt, and what it cost."""

    text: str  # cut at the first stop sequence
    token_ids: list[int]  # generated tokens (may run past the cut)
    finish_reason: str
    wall_seconds: float
    drafter_passes: int
    expert_passes: int
    stats: dict  # method-specific counters (engine GenerationStats for engine methods)


def problem_seed(base_seed: int, problem_index: int) -> int:
    """Same seed for a problem under every configuration (common random numbers)."""
    return (base_seed * 1_000_003 + problem_index) % (1 << 63)


def generate_with_engine(engine, config: BenchConfig, prompt: str, seed: int) -> Completion:
    result = engine.generate(config.request(prompt, seed=seed, stop=STOP_SEQUENCES))
    stats = result.stats
    return Completion(
        text=truncate_at_stop(result.text), token_ids=list(result.token_ids), finish_reason=result.finish_reason,
        wall_seconds=stats.wall_seconds, drafter_passes=stats.drafter_passes, expert_passes=stats.expert_passes,
        stats=stats.as_dict(),
    )


class _ForwardCounter:
    """Counts top-level forward calls of a module while active."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls = 0
        self._handle = None

    def __enter__(self) -> "_ForwardCounter":
        def count(*_):
            self.calls += 1

        self._handle = self.module.register_forward_hook(count)
        return self

    def __exit__(self, *_) -> None:
        self._handle.remove()


def hf_generation_config(config: BenchConfig, eos_ids: Iterable[int], pad_id: int):
    """transformers settings matching the engine's: same token budget and sampling (no top-k, no
    repetition penalty). Stop strings are not set here: see `hf_stop_criteria`."""
    from transformers import GenerationConfig

    sampling = config.sampling_params
    options = dict(max_new_tokens=config.max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=pad_id,
                   repetition_penalty=1.0)
    if sampling.is_greedy:
        return GenerationConfig(do_sample=False, **options)
    return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                            **options)


@functools.lru_cache(maxsize=4)
def hf_stop_criteria(tokenizer):
    """The stop sequences as a stopping criterion for the expert's loop only. (transformers 5.23
    copies a `stop_strings` generation setting into the assistant's own `generate` call, which has
    no tokenizer and raises; the drafter needs no stop test anyway, the expert checks every round.)
    Cached per tokenizer: building it scans the whole vocabulary (~3 s for Qwen's)."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    return StoppingCriteriaList([StopStringCriteria(tokenizer=tokenizer, stop_strings=list(STOP_SEQUENCES))])


def configure_assistant(drafter_model, block_size: int) -> None:
    """A fixed draft length of gamma tokens per round, like the engine's: constant schedule, and the
    confidence-based early stop of drafting (on by default, threshold 0.4) turned off."""
    assistant = drafter_model.generation_config
    assistant.num_assistant_tokens = block_size
    assistant.num_assistant_tokens_schedule = "constant"
    assistant.assistant_confidence_threshold = 0.0


def generate_with_hf_assisted(engine, config: BenchConfig, prompt: str, seed: int) -> Completion:
    """`expert.generate(..., assistant_model=drafter)`: transformers' assisted generation."""
    tokenizer = engine.tokenizer
    expert_model, drafter_model = engine.expert.model, engine.drafter.model
    configure_assistant(drafter_model, config.block_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(engine.eos_ids)
    generation_config = hf_generation_config(config, engine.eos_ids, pad_id)
    stop_criteria = hf_stop_criteria(tokenizer)  # built outside the timed region
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)
    torch.manual_seed(seed)
    with _ForwardCounter(drafter_model) as drafter_calls, _ForwardCounter(expert_model) as expert_calls:
        started = time.perf_counter()
        with torch.inference_mode():
            sequences = expert_model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config,
                assistant_model=drafter_model, stopping_criteria=stop_criteria,
            )
        wall = time.perf_counter() - started
    new_ids = sequences[0, input_ids.shape[1]:].tolist()
    finish_reason = "length" if len(new_ids) >= config.max_new_tokens else "stop"
    # EOS ends the output and is not part of it; padding never is.
    for i, token in enumerate(new_ids):
        if token in engine.eos_ids:
            new_ids, finish_reason = new_ids[:i], "stop"
            break
    text = truncate_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True))
    return Completion(
        text=text, token_ids=new_ids, finish_reason=finish_reason, wall_seconds=wall,
        drafter_passes=drafter_calls.calls, expert_passes=expert_calls.calls,
        stats={"drafter_passes": drafter_calls.calls, "expert_passes": expert_calls.calls},
    )


def tokens_covering(tokenizer, token_ids: list[int], text: str) -> list[int]:
    """The shortest prefix of `token_ids` whose decoding covers `text` (the completion after
    cutting at a stop sequence): the tokens that produced the kept text."""
    if not text:
        return []
    for k in range(1, len(token_ids) + 1):
        if len(tokenizer.decode(token_ids[:k], skip_special_tokens=True)) >= len(text):
            return token_ids[:k]
    return list(token_ids)


@torch.inference_mode()
def expert_mean_logprob(expert_model, prompt_ids: list[int], completion_ids: list[int]) -> float | None:
    """The expert's mean log-probability (temperature 1) per completion token, in one forward pass;
    None for an empty completion."""
    n = len(completion_ids)
    if n == 0:
        return None
    from ...engine.backends.base import logits_to_keep

    input_ids = torch.tensor([prompt_ids + completion_ids], dtype=torch.long)
    # Logits at positions len(prompt)-1 .. end-1 predict the completion tokens.
    keep = logits_to_keep(input_ids.shape[1], n + 1, input_ids.device)
    logits = expert_model(input_ids=input_ids, logits_to_keep=keep).logits[0, :-1].float()  # [n, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(completion_ids, dtype=torch.long)
    return float(logprobs.gather(-1, targets.unsqueeze(-1)).mean())


def run_one(engine, config: BenchConfig, problem: Problem, seed: int, *, run_id: str, timeout: float,
            memory_mb: int) -> dict:
    """Generate, check and score one (configuration, problem) alone; the JSONL record."""
    if config.method == HF_ASSISTED:
        completion = generate_with_hf_assisted(engine, config, problem.prompt, seed)
    else:
        completion = generate_with_engine(engine, config, problem.prompt, seed)
    return make_record(engine, config, problem, seed, completion, run_id=run_id, timeout=timeout,
                       memory_mb=memory_mb)


def completion_of(result, latency_s: float) -> Completion:
    """An engine result as a Completion whose latency is `latency_s` (a batched request's modelled
    single-stream latency: its own clock ran while other requests shared its passes)."""
    stats = result.stats
    return Completion(
        text=truncate_at_stop(result.text), token_ids=list(result.token_ids), finish_reason=result.finish_reason,
        wall_seconds=latency_s, drafter_passes=stats.drafter_passes, expert_passes=stats.expert_passes,
        stats=stats.as_dict(),
    )


def make_record(engine, config: BenchConfig, problem: Problem, seed: int, completion: Completion, *, run_id: str,
                timeout: float, memory_mb: int, latency: str = MEASURED) -> dict:
    """Check and score a completion; the JSONL record. `latency`: whether its wall_seconds were
    measured (decoded alone) or modelled (decoded in a batch: `engine.batch`)."""
    execution = check_completion(problem, completion.text, timeout=timeout, memory_mb=memory_mb)
    prompt_ids = list(engine.tokenizer(problem.prompt)["input_ids"])
    scored = tokens_covering(engine.tokenizer, completion.token_ids, completion.text)
    return {
        "config": config.key, "task_id": problem.task_id, "method": config.method, "alpha": config.alpha,
        "sampling": config.sampling, "block_size": config.block_size, "max_new_tokens": config.max_new_tokens,
        "seed": seed, "run_id": run_id,
        "completion": completion.text, "finish_reason": completion.finish_reason,
        "generated_tokens": len(completion.token_ids), "scored_tokens": len(scored),
        "passed": execution.passed, "outcome": execution.outcome.value, "exec_detail": execution.detail[-200:],
        "expert_mean_logprob": expert_mean_logprob(engine.expert.model, prompt_ids, scored),
        "wall_seconds": completion.wall_seconds, "latency": latency,
        "drafter_passes": completion.drafter_passes, "expert_passes": completion.expert_passes,
        "stats": completion.stats,
        "drafter_model": engine.drafter.name, "expert_model": engine.expert.name, "dtype": str(engine.expert.dtype),
        "backend": engine.expert.kind,
    }


def measure_step_cost(engine, prompt: str, *, steps: int = CALIBRATION_STEPS,
                      repeats: int = CALIBRATION_REPEATS) -> dict:
    """c = drafter step / expert step for one-token decode steps after a prefill of `prompt`.

    The two models' steps alternate one by one and c is the median of the per-pair ratios, so a
    change in machine load (the machine may be shared) hits both sides of each ratio alike."""
    prompt_ids = list(engine.tokenizer(prompt)["input_ids"])
    drafter_times, expert_times = [], []
    for _ in range(repeats):
        sessions = {runner: runner.new_session() for runner in (engine.drafter, engine.expert)}
        tokens = list(prompt_ids)
        for runner, session in sessions.items():
            runner.next_distribution(session, tokens)  # prefill, not timed
        for _ in range(steps):
            tokens.append(int(tokens[-1]))  # any token will do; a repeat keeps both models in-vocabulary
            for runner, times in ((engine.drafter, drafter_times), (engine.expert, expert_times)):
                started = time.perf_counter()
                runner.next_distribution(sessions[runner], tokens)
                times.append(time.perf_counter() - started)
    ratios = [d / e for d, e in zip(drafter_times, expert_times)]
    return {"drafter_step_ms": 1e3 * statistics.median(drafter_times),
            "expert_step_ms": 1e3 * statistics.median(expert_times),
            "c": statistics.median(ratios), "steps": len(ratios), "method": "paired-steps"}


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg())}
