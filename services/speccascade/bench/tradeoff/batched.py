"""`bench tradeoff --batch N`: the engine configurations' (configuration, problem) pairs decoded N
at a time through the one loaded pair (`engine.batch.generate_many`), so a sweep costs a fraction
of running every pair alone.

Outputs are those of decoding alone (each request's draws are keyed by its own seed). Latency is
not: a batched request's clock runs while others share its passes. Each record's `wall_seconds` is
therefore its modelled single-stream latency (`latency: "modelled"`): its prompt prefills, run
alone and measured, plus each of its calls at the single-stream cost of a call of its size
(`engine.batch.CallCosts`, measured at the start of the run for each kind of request). hf-assisted
always runs alone (measured). `--latency-sample K` then decodes K batched pairs alone again, one
configuration after another in turn, and `latency_check.jsonl` holds modelled against measured
latency and whether the outputs were identical; the report prints the check and the batching's
throughput gain (`batched_runs.jsonl`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from ...engine.batch import CallCosts, generate_many
from ..humaneval import STOP_SEQUENCES
from .configs import BenchConfig
from .records import (
    BATCHED_RUNS_FILE,
    LATENCY_CHECK_FILE,
    MODELLED,
    RECORDS_FILE,
    RecordStore,
    append_jsonl,
    read_jsonl,
)
from .run import completion_of, describe_machine, generate_with_engine, make_record, problem_seed, run_one


def cost_key(config: BenchConfig) -> tuple:
    """Requests whose calls cost alike: same method, rule, sampling and block size (alpha aside)."""
    request = config.request("x", seed=0, stop=())
    return request.method, request.rule, config.sampling, config.block_size


def run_batched(engine, todo: list, *, concurrency: int, base_seed: int, run_id: str, out: Path, store: RecordStore,
                timeout: float, memory_mb: int, latency_sample: int = 0, progress: bool = True) -> None:
    """Run the (problem index, problem, configuration) pairs of `todo`: engine ones batched, the
    rest alone; then the latency check on `latency_sample` of the batched ones."""
    from tqdm import tqdm

    batched = [item for item in todo if item[2].uses_engine]
    alone = [item for item in todo if not item[2].uses_engine]
    costs: dict[tuple, CallCosts] = {}
    if batched:
        first_index, first_problem, _ = batched[0]
        kinds = {cost_key(config): config for _, _, config in batched}
        for key, config in tqdm(kinds.items(), desc="single-stream call costs", unit="kind", disable=not progress,
                                dynamic_ncols=True):
            request = config.request(first_problem.prompt, seed=problem_seed(base_seed, first_index),
                                     stop=STOP_SEQUENCES)
            costs[key] = CallCosts.measure(engine, engine.prepare(request)[0], request)
        requests = [config.request(problem.prompt, seed=problem_seed(base_seed, index), stop=STOP_SEQUENCES)
                    for index, problem, config in batched]
        bar = tqdm(total=len(batched), desc=f"tradeoff, {concurrency} at a time", unit="gen", disable=not progress,
                   dynamic_ncols=True)
        failures: list[str] = []
        modelled_total = 0.0
        evaluation_s = 0.0

        def done(position: int, generation) -> None:
            nonlocal modelled_total, evaluation_s
            index, problem, config = batched[position]
            if generation.error is not None:
                failures.append(f"{config.key} {problem.task_id}: {generation.error!r}")
                bar.update()
                return
            started = time.perf_counter()
            latency = costs[cost_key(config)].model(generation.calls)
            modelled_total += latency
            record = make_record(engine, config, problem, problem_seed(base_seed, index),
                                 completion_of(generation.result, latency), run_id=run_id, timeout=timeout,
                                 memory_mb=memory_mb, latency=MODELLED)
            record["batched_wall_seconds"] = generation.result.stats.wall_seconds
            record["prefill_seconds"] = generation.calls.prefill_s
            store.add(record)
            evaluation_s += time.perf_counter() - started
            bar.set_postfix_str(f"{problem.task_id} {config.label} {config.sampling}")
            bar.update()

        _, stats = generate_many(engine, requests, concurrency=concurrency, on_done=done)
        bar.close()
        decode_s = max(stats.wall_s - evaluation_s, 1e-9)
        append_jsonl(out / BATCHED_RUNS_FILE, {
            "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "concurrency": concurrency, "requests": len(batched), "failed": len(failures), **stats.as_dict(),
            "evaluation_s": evaluation_s, "decode_s": decode_s, "modelled_single_stream_s": modelled_total,
            "throughput_gain": modelled_total / decode_s,
            "costs": {" ".join(map(str, key)): value.as_dict() for key, value in costs.items()},
            "machine": describe_machine(),
        })
        print(f"batched: {len(batched) - len(failures)} generations in {stats.wall_s:.0f} s ({decode_s:.0f} s decoding, "
              f"the rest checking and scoring), {modelled_total:.0f} s alone by the model: "
              f"{modelled_total / decode_s:.2f}x the single-stream throughput; expert calls per pass "
              f"{stats.calls_per_batch('expert'):.1f}", flush=True)
        if failures:
            raise RuntimeError(f"{len(failures)} batched generation(s) failed (the others are recorded; a rerun "
                               f"retries these): " + "; ".join(failures[:5]))
    for index, problem, config in alone:
        store.add(run_one(engine, config, problem, problem_seed(base_seed, index), run_id=run_id, timeout=timeout,
                          memory_mb=memory_mb))
    if latency_sample and batched:
        check_latency(engine, batched, sample=latency_sample, base_seed=base_seed, run_id=run_id, out=out,
                      progress=progress)


def latency_sample_of(batched: list, sample: int) -> list:
    """`sample` of the batched pairs, taking each configuration in turn (its first problem not yet
    taken), so every configuration is checked as evenly as the sample allows."""
    by_config: dict[str, list] = defaultdict(list)
    for item in batched:
        by_config[item[2].key].append(item)
    queues = list(by_config.values())
    chosen: list = []
    while len(chosen) < sample and any(queues):
        for queue in queues:
            if queue and len(chosen) < sample:
                chosen.append(queue.pop(0))
    return chosen


def check_latency(engine, batched: list, *, sample: int, base_seed: int, run_id: str, out: Path,
                  progress: bool = True) -> list[dict]:
    """Decode a sample of the batched pairs alone, one configuration after another; modelled vs
    measured latency, and whether the output is the batched one."""
    from tqdm import tqdm

    modelled = {(r["config"], r["task_id"]): r for r in read_jsonl(out / RECORDS_FILE) if r.get("run_id") == run_id}
    rows = []
    for index, problem, config in tqdm(latency_sample_of(batched, sample), desc="latency check (alone)", unit="gen",
                                       disable=not progress, dynamic_ncols=True):
        record = modelled.get((config.key, problem.task_id))
        if record is None:  # its batched generation failed
            continue
        completion = generate_with_engine(engine, config, problem.prompt, problem_seed(base_seed, index))
        row = {"run_id": run_id, "config": config.key, "method": config.method, "task_id": problem.task_id,
               "modelled_s": record["wall_seconds"], "measured_s": completion.wall_seconds,
               "ratio": record["wall_seconds"] / completion.wall_seconds,
               "identical": completion.text == record["completion"]
               and len(completion.token_ids) == record["generated_tokens"]}
        append_jsonl(out / LATENCY_CHECK_FILE, row)
        rows.append(row)
    return rows
