"""shapes2d, the third procedural ground-truth set: rotated asymmetric shapes on backgrounds."""

import h5py
import numpy as np
import pytest

from encdiff.data import open_dataset, shapes2d
from encdiff.errors import UserError


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("shapes2d") / "shapes2d.h5"
    shapes2d.write_shapes2d(p, progress=False)
    return p


@pytest.fixture(scope="module")
def grid(path):
    """The images as (4, 8, 4, 3, 5, 5, 64, 64, 3): one axis per factor."""
    with h5py.File(path, "r") as f:
        return f["images"][:].reshape(*shapes2d.FACTOR_SIZES, 64, 64, 3)


def test_the_generic_reader_opens_it_with_its_factors(path):
    ds = open_dataset("h5", str(path))
    assert tuple(ds.factor_sizes) == shapes2d.FACTOR_SIZES == (4, 8, 4, 3, 5, 5)
    assert list(ds.factor_names) == list(shapes2d.FACTOR_NAMES) and len(ds.images) == 9600


def test_every_combination_gives_a_distinct_image_and_every_step_changes_it(grid):
    flat = grid.reshape(-1, 64 * 64 * 3)
    assert len({row.tobytes() for row in flat}) == len(flat)  # a set of the images' bytes: fast
    for axis in range(len(shapes2d.FACTOR_SIZES)):
        a = np.take(grid, range(grid.shape[axis] - 1), axis=axis).astype(np.int16)
        b = np.take(grid, range(1, grid.shape[axis]), axis=axis).astype(np.int16)
        assert (np.abs(a - b).reshape(-1, 64 * 64 * 3).max(axis=1) > 0).all(), shapes2d.FACTOR_NAMES[axis]


def test_no_shape_looks_the_same_after_a_rotation(grid):
    """Each shape, at every orientation, differs from its other orientations: the angle is identifiable."""
    one = grid[:, :, 0, 0, 2, 2]  # (shapes, orientations, 64, 64, 3), centred
    for s in range(one.shape[0]):
        masks = (np.abs(one[s].astype(np.int16) - one[s, :, :1, :1]) > 0).reshape(len(one[s]), -1)
        assert len(np.unique(masks, axis=0)) == len(masks), shapes2d.SHAPES[s]


@pytest.mark.parametrize("size", [shapes2d.SIZE, shapes2d.SIZES[1]])
def test_every_shape_stays_inside_the_image_at_any_size_and_angle(size):
    centres = shapes2d.positions(size)
    for shape in shapes2d.SHAPES:
        for angle in shapes2d.ORIENTATIONS:
            for cx in (centres[0], centres[-1]):
                for cy in (centres[0], centres[-1]):
                    a = shapes2d.coverage(shape, angle, cx, cy, size)  # (64, 64)
                    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
                    assert border.max() == 0, (shape, angle, cx, cy)
                    assert a.sum() > 0


def test_the_default_size_keeps_its_positions_and_a_bad_size_writes_nothing(tmp_path):
    assert np.allclose(shapes2d.positions(), np.linspace(0.3, 0.7, 5))
    assert shapes2d.positions(0.28)[0] == pytest.approx(0.35)
    with pytest.raises(UserError, match="--size 0.5"):
        shapes2d.write_shapes2d(tmp_path / "x.h5", progress=False, size=0.5)
    assert list(tmp_path.iterdir()) == []
