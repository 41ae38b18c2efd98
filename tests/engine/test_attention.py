"""Grouped-query attention inside SDPA on the CPU (`engine/backends/attention.py`): a CPU backend
of a grouped-query model switches to it, its outputs are those of transformers' own `sdpa`
attention (which copies each key/value head per query head when a batch is masked), and models it
does not apply to are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from speccascade.engine.backends import ScoreJob, backend_class
from speccascade.engine.backends.attention import IMPLEMENTATION, grouped_query_sdpa, use_grouped_query_sdpa
from speccascade.engine.backends.base import CacheKwargs

from ..conftest import tiny_qwen2


def _padded_batch(model, *, new_tokens: int, dtype: torch.dtype):
    """Two rows of different lengths, left-padded and masked, after a cached prefix: the masked,
    grouped case (4 query heads, 2 key/value heads), `new_tokens` query tokens a row."""
    from transformers import DynamicCache

    model = model.to(dtype)
    torch.manual_seed(0)
    prefix = torch.randint(3, 300, (2, 20))
    mask = torch.ones(2, 20 + new_tokens, dtype=torch.long)
    mask[1, :7] = 0  # row 1 is 7 tokens shorter
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, attention_mask=mask[:, :20], position_ids=positions[:, :20], use_cache=True,
          **CacheKwargs.of(model)(cache))
    new = torch.randint(3, 300, (2, new_tokens))
    return model(input_ids=new, attention_mask=mask, position_ids=positions[:, 20:], use_cache=True,
                 **CacheKwargs.of(model)(cache)).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new_tokens", [1, 6])
def test_grouped_query_sdpa_gives_transformers_sdpa_outputs(dtype, new_tokens):
    reference = tiny_qwen2(300, seed=5).eval()
    assert reference.config._attn_implementation == "sdpa"
    grouped = copy.deepcopy(reference)
    assert use_grouped_query_sdpa(grouped) and grouped.config._attn_implementation == IMPLEMENTATION
    with torch.inference_mode():
        expected = _padded_batch(reference, new_tokens=new_tokens, dtype=dtype)
        got = _padded_batch(grouped, new_tokens=new_tokens, dtype=dtype)
    if new_tokens > 1:  # transformers copied the heads (repeat_kv): the same numbers, bit for bit
        assert torch.equal(got, expected)
    else:  # transformers regrouped the one query token instead: the same up to rounding
        torch.testing.assert_close(got, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def _batched_verify_rows(backend) -> list[torch.Tensor]:
    """Three sessions of different lengths prefilled, then a 6-token verify of each in one padded
    (masked) pass."""
    lengths = (9, 14, 5)
    sessions = [backend.new_session() for _ in lengths]
    backend.score([ScoreJob(s, list(range(3, 3 + n)), n) for s, n in zip(sessions, lengths)])
    return backend.score([ScoreJob(s, list(range(3, 3 + n)) + [7, 8, 9, 10, 11, 12], n)
                          for s, n in zip(sessions, lengths)])


def test_a_cpu_backend_of_a_grouped_query_model_uses_it_and_scores_as_before():
    model = tiny_qwen2(300, seed=6)
    reference = copy.deepcopy(model)
    backend = backend_class("hf")(model, name="hf")
    assert backend.grouped_query_sdpa and model.config._attn_implementation == IMPLEMENTATION
    reference_backend = backend_class("hf")(reference, name="reference")
    reference.set_attn_implementation("sdpa")  # back to transformers' own, which copies the heads
    for got, expected in zip(_batched_verify_rows(backend), _batched_verify_rows(reference_backend)):
        assert torch.equal(got, expected)


def test_models_it_does_not_apply_to_are_left_alone():
    ungrouped = tiny_qwen2(300, seed=7)
    ungrouped.config.num_key_value_heads = ungrouped.config.num_attention_heads  # as a config says
    assert not use_grouped_query_sdpa(ungrouped) and ungrouped.config._attn_implementation == "sdpa"
    eager = tiny_qwen2(300, seed=7)
    eager.set_attn_implementation("eager")
    assert not use_grouped_query_sdpa(eager) and eager.config._attn_implementation == "eager"


def test_it_refuses_what_it_does_not_compute():
    query, key = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8)
    with pytest.raises(ValueError, match="neither softcap nor a position bias"):
        grouped_query_sdpa(torch.nn.Module(), query, key, key, None, softcap=30.0)
