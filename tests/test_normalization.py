"""Input normalization comes from the run's own tiles and stays fixed for the run."""

import numpy as np
import pytest

from smartccs.models.artifacts import Normalization
from smartccs.train.multicrop import MultiCropConfig, multi_crop
from smartccs.train.normalization import NORMALIZATION_FILE, resolve_normalization, tile_statistics


def test_tile_statistics_match_numpy_over_the_sampled_pixels():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    norm = tile_statistics([tiles[:4], tiles[4:]], max_tiles=10)
    sample = tiles[:, ::4, ::4].reshape(-1, 3) / 255.0
    assert norm.mean == pytest.approx(sample.mean(0), abs=1e-4)
    assert norm.std == pytest.approx(sample.std(0), abs=1e-4)


def test_tile_statistics_stop_at_max_tiles():
    bright = np.full((4, 16, 16, 3), 250, np.uint8)
    dark = np.zeros((4, 16, 16, 3), np.uint8)
    assert tile_statistics([bright, dark], max_tiles=4).mean == pytest.approx(
        (250 / 255,) * 3, abs=1e-4
    )


def test_no_tiles_is_an_error():
    with pytest.raises(ValueError, match="no tiles"):
        tile_statistics([], max_tiles=4)


def tiles_dataset(value: int, n: int = 8):
    import ray

    return ray.data.from_items([{"image": np.full((16, 16, 3), value, np.uint8)}] * n)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_run_fixes_its_normalization_once_and_a_resume_reads_it_back(local_store):
    norm = resolve_normalization(local_store, "run-1", tiles_dataset(200), max_tiles=8)
    assert norm.mean == pytest.approx((200 / 255,) * 3, abs=1e-4)
    assert local_store.exists(f"runs/run-1/{NORMALIZATION_FILE}")
    # a resumed run whose stream starts with other tiles keeps the first attempt's numbers
    assert resolve_normalization(local_store, "run-1", tiles_dataset(0), max_tiles=8) == norm
    assert resolve_normalization(local_store, "run-2", tiles_dataset(0), max_tiles=8) != norm


def test_crops_refuse_an_unresolved_normalization():
    import torch

    tiles = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="resolved"):
        multi_crop(tiles, MultiCropConfig(), torch.Generator())
    resolved = MultiCropConfig(normalization=Normalization(mean=(0.5,) * 3, std=(0.1,) * 3))
    assert len(multi_crop(tiles, resolved, torch.Generator())) == resolved.n_crops
