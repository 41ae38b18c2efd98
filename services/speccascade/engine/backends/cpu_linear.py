"""fp32 linear layers on the CPU through oneDNN rather than the BLAS.

torch computes an fp32 `nn.Linear` on the CPU with its BLAS's sgemm (MKL in the x86 wheels). For
the few rows a decoding pass feeds (one token a row in a draft step, γ + 1 in a verify, a handful of
sessions) that is far from the weights' memory traffic on an AMD EPYC with AVX2 only: a
[8960 × 1536] projection (Qwen2.5-1.5B's MLP) takes 3.5 ms for one row and 12.5 ms for six, where
reading the weights once bounds both near 2.4 ms; the 151,936-row output layer 49 and 194 ms. oneDNN's
own fp32 matmul, on the same dense weights (no repacked copy), takes 2.4 and 4.3 ms, and 36 and
72 ms (2 threads, BENCHMARKS.md "fp32 linears through oneDNN"). Both sum in fp32 with fused
multiply-adds over the same order; their outputs were bitwise equal in every shape measured
(tests/engine/test_cpu_linear.py checks them against `torch.nn.functional.linear`).

`use_onednn_linear(model)` switches every `nn.Linear` of an fp32 CPU model to it (the module's
class becomes `OneDnnLinear`: same parameters, same state dict); other dtypes and devices keep
torch's own path (bf16 already goes through oneDNN; CUDA has cuBLAS). Both the in-process engine and
the tiers build their models through `ModelBackend`, so both run the same kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN on the CPU and its linear operator (the one torch's own CPU
    compiler emits for linear layers)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnLinear(nn.Linear):
    """An `nn.Linear` whose fp32 CPU forward is oneDNN's matmul on its dense weight; anything else
    (another dtype or device, autograd) goes through `nn.Linear.forward`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Linear's parameter name)
        weight = self.weight
        if input.dtype != torch.float32 or weight.dtype != torch.float32 or input.device.type != "cpu" \
                or weight.device.type != "cpu" or (torch.is_grad_enabled() and weight.requires_grad):
            return super().forward(input)
        rows = input.reshape(-1, input.shape[-1])
        output = torch.ops.mkldnn._linear_pointwise(rows, weight, self.bias, "none", [], "")
        return output.view(*input.shape[:-1], output.shape[-1])


def use_onednn_linear(model: nn.Module) -> int:
    """Switch the `nn.Linear` layers of an fp32 model on the CPU to `OneDnnLinear`; the number of
    layers switched (0 for another dtype or device, or a torch without oneDNN)."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype != torch.float32 or not onednn_linear_available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
            switched += 1
    return switched
