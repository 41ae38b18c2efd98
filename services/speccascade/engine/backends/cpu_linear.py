"""fp32 linear layers on the CPU through oneDNN rather than the BLAS.

torch computes an fp32 `nn.Linear` on the CPU with its BLAS's sgemm (MKL in the x86 wheels). For
the few rows a decoding pass feeds (one token a row in a draft step, γ + 1 in a verify, a handful of
sessions) that is slow on an AMD EPYC with AVX2 only, where each such pass should cost little more
than reading the weights once: a [8960 × 1536] projection (Qwen2.5-1.5B's MLP) takes 3.5 ms for one
row and 12.5 ms for six, the 151,936-row output layer 49 and 194 ms. oneDNN's own fp32 matmul, on
the same dense weights (no repacked copy), takes 2.4 and 4.3 ms, and 36 and 72 ms (2 threads,
BENCHMARKS.md "fp32 linear layers through oneDNN"). It is the same fp32 arithmetic summed in
another order: outputs within fp32 rounding of torch's (~1e-6 relative, tests/engine/
test_cpu_linear.py; neither kernel gives a row the same bits in batches of different sizes). Small
layers keep the BLAS: below `MIN_WEIGHT_ELEMENTS` their weights sit in cache and oneDNN's ~0.06 ms
a call of its own costs more than it saves (a 0.5B key/value projection, one row: 0.02 ms by the
BLAS, 0.08 by oneDNN).

A layer whose weight is its own (not tied to another module's, as a small model's output layer is
to its token embedding) has the weight reordered once into oneDNN's blocked layout for a few rows
(`_reorder_linear_weight`), replacing the dense one (no copy kept, no extra memory): a pass of 2 to
48 rows then runs 1.2-1.7x faster than on the dense weight (a 1.5B MLP projection at 6 rows 4.6 ->
3.6 ms, 0.5B's at 8 rows 1.9 -> 1.2 ms), one row as fast (any hint from 2 to 32 gives the same
layout; BENCHMARKS.md "fp32 linear weights in oneDNN's blocked layout"). A tied weight stays dense:
its other user (an embedding lookup) reads rows of the plain matrix, and a reordered copy would
cost a vocabulary-sized matrix of memory. The state dict still holds the dense weight.

On x86-64 (other CPUs keep their BLAS: not measured), `use_onednn_linear(model)` switches the larger
`nn.Linear` layers of an fp32 CPU model to it (the module's class becomes `OneDnnLinear`: same
parameter names, same state dict); other dtypes and devices keep torch's own path (bf16, which
`dtype: auto` picks only on CPUs with bf16 matrix units, already goes through oneDNN there; CUDA
has cuBLAS). Both the in-process engine and the tiers build their models through `ModelBackend`,
so both run the same kernels.
"""

from __future__ import annotations

import platform

import torch
from torch import Tensor, nn
from torch.nn import functional

# Layers with fewer weights keep the BLAS (see above): the key/value projections of Qwen2.5-0.5B and
# -1.5B (115k and 393k weights) stay, their query/output projections (803k, 2.4M) switch.
MIN_WEIGHT_ELEMENTS = 1 << 19
# The rows an own weight's blocked layout is reordered for: a draft step of a few sessions, a
# verify; one row runs as fast on it as on the dense weight, 48 faster (measured for 2 to 32).
PACKED_FOR_ROWS = 8


def onednn_linear_available() -> bool:
    """Whether this is an x86-64 CPU (where it was measured; other CPUs keep their BLAS) and torch
    has oneDNN and its linear operator (the one torch's own CPU compiler emits for linear layers)."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def blocked_layout_available() -> bool:
    """Whether torch can reorder a linear weight into oneDNN's blocked layout (the operator torch's
    CPU compiler packs constant weights with); without it, switched layers run on the dense weight."""
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class OneDnnLinear(nn.Linear):
    """An `nn.Linear` whose fp32 CPU forward is oneDNN's matmul, on its dense weight or on that weight
    reordered into oneDNN's blocked layout (`pack`); anything else (another dtype or device,
    autograd) goes through torch's own linear on the dense weight."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Linear's parameter name)
        weight = self.weight
        if weight.is_mkldnn:
            if input.dtype != torch.float32 or input.device.type != "cpu" \
                    or (torch.is_grad_enabled() and input.requires_grad):
                return functional.linear(input, weight.to_dense(), self.bias)
        elif input.dtype != torch.float32 or weight.dtype != torch.float32 or input.device.type != "cpu" \
                or weight.device.type != "cpu" or not weight.is_contiguous() \
                or (torch.is_grad_enabled() and weight.requires_grad):
            return super().forward(input)
        rows = input.reshape(-1, input.shape[-1])
        output = torch.ops.mkldnn._linear_pointwise(rows, weight, self.bias, "none", [], "")
        return output.view(*input.shape[:-1], output.shape[-1])

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def pack(self) -> None:
        """Reorder the weight into oneDNN's blocked layout for `PACKED_FOR_ROWS` rows, in place of the
        dense one (inference only: the weight no longer takes gradients)."""
        if not self.packed:
            self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACKED_FOR_ROWS),
                                       requires_grad=False)

    def unpack(self) -> None:
        """The dense weight back in place of the blocked one."""
        if self.packed:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)

    # The state dict holds the dense weight, whatever the layout it runs on.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = self.packed
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if packed:
            self.pack()


def use_onednn_linear(model: nn.Module) -> int:
    """Switch the `nn.Linear` layers of an fp32 model on the CPU with at least `MIN_WEIGHT_ELEMENTS`
    weights to `OneDnnLinear`, those with a weight of their own in oneDNN's blocked layout where torch
    can reorder it (`blocked_layout_available`); the number of layers switched (0 for another dtype or
    device, or a torch without oneDNN)."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype != torch.float32 or not onednn_linear_available():
        return 0
    users: dict[int, int] = {}  # a weight tensor's id -> how many modules hold it (tied weights: several)
    for _, parameter in model.named_parameters(remove_duplicate=False):
        users[id(parameter)] = users.get(id(parameter), 0) + 1
    switched, blocked = 0, blocked_layout_available()
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.numel() >= MIN_WEIGHT_ELEMENTS:
            module.__class__ = OneDnnLinear
            if blocked and users[id(module.weight)] == 1:
                module.pack()
            switched += 1
    return switched


def packed_linears(model: nn.Module) -> int:
    """How many of the model's linear layers run on a weight in oneDNN's blocked layout."""
    return sum(1 for module in model.modules() if isinstance(module, OneDnnLinear) and module.packed)
