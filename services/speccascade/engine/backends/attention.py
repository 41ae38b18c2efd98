"""Grouped-query attention inside SDPA on the CPU, masked or not.

transformers' `sdpa` attention lets `scaled_dot_product_attention` handle grouped-query attention
(several query heads per key/value head) only without a mask (on CUDA a masked GQA call falls back
to the math kernel). With a mask and more than one query token it first copies every key and value
head once per query head of its group (`repeat_kv`). A batched pass of sessions of different
lengths is always masked, so on the CPU a batched verify (γ + 1 query tokens a row) made that copy
in every layer: for Qwen2.5-1.5B (6 query heads per key/value head), 8 rows, ~250 cached tokens,
~50 ms of a ~400 ms pass, over half the attention's time. The CPU's SDPA kernels take the groups
as they are (`enable_gqa`), masked or not, with results identical to the copied heads' (bf16 and
fp32, tests/engine/test_attention.py), at about half the attention's time in that shape.

A few query tokens a row in bf16 (a draft step, a verify) take another way: SDPA's CPU flash kernel
converts every key/value block to fp32 once per query head and query block, so with one query token
it converts the whole cache once per query head (7 times for Qwen2.5-0.5B, 6 for 1.5B) to score one
token: ~2 ms a layer for an 8-row step of the 0.5B over ~300 cached tokens (a quarter of an 8-row
draft block's time with ~200-token contexts, half with ~1,100), against 0.26 ms for the same
numbers by two fp32 matmuls over the grouped heads (keys and values converted once per key/value
head, the query heads of a group stacked as rows). Those scores, softmax and weighted sum are all
fp32, rounded to bf16 once at the end: within the flash kernel's own distance of an fp32
reference, or closer. fp32 models keep SDPA (there it is
as fast or faster); so does every pass of more than `SHORT_QUERY_TOKENS` tokens a row (prefill
chunks, where the flash kernel's blocking pays).

`use_grouped_query_sdpa(model)` switches a CPU model's `sdpa` attention to this one; other
attention implementations, and models on other devices, are left as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPLEMENTATION = "speccascade_gqa_sdpa"
# The most query tokens a row that reduced-precision attention scores by fp32 matmuls (a verify of
# gamma = 5 feeds 6; beyond ~8 tokens a row SDPA's flash kernel is as fast on this work).
SHORT_QUERY_TOKENS = 8


def short_query_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          scale: float | None = None) -> Tensor:
    """Attention of a few query tokens over a cache, in fp32: query [B, H, q, D], key and value
    [B, KV, k, D] (H a multiple of KV), `attention_mask` boolean (True: attend) or additive,
    broadcastable to [B, 1, q, k], `scale` 1/sqrt(D) unless given (as SDPA's); the output
    [B, H, q, D] in the query's dtype. A query row with nothing to attend (a padding row) attends
    uniformly rather than becoming NaN, as eager attention."""
    batch, heads, q_length, dim = query.shape
    scale = dim ** -0.5 if scale is None else scale
    kv_heads, k_length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    # The heads of a group share their key/value head: stack them as rows of one matmul.
    scores = torch.matmul(query.reshape(batch, kv_heads, group * q_length, dim).float(),
                          key.float().transpose(-1, -2))
    scores = scores.view(batch, kv_heads, group, q_length, k_length).mul_(scale)
    if attention_mask is not None:
        mask = attention_mask[:, :, None]  # [B or 1, 1, 1, q, k] against [B, KV, group, q, k]
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
        else:
            scores.add_(mask.float()).clamp_(min=torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * q_length, k_length)
    return torch.matmul(weights, value.float()).view(batch, heads, q_length, dim).to(query.dtype)


def grouped_query_sdpa(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query [B, H, q, D], key and value [B, KV, k, D]
    with H a multiple of KV; the output [B, q, H, D]."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"{IMPLEMENTATION} supports neither softcap nor a position bias; use 'sdpa' or 'eager'")
    q_length = query.shape[2]
    # As transformers' sdpa: the kernel's own causal mask only where no mask is given and several
    # query tokens attend a sequence that starts with them (a prefill without a cache).
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal and attention_mask is None and q_length > 1)
    if causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if query.dtype != torch.float32 and q_length <= SHORT_QUERY_TOKENS and not causal and not dropout \
            and (attention_mask is None or attention_mask.shape[1] == 1):
        return short_query_attention(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, grouped_query_sdpa)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the masks sdpa attention takes


def use_grouped_query_sdpa(model) -> bool:
    """Switch `model` to grouped-query SDPA if it runs transformers' `sdpa` attention on the CPU and
    groups its query heads; True if it did."""
    config = model.config
    device = next(model.parameters()).device
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if device.type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa" or not heads \
            or kv_heads == heads:
        return False
    _register()
    model.set_attn_implementation(IMPLEMENTATION)
    return config._attn_implementation == IMPLEMENTATION
