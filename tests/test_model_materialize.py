"""A network built to be loaded (``models.materialize.with_weights``): the stored weights in
place of random ones, never an initialised copy first, and the ordinary build where a network
keeps tensors outside its state dict."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from smartccs.models.encoder import DEMO_ENCODER, build_from
from smartccs.models.materialize import with_weights


class _Probe(nn.Module):
    """Records, at each build, whether its weight was allocated (False) or on meta (True)."""

    builds: ClassVar[list[bool]] = []

    def __init__(self, table: bool = False, item: bool = False):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        if item:  # a value read out of a tensor at build time: no meta tensor has one
            nn.init.constant_(self.linear.bias, torch.tensor(0.5).item())
        if table:  # computed at build time and not saved: a meta build cannot recreate it
            self.register_buffer("table", torch.arange(3.0), persistent=False)
        _Probe.builds.append(self.linear.weight.is_meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out + self.table if hasattr(self, "table") else out


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "linear.weight": torch.randn(3, 4, generator=g),
        "linear.bias": torch.randn(3, generator=g),
    }


def test_a_network_is_built_once_without_allocating_random_weights():
    _Probe.builds.clear()
    state = _state()
    model = with_weights(_Probe, state)
    assert _Probe.builds == [True]
    assert torch.equal(model.linear.weight, state["linear.weight"])
    assert not any(p.is_meta for p in model.parameters())


def test_the_encoder_answers_as_one_built_and_loaded_the_ordinary_way():
    ordinary = build_from(DEMO_ENCODER).eval()
    state = {k: v.clone() for k, v in ordinary.state_dict().items()}
    loaded = with_weights(lambda: build_from(DEMO_ENCODER), state).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), ordinary(x))
    assert all(p.requires_grad for p in loaded.parameters())  # tent trains the loaded norms


def test_stored_half_precision_weights_take_the_network_s_dtype():
    state = {k: v.half() for k, v in _state().items()}
    model = with_weights(_Probe, state)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_network_with_a_table_outside_its_state_is_built_the_ordinary_way():
    _Probe.builds.clear()
    model = with_weights(lambda: _Probe(table=True), _state())
    assert _Probe.builds == [True, False]
    assert torch.equal(model.table, torch.arange(3.0))
    assert model(torch.zeros(1, 4)).shape == (1, 3)


def test_a_network_whose_build_reads_a_tensor_s_value_is_built_the_ordinary_way():
    _Probe.builds.clear()
    state = _state()
    model = with_weights(lambda: _Probe(item=True), state)
    assert _Probe.builds == [False]
    assert torch.equal(model.linear.bias, state["linear.bias"])


def test_the_platform_s_detector_is_built_without_random_weights():
    """Its build once read its focal prior's bias out of a tensor, which sent every scorer
    actor down the ordinary build: 3.5 CPU-s for a ViT-L backbone."""
    from smartccs.models.detector import CellDetector, HeadConfig

    ordinary = CellDetector(build_from(DEMO_ENCODER), HeadConfig(width=16), 3).eval()
    state = {k: v.clone() for k, v in ordinary.state_dict().items()}
    with torch.device("meta"):
        CellDetector(build_from(DEMO_ENCODER), HeadConfig(width=16), 3)  # does not raise
    loaded = with_weights(
        lambda: CellDetector(build_from(DEMO_ENCODER), HeadConfig(width=16), 3), state
    ).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), ordinary(x), strict=True))


@pytest.mark.parametrize(
    "state, message",
    [
        ({"linear.weight": torch.zeros(3, 4)}, "Missing key"),
        (_state() | {"extra": torch.zeros(1)}, "Unexpected key"),
        ({"linear.weight": torch.zeros(4, 4), "linear.bias": torch.zeros(3)}, "size mismatch"),
    ],
)
def test_a_state_that_does_not_fit_fails_as_a_strict_load_does(state, message):
    with pytest.raises(RuntimeError, match=message):
        with_weights(_Probe, state)
