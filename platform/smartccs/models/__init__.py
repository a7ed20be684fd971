"""Model artifacts in the store and the networks they hold.

``load_encoder``, ``load_slide_head``, ``load_prototypes`` and ``load_cell_detector``
(smartccs.models.loaders) are reached lazily: importing this package must not import torch
(the service's HTTP ingress imports it without needing any model).
"""

from __future__ import annotations

from typing import Any

_LAZY = ("load_encoder", "load_slide_head", "load_prototypes", "load_cell_detector")
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from smartccs.models import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
