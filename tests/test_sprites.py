"""sprites2d, the second procedural ground-truth set (generic HDF5 format, other factors)."""

import hashlib
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from encdiff.data import open_dataset
from encdiff.data import sprites

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("sprites") / "sprites2d.h5"
    sprites.generate(p, progress=False)
    return p


@pytest.fixture(scope="module")
def grid(path):
    """The images as (3, 5, 4, 8, 8, 64, 64, 3): one axis per factor."""
    with h5py.File(path, "r") as f:
        return f["images"][:].reshape(*sprites.FACTOR_SIZES, 64, 64, 3)


def test_the_generic_reader_opens_it_with_its_factors(path):
    ds = open_dataset("h5", str(path))
    assert tuple(ds.factor_sizes) == sprites.FACTOR_SIZES == (3, 5, 4, 8, 8)
    assert list(ds.factor_names) == list(sprites.FACTOR_NAMES)
    assert len(ds.images) == 3840 and ds.images.dtype == np.uint8


def test_every_combination_gives_a_distinct_image(grid):
    flat = grid.reshape(-1, 64 * 64 * 3)
    assert len({row.tobytes() for row in flat}) == len(flat)  # a set of the images' bytes: fast


@pytest.mark.parametrize("axis", range(5))
def test_a_one_step_change_of_any_factor_changes_the_image(grid, axis):
    a = np.take(grid, range(grid.shape[axis] - 1), axis=axis).astype(np.int16)
    b = np.take(grid, range(1, grid.shape[axis]), axis=axis).astype(np.int16)
    changed = np.abs(a - b).reshape(-1, 64 * 64 * 3).max(axis=1)
    assert (changed > 0).all()


def test_sprites_stay_inside_the_image(grid):
    border = np.concatenate([grid[..., 0, :, :], grid[..., -1, :, :], grid[..., :, 0, :], grid[..., :, -1, :]], axis=-2)
    assert (border == np.round(255 * sprites.BACKGROUND).astype(np.uint8)).all()


def test_the_command_writes_the_same_bytes_every_time(tmp_path, path):
    out = tmp_path / "again.h5"
    subprocess.run(
        [sys.executable, "-m", "encdiff.data.sprites", "--out", str(out)], cwd=ROOT, check=True, capture_output=True
    )
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert digest(out) == digest(path)
