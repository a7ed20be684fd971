"""A network built to be loaded: its stored weights, without the random ones first.

timm and torch initialise every parameter as a network is built, and loading a state dict
then overwrites all of it. For ViT-L/14 that initialisation is 3.5 CPU-s on one core, paid
by every scorer actor (its detector and its cell encoder) before its first tile, and by the
service for every batch. Built on the meta device instead, the network allocates nothing
until the state dict's own tensors are put in its place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def with_weights(build: Callable[[], M], state: Mapping[str, torch.Tensor]) -> M:
    """``build()`` holding ``state`` (strict: a missing, extra or misshapen key fails as
    ``load_state_dict`` does). Each tensor is cast to the dtype the network declares, as a
    copying load would. The network takes ownership of ``state``'s tensors.

    A network whose build needs real values (``.item()`` of a computed tensor), or that keeps
    tensors outside its state dict (a non-persistent buffer, a table computed at build time)
    that would be left on the meta device, is built and loaded the ordinary way instead.
    """
    try:
        with torch.device("meta"):
            model = build()
    except (RuntimeError, NotImplementedError):  # build code that needs real values
        return _ordinary(build, state)
    declared = model.state_dict()
    cast = {
        k: v.to(declared[k].dtype) if k in declared and v.dtype != declared[k].dtype else v
        for k, v in state.items()
    }
    model.load_state_dict(cast, strict=True, assign=True)
    return _ordinary(build, state) if _has_meta(model) else model


def _ordinary(build: Callable[[], M], state: Mapping[str, torch.Tensor]) -> M:
    model = build()
    model.load_state_dict(state, strict=True)
    return model


def _has_meta(model: nn.Module) -> bool:
    registered = [*model.parameters(), *model.buffers()]
    loose = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return any(t.is_meta for t in registered + loose)
