"""fp32 linear layers on the CPU through oneDNN (`engine/backends/cpu_linear.py`): a CPU backend of an
fp32 model switches its larger linear layers, their outputs are torch's own up to fp32 rounding,
models and layers it does not apply to are left alone, and autograd still works through a switched
layer."""

from __future__ import annotations

import copy

import pytest
import torch
from speccascade.engine.backends import backend_class
from speccascade.engine.backends.cpu_linear import (
    MIN_WEIGHT_ELEMENTS,
    OneDnnLinear,
    onednn_linear_available,
    use_onednn_linear,
)
from torch import nn

from ..conftest import tiny_qwen2

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear on the CPU")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 6, 8, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_a_switched_layer_gives_torchs_own_outputs(rows, bias):
    torch.manual_seed(rows)
    reference = nn.Linear(96, 200, bias=bias)
    switched = copy.deepcopy(reference)
    switched.__class__ = OneDnnLinear
    x = torch.randn(rows, 3, 96)  # a batch of rows, a few tokens each: leading dimensions kept
    with torch.inference_mode():
        expected, got = reference(x), switched(x)
    assert got.shape == expected.shape == (rows, 3, 200)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32, summed in another order


@needs_onednn
def test_an_fp32_cpu_backend_switches_its_larger_linears_and_scores_as_before(tiny_pair):
    from transformers import AutoModelForCausalLM

    _, expert = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32)
    plain = copy.deepcopy(model)
    backend = backend_class("hf")(model, name="expert")
    linears = [m for m in backend.model.modules() if isinstance(m, nn.Linear)]
    large = [m for m in linears if m.weight.numel() >= MIN_WEIGHT_ELEMENTS]
    assert backend.model.get_output_embeddings() in large  # 49,152 x 64: the one large layer of a tiny model
    assert backend.onednn_linears == len(large)
    assert all((type(m) is OneDnnLinear) == (m in large) for m in linears)  # the small ones keep the BLAS
    ids = torch.randint(3, 300, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(backend.model(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert set(backend.model.state_dict()) == set(plain.state_dict())  # same parameters, same names


def test_models_it_does_not_apply_to_are_left_alone():
    bf16 = tiny_qwen2(300, seed=1).to(torch.bfloat16)
    assert use_onednn_linear(bf16) == 0
    assert not any(type(m) is OneDnnLinear for m in bf16.modules())
    assert use_onednn_linear(nn.Module()) == 0  # no parameters at all


@needs_onednn
def test_a_transposed_weight_goes_through_torchs_own_path():
    layer = nn.Linear(8, 6, bias=False)
    layer.weight = nn.Parameter(torch.randn(8, 6).t(), requires_grad=False)  # a view: not contiguous
    layer.__class__ = OneDnnLinear
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())


@needs_onednn
def test_a_switched_layer_still_trains_through_torchs_own_path():
    layer = nn.Linear(8, 4)
    layer.__class__ = OneDnnLinear
    layer(torch.randn(5, 8)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (4, 8)
