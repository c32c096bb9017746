"""synth3d, the procedural Shapes3D look-alike: the properties encdiff/data/synth.py promises."""

import hashlib
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from encdiff.data import ensure_synth3d, open_dataset
from encdiff.data import synth
from encdiff.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SURFACE_AXIS = {"floor": 0, "wall": 1, "object": 2}  # the hue factor that paints each layer


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "small.h5"
    synth.generate(path, "small", progress=False)
    return path


@pytest.fixture(scope="module")
def small_grid(small):
    """The small grid's images as (4, 4, 4, 3, 4, 5, 64, 64, 3): one axis per factor."""
    with h5py.File(small, "r") as f:
        sizes = tuple(f.attrs["factor_sizes"])
        return f["images"][:].reshape(*sizes, 64, 64, 3)


@pytest.fixture(scope="module")
def small_layers():
    """(scale, shape, orientation, 4 layers, 64, 64) of the small grid's geometries."""
    sizes = [len(v) for v in synth.GRIDS["small"][3:]]
    return synth.grid_layers("small").reshape(*sizes, 4, 64, 64)


def test_file_layout_and_labels(small):
    ds = open_dataset("synth3d", small)
    assert ds.factor_names == synth.FACTOR_NAMES
    assert ds.factor_sizes == tuple(len(idx) for idx in synth.GRIDS["small"])
    assert ds.images.memory_mapped  # contiguous and uncompressed
    with h5py.File(small, "r") as f:
        labels = f["labels"][:]
    assert labels.dtype == np.float64 and labels.shape == (len(ds), 6)
    factors = ds.factors_of(np.arange(len(ds)))
    for k, idx in enumerate(synth.GRIDS["small"]):
        np.testing.assert_array_equal(labels[:, k], synth.FACTOR_VALUES[k][np.array(idx)[factors[:, k]]])


def test_full_grid_has_shapes3d_label_values():
    labels = synth.grid_labels("full")
    assert labels.shape == (480000, 6)
    expected = [np.arange(10) / 10] * 3 + [np.linspace(0.75, 1.25, 8), [0, 1, 2, 3], np.linspace(-30, 30, 15)]
    for k, values in enumerate(expected):
        np.testing.assert_allclose(np.unique(labels[:, k]), values, atol=1e-12)
    np.testing.assert_allclose(labels[1] - labels[0], [0, 0, 0, 0, 0, 60 / 14], atol=1e-12)  # last factor fastest


def test_index_round_trip(small):
    ds = open_dataset("synth3d", small)
    rows = np.arange(len(ds))
    np.testing.assert_array_equal(ds.index_of(ds.factors_of(rows)), rows)


def test_every_combination_is_distinct(small_grid):
    images = small_grid.reshape(-1, 64 * 64 * 3)
    assert len({row.tobytes() for row in images}) == len(images)


@pytest.mark.parametrize("axis", range(6), ids=synth.FACTOR_NAMES)
def test_one_step_of_any_factor_changes_the_image(small_grid, axis):
    changed = (np.diff(small_grid.astype(np.int16), axis=axis) != 0).any(axis=(-3, -2, -1))
    assert changed.all()


@pytest.mark.parametrize("surface", ["floor", "wall", "object"])
def test_a_hue_changes_only_its_surface(small_grid, small_layers, surface):
    axis = SURFACE_AXIS[surface]
    changed = (np.diff(small_grid.astype(np.int16), axis=axis) != 0).any(axis=-1)  # (..., 64, 64)
    coverage = small_layers[:, :, :, axis]  # (scale, shape, orientation, 64, 64)
    assert not (changed & (coverage == 0)).any(), f"a {surface} hue change touched pixels the {surface} does not cover"
    # ... and it does change the pixels the surface covers (the check above is not vacuous).
    assert (changed | (coverage < 0.05)).all()


def changed_pixels(grid, axis):
    """(scale, shape, orientation, 64, 64): pixels that some one-step change along `axis` changes."""
    changed = (np.diff(grid.astype(np.int16), axis=axis) != 0).any(axis=-1)  # (..., 64, 64)
    return changed.any(axis=(0, 1, 2))


def interior(mask):
    """Pixels whose 3x3 neighbourhood lies entirely in the mask."""
    out = np.zeros_like(mask)
    h, w = mask.shape[-2:]
    out[..., 1:-1, 1:-1] = np.logical_and.reduce(
        [mask[..., 1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )
    return out


def test_hue_regions_do_not_overlap(small_grid):
    """The same property from the images alone: a surface's hue never changes pixels inside another
    surface's region (only the mixed pixels along their shared edges)."""
    regions = {name: changed_pixels(small_grid, axis) for name, axis in SURFACE_AXIS.items()}
    assert (regions["floor"] | regions["wall"] | regions["object"]).all()
    for name, region in regions.items():
        for other, other_region in regions.items():
            if other != name:
                assert not (region & interior(other_region)).any(), f"the {name} hue changes the {other}"


def test_every_view_shows_floor_wall_object_and_a_shadow(small_layers):
    layers = small_layers.reshape(-1, 4, 64, 64)  # (geometries, layers, 64, 64)
    assert ((layers[:, :3] > 0).mean(axis=(-2, -1)) > 0.01).all()  # floor, wall and object all visible
    lit = synth.AMBIENT + synth.DIFFUSE * synth.LIGHT[1]  # a floor pixel in full light
    for floor, wall, obj in zip(layers[:, 0], layers[:, 1], layers[:, 2]):
        only_floor = (wall == 0) & (obj == 0)  # every ray of the pixel meets the floor
        assert np.isclose(floor[only_floor], lit).sum() > 100
        assert (floor[only_floor] < lit - 0.05).sum() >= 5  # in the object's shadow
        # Two walls in different light: the room's corner shows.
        assert len(np.unique(wall[wall > 0].round(3))) > 2


@pytest.mark.parametrize("shape", range(4), ids=synth.SHAPES)
def test_bounding_sphere_holds_every_shape(shape):
    """render_layers only intersects rays that pass near the object: none that hits it may be culled."""
    scale = synth.FACTOR_VALUES[3][-1]
    for orientation in (-30.0, 0.0, 30.0):
        eye, dirs, _, _, p_room, _ = synth.view(orientation)
        hits = np.isfinite(synth.hit_object(shape, scale, eye, dirs)[0])
        shadow = np.isfinite(synth.hit_object(shape, scale, p_room, synth.LIGHT)[0])
        assert hits.any() and shadow.any()
        assert synth.near_object(eye, dirs, scale)[hits].all()
        assert synth.near_object(p_room, synth.LIGHT, scale)[shadow].all()


def test_cli_is_deterministic_to_the_byte(small, tmp_path):
    out = tmp_path / "again.h5"
    run = subprocess.run(
        [sys.executable, "-m", "encdiff.data.synth", "--out", str(out), "--grid", "small"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == Path(small).read_bytes()
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_cli_rejects_unknown_grid(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "encdiff.data.synth", "--out", str(tmp_path / "x.h5"), "--grid", "huge"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "huge" in run.stderr


def test_ensure_synth3d_generates_once_and_atomically(tmp_path, monkeypatch, small):
    calls = []

    def fake_generate(out, grid, progress, stop):
        calls.append(grid)
        Path(out).write_bytes(Path(small).read_bytes())

    monkeypatch.setattr(synth, "generate", fake_generate)
    path = tmp_path / "data" / "synth3d.h5"
    assert Path(ensure_synth3d(path, "small")) == path
    assert Path(ensure_synth3d(path, "small")) == path
    assert calls == ["small"]  # the second call found the file
    assert open_dataset("synth3d", path).factor_sizes == (4, 4, 4, 3, 4, 5)
    with pytest.raises(UserError, match="'small' synth3d grid"):
        ensure_synth3d(path, "full")


def test_ensure_synth3d_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    def interrupted(out, grid, progress, stop):
        Path(out).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synth3d(tmp_path / "synth3d.h5", "small")
    assert list(tmp_path.iterdir()) == []


def test_missing_synth3d_names_the_generator(tmp_path):
    with pytest.raises(UserError, match="python -m encdiff.data.synth"):
        open_dataset("synth3d", tmp_path / "nothing.h5")


@pytest.mark.slow
def test_full_grid(tmp_path):
    """The full 480,000 images (about 1.5 minutes): distinct, and every one-step change is visible."""
    path = tmp_path / "full.h5"
    synth.generate(path, "full", progress=False)
    ds = open_dataset("synth3d", path)
    assert len(ds) == 480000 and ds.factor_sizes == (10, 10, 10, 8, 4, 15)
    images = ds.images.array.reshape(len(ds), -1)
    digests = np.array(
        [int.from_bytes(hashlib.blake2b(row, digest_size=8).digest(), "little") for row in images], dtype=np.uint64
    )
    assert len(np.unique(digests)) == len(ds)
    grid = digests.reshape(ds.factor_sizes)
    for axis in range(6):
        assert (np.diff(grid.view(np.int64), axis=axis) != 0).all(), synth.FACTOR_NAMES[axis]
