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

`use_grouped_query_sdpa(model)` switches a CPU model's `sdpa` attention to this one; other
attention implementations, and models on other devices, are left as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPLEMENTATION = "speccascade_gqa_sdpa"


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
