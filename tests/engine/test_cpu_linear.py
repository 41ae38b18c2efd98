"""fp32 linear layers on the CPU through oneDNN (`engine/backends/cpu_linear.py`): a CPU backend of an
fp32 model switches its larger linear layers, those with a weight of their own to oneDNN's blocked
layout; their outputs are torch's own up to fp32 rounding, the state dict stays the dense one,
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
    packed_linears,
    use_onednn_linear,
)
from torch import nn

from ..conftest import tiny_qwen2

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear on the CPU")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 6, 8, 40])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "blocked"])
def test_a_switched_layer_gives_torchs_own_outputs(rows, bias, packed):
    torch.manual_seed(rows)
    reference = nn.Linear(96, 200, bias=bias)
    switched = copy.deepcopy(reference)
    switched.__class__ = OneDnnLinear
    if packed:
        switched.pack()
        assert switched.packed and switched.weight.is_mkldnn
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
    # The output layer shares its weight with the token embedding (tied): it runs on the dense weight.
    assert backend.packed_linears == 0 and not backend.model.get_output_embeddings().packed


@needs_onednn
def test_a_layer_with_its_own_weight_runs_on_the_blocked_layout_and_keeps_a_dense_state_dict():
    model = tiny_qwen2(10_000, seed=4, tied=False)  # its output layer, 10,000 x 64, is the one large layer
    plain = copy.deepcopy(model)
    backend = backend_class("hf")(model, name="untied")
    output = backend.model.get_output_embeddings()
    assert backend.onednn_linears == backend.packed_linears == 1 == packed_linears(backend.model)
    assert type(output) is OneDnnLinear and output.weight.is_mkldnn  # the dense weight is not kept beside it
    assert not backend.model.get_input_embeddings().weight.is_mkldnn
    ids = torch.randint(3, 10_000, (3, 9))
    with torch.inference_mode():
        torch.testing.assert_close(backend.model(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    state, expected = backend.model.state_dict(), plain.state_dict()
    assert set(state) == set(expected)
    assert all(not t.is_mkldnn and torch.equal(t, expected[name]) for name, t in state.items())


@needs_onednn
def test_a_torch_that_cannot_reorder_weights_keeps_them_dense_on_onednn(monkeypatch):
    from speccascade.engine.backends import cpu_linear

    monkeypatch.setattr(cpu_linear, "blocked_layout_available", lambda: False)
    model = tiny_qwen2(10_000, seed=4, tied=False)
    plain = copy.deepcopy(model)
    backend = backend_class("hf")(model, name="untied")
    output = backend.model.get_output_embeddings()
    assert backend.onednn_linears == 1 and backend.packed_linears == 0
    assert type(output) is OneDnnLinear and not output.weight.is_mkldnn
    ids = torch.randint(3, 10_000, (2, 7))
    with torch.inference_mode():
        torch.testing.assert_close(backend.model(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


@needs_onednn
def test_loading_a_state_dict_into_a_blocked_layer_reorders_the_new_weight():
    layer = nn.Linear(64, 32)
    layer.__class__ = OneDnnLinear
    layer.pack()
    source = nn.Linear(64, 32)
    layer.load_state_dict(source.state_dict())
    assert layer.packed
    x = torch.randn(5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), source(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_blocked_layer_takes_gradients_and_other_dtypes_through_torchs_own_linear():
    torch.manual_seed(0)
    reference = nn.Linear(32, 16)
    layer = copy.deepcopy(reference)
    layer.__class__ = OneDnnLinear
    layer.pack()
    inputs = torch.randn(3, 32, requires_grad=True)
    layer(inputs).sum().backward()  # gradients flow to the input (the weight is inference-only)
    expected = inputs.detach().clone().requires_grad_(True)
    reference(expected).sum().backward()
    torch.testing.assert_close(inputs.grad, expected.grad)
    with pytest.raises(RuntimeError, match="dtype"):  # torch's own error for a float64 input, as nn.Linear gives
        layer(torch.randn(2, 32, dtype=torch.float64))


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
