"""Grouped-query attention inside SDPA on the CPU (`engine/backends/attention.py`): a CPU backend
of a grouped-query model switches to it, its outputs are those of transformers' own `sdpa`
attention (which copies each key/value head per query head when a batch is masked; in bf16 a few
query tokens a row are computed in fp32 instead, within bf16's rounding of the exact figures), and
models it does not apply to are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from speccascade.engine.backends import ScoreJob, backend_class
from speccascade.engine.backends.attention import (
    IMPLEMENTATION,
    SHORT_QUERY_TOKENS,
    grouped_query_sdpa,
    short_query_attention,
    use_grouped_query_sdpa,
)
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


@pytest.mark.parametrize("new_tokens", [1, 6])
def test_grouped_query_sdpa_gives_transformers_sdpa_outputs(new_tokens):
    reference = tiny_qwen2(300, seed=5).eval()
    assert reference.config._attn_implementation == "sdpa"
    grouped = copy.deepcopy(reference)
    assert use_grouped_query_sdpa(grouped) and grouped.config._attn_implementation == IMPLEMENTATION
    with torch.inference_mode():
        expected = _padded_batch(reference, new_tokens=new_tokens, dtype=torch.float32)
        got = _padded_batch(grouped, new_tokens=new_tokens, dtype=torch.float32)
    if new_tokens > 1:  # transformers copied the heads (repeat_kv): the same numbers, bit for bit
        assert torch.equal(got, expected)
    else:  # transformers regrouped the one query token instead: the same up to rounding
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_tokens", [1, 6])
def test_grouped_query_sdpa_in_bf16_is_as_close_to_the_exact_pass_as_transformers(new_tokens):
    """In bf16 a few query tokens a row take the fp32 way: the logits differ from transformers'
    bf16 ones by rounding (a random tiny model amplifies it), so both are held against the fp32
    pass over the same bf16-rounded weights."""
    weights = tiny_qwen2(300, seed=5).eval().to(torch.bfloat16).to(torch.float32)
    grouped = copy.deepcopy(weights)
    assert use_grouped_query_sdpa(grouped)
    with torch.inference_mode():
        exact = _padded_batch(copy.deepcopy(weights), new_tokens=new_tokens, dtype=torch.float32)
        transformers_bf16 = _padded_batch(copy.deepcopy(weights), new_tokens=new_tokens, dtype=torch.bfloat16)
        ours = _padded_batch(grouped, new_tokens=new_tokens, dtype=torch.bfloat16)
    ours_error, their_error = ((x.float() - exact).abs() for x in (ours, transformers_bf16))
    assert ours_error.mean() <= 1.1 * their_error.mean()
    assert ours_error.max() <= 1.1 * their_error.max()


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


def _left_padded_attention(batch: int, q_length: int, *, dtype: torch.dtype, heads: int = 6, kv_heads: int = 2,
                           k_length: int = 40, dim: int = 16, seed: int = 0):
    """Random query/key/value of a grouped-query layer and the boolean mask of a left-padded batch
    whose rows' caches differ in length (row r lacks its first 5r positions), causal within the
    query tokens."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, q_length, dim, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, k_length, dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, k_length, dim, generator=generator).to(dtype)
    mask = torch.ones(batch, 1, q_length, k_length, dtype=torch.bool).tril(k_length - q_length)
    for row in range(batch):
        mask[row, :, :, : 5 * row] = False
    return query, key, value, mask


def _exact(query, key, value, mask) -> torch.Tensor:
    """The attention in float64 over the same (rounded) inputs, heads repeated as transformers does."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.double().repeat_interleave(group, dim=1) for t in (key, value))
    scores = query.double() @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value


@pytest.mark.parametrize("q_length", [1, 6])
def test_short_query_attention_is_the_exact_attention_rounded_once(q_length):
    query, key, value, mask = _left_padded_attention(4, q_length, dtype=torch.bfloat16)
    exact = _exact(query, key, value, mask)
    got = short_query_attention(query, key, value, mask)
    assert got.dtype == torch.bfloat16 and got.shape == query.shape
    # fp32 throughout, one rounding to bf16 at the end: within half a bf16 step (2^-9 relative).
    torch.testing.assert_close(got.double(), exact, rtol=2 ** -8, atol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    assert (got.double() - exact).abs().max() <= (sdpa.double() - exact).abs().max()
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")).to(torch.bfloat16)
    assert torch.equal(short_query_attention(query, key, value, additive), got)


def test_a_query_with_nothing_to_attend_stays_finite():
    query, key, value, mask = _left_padded_attention(2, 1, dtype=torch.bfloat16)
    mask[1] = False  # a padding row of a batch: every key masked
    got = short_query_attention(query, key, value, mask, 0.25)
    assert torch.isfinite(got).all()
    uniform = value[1].float().mean(dim=1)  # [KV, D]: each key/value head's values, averaged
    torch.testing.assert_close(got[1].float(), uniform.repeat_interleave(3, dim=0)[:, None].expand_as(got[1].float()),
                               rtol=2 ** -8, atol=1e-5)


@pytest.mark.parametrize("dtype,q_length,short", [
    (torch.bfloat16, 1, True), (torch.bfloat16, SHORT_QUERY_TOKENS, True),
    (torch.bfloat16, SHORT_QUERY_TOKENS + 1, False), (torch.float32, 1, False), (torch.float32, 6, False)])
def test_which_way_a_pass_is_computed(dtype, q_length, short):
    query, key, value, mask = _left_padded_attention(3, q_length, dtype=dtype)
    got, _ = grouped_query_sdpa(torch.nn.Module(), query, key, value, mask)
    if short:
        expected = short_query_attention(query, key, value, mask)
    else:
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                    enable_gqa=True)
    assert torch.equal(got, expected.transpose(1, 2).contiguous())
