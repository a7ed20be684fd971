"""A network's state dict filled from a published checkpoint, strictly.

The encoder import (smartccs.models.dinov2_keys) and the detector import
(smartccs.models.detr_keys) rename keys differently but fill alike: every source tensor fills
one tensor of the network, none twice, every tensor of the network is filled, each with its
exact shape; anything else stops the import naming the key, so a file of another
architecture or a truncated export never becomes a half-random network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from smartccs.errors import CCSError


class KeyMapError(CCSError):
    """A checkpoint whose tensors do not fill the network exactly."""


def tensors_of(raw: Any, where: str) -> dict[str, torch.Tensor]:
    """``raw`` as a dict of named tensors, or an error naming ``where`` it is not one."""
    if not isinstance(raw, Mapping) or not raw:
        raise KeyMapError(f"{where} is not a mapping of tensors ({type(raw).__name__})")
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise KeyMapError(f"{where}[{key!r}] is a {type(value).__name__}, not a tensor")
    return dict(raw)


class StateFill:
    """The state dict being filled for a network of tensor shapes ``target``, and which source
    key filled each of its tensors (what the errors name)."""

    def __init__(self, target: Mapping[str, torch.Size], network: str):
        self.target, self.network = target, network
        self.out: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}

    def put(self, name: str, value: torch.Tensor, key: str) -> None:
        """Source tensor ``key`` fills the network's ``name``."""
        if name not in self.target:
            raise KeyMapError(f"unexpected key {key!r}: the {self.network} has no {name!r}")
        if name in self.out:
            raise KeyMapError(f"keys {self.origin[name]!r} and {key!r} both fill {name!r}")
        self.out[name], self.origin[name] = value, key

    def check_complete(self) -> None:
        missing = [k for k in self.target if k not in self.out]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise KeyMapError(f"missing tensor {missing[0]!r}{more}")

    def check_shapes(self) -> None:
        for name, value in self.out.items():
            if value.shape != self.target[name]:
                raise KeyMapError(
                    f"{self.origin[name]!r} has shape {tuple(value.shape)}, the "
                    f"{self.network}'s {name!r} {tuple(self.target[name])}"
                )
