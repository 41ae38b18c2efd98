"""Several sessions' scoring calls in one forward pass.

`ModelRunner.distributions` scores one session: it keeps the cached common prefix and runs the
model on the rest. Here the same plan is made per session, and the uncached parts of all sessions
run together. Sessions differ in cached length L_i and new-token count n_i, so each row is laid
out as

    [pad] * (L_max - L_i) + cache_i + [pad] * (n_max - n_i) + new_i

with padding masked out of attention and explicit position ids, so each real token sees exactly
its own sequence. Afterwards each session's cache is cut back out of the batched one (pads
dropped). In fp32 the results match single-session passes up to float rounding (different matmul
shapes), which is why a batch of one takes the single-session path unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cascade import logits_to_probs
from ..engine.runner import KVSession, ModelRunner, common_prefix_length

PAD_TOKEN = 0  # any valid id: padded positions are masked out and their outputs discarded


@dataclass
class ScoreJob:
    session: KVSession
    tokens: Sequence[int]
    start: int


@dataclass
class _Plan:
    job: ScoreJob
    first_row: Tensor | None  # [V] reused from the cache, if scoring starts where it ends
    new_tokens: list[int]
    rows_needed: int  # rows to take from this pass's logits


def _plan(runner: ModelRunner, job: ScoreJob) -> _Plan:
    """The single-session plan of ModelRunner.distributions: crop to the reusable prefix."""
    session, tokens, start = job.session, job.tokens, job.start
    if not 1 <= start <= len(tokens):
        raise ValueError(f"start={start} must be in [1, {len(tokens)}] for {len(tokens)} tokens")
    common = common_prefix_length(session.tokens, tokens)
    first_row = None
    if common == session.cached_length == start and session.last_row is not None:
        first_row, keep = session.last_row, start
    else:
        keep = min(common, start - 1)
    runner._crop(session, keep)
    rows_wanted = len(tokens) - start + 1
    return _Plan(job, first_row, list(tokens[keep:]), rows_wanted - (1 if first_row is not None else 0))


def _layer_tensors(session: KVSession) -> list[tuple[Tensor, Tensor]]:
    if session.cached_length == 0:
        return []
    return [(layer.keys, layer.values) for layer in session.cache.layers]


@torch.inference_mode()
def distributions_batch(runner: ModelRunner, jobs: list[ScoreJob]) -> list[Tensor]:
    """For each job, what `runner.distributions(job.session, job.tokens, job.start)` returns."""
    if len(jobs) == 1 or len({id(j.session) for j in jobs}) < len(jobs):
        return [runner.distributions(j.session, j.tokens, j.start) for j in jobs]
    plans = [_plan(runner, job) for job in jobs]
    results: dict[int, Tensor] = {}
    to_run = []
    for i, plan in enumerate(plans):
        if plan.new_tokens:
            to_run.append(i)
        else:
            results[i] = plan.first_row.unsqueeze(0)
    if len(to_run) == 1:
        i = to_run[0]
        results[i] = runner.distributions(jobs[i].session, jobs[i].tokens, jobs[i].start)
    elif to_run:
        for i, rows in zip(to_run, _run_padded(runner, [plans[i] for i in to_run])):
            results[i] = rows
    return [results[i] for i in range(len(jobs))]


def _run_padded(runner: ModelRunner, plans: list[_Plan]) -> list[Tensor]:
    from transformers import DynamicCache

    batch = len(plans)
    cached = [p.job.session.cached_length for p in plans]
    new = [len(p.new_tokens) for p in plans]
    l_max, n_max = max(cached), max(new)

    past = DynamicCache(config=runner.config)
    if l_max:
        per_session = [_layer_tensors(p.job.session) for p in plans]
        num_layers = max(len(t) for t in per_session)
        for layer in range(num_layers):
            keys, values = [], []
            for tensors, length in zip(per_session, cached):
                k, v = tensors[layer] if tensors else (None, None)
                shape = k.shape if k is not None else next(t[layer][0].shape for t in per_session if t)
                pad_shape = (1, shape[1], l_max - length, shape[3])
                pad = torch.zeros(pad_shape, dtype=runner.dtype)
                keys.append(torch.cat([pad, k], dim=2) if k is not None else pad)
                values.append(torch.cat([pad, v], dim=2) if v is not None else pad)
            past.update(torch.cat(keys), torch.cat(values), layer)

    input_ids = torch.full((batch, n_max), PAD_TOKEN, dtype=torch.long)
    position_ids = torch.zeros((batch, n_max), dtype=torch.long)  # padded queries: output discarded
    attention_mask = torch.zeros((batch, l_max + n_max), dtype=torch.long)
    for row, (plan, length, count) in enumerate(zip(plans, cached, new)):
        input_ids[row, n_max - count:] = torch.tensor(plan.new_tokens)
        position_ids[row, n_max - count:] = torch.arange(length, length + count)
        attention_mask[row, l_max - length: l_max] = 1
        attention_mask[row, l_max + n_max - count:] = 1
    logits_needed = max(p.rows_needed for p in plans)
    out = runner.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past, use_cache=True, logits_to_keep=logits_needed,
    )
    runner.forward_calls += 1

    results = []
    for row, (plan, length, count) in enumerate(zip(plans, cached, new)):
        session = plan.job.session
        rebuilt = DynamicCache(config=runner.config)
        for layer_index, layer in enumerate(past.layers):
            keep = [slice(l_max - length, l_max), slice(l_max + n_max - count, l_max + n_max)]
            k = torch.cat([layer.keys[row: row + 1, :, s] for s in keep], dim=2)
            v = torch.cat([layer.values[row: row + 1, :, s] for s in keep], dim=2)
            rebuilt.update(k.contiguous(), v.contiguous(), layer_index)
        session.cache = rebuilt
        session.tokens.extend(plan.new_tokens)
        rows = logits_to_probs(out.logits[row, -plan.rows_needed:])  # [rows_needed, V]
        session.last_row = rows[-1]
        if plan.first_row is not None:
            rows = torch.cat([plan.first_row.unsqueeze(0), rows], dim=0)
        results.append(rows)
    return results
