"""float32 linears through oneDNN instead of MKL.

torch's CPU `linear` in float32 calls MKL's sgemm, whose kernels for 2-16 rows (verify blocks,
small batches) run far from the memory limit on some CPUs; oneDNN's inner-product kernel is
faster there on others. Which one wins is measured per machine (runtime/formats.py). The weights
are not copied: the module reads the same float32 tensor.
"""

from __future__ import annotations

import torch


class OneDnnLinear(torch.nn.Module):
    """x @ weight.T + bias in float32 through oneDNN (torch.ops.mkldnn._linear_pointwise)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # shared, not copied: [out, in]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def to_onednn(model: torch.nn.Module) -> torch.nn.Module:
    """Every float32 torch.nn.Linear of `model` becomes a OneDnnLinear, in place (DeepSpeed's
    sharded linears stay as they are)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, child_name, OneDnnLinear(child))
    return model


def is_onednn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, OneDnnLinear) for m in model.modules())
