"""The normalisation layers' affine parameters: what test-time adaptation (tent) changes.

Adaptation writes a center's adapted values; the screening stage loads them over a detector's
own before scoring. Both sides name the parameters the same way through this module.
"""

from __future__ import annotations

import torch
from torch import nn

_NORMS = (nn.LayerNorm, nn.GroupNorm)


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The affine weights and biases of every normalisation layer, by state-dict name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _NORMS):
            for pname, p in module.named_parameters(recurse=False):
                found[f"{name}.{pname}" if name else pname] = p
    return found


def apply_norms(model: nn.Module, norms: dict[str, torch.Tensor]) -> None:
    """Load adapted norm parameters over a model's own (strictly: every name must exist)."""
    params = norm_parameters(model)
    unknown = set(norms) - set(params)
    if unknown:
        raise KeyError(f"not norm parameters of this model: {sorted(unknown)[:3]}")
    with torch.no_grad():
        for k, v in norms.items():
            params[k].copy_(v)
