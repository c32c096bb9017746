"""Ground-truth dataset readers, on files written here in the published layouts.

Shapes3D's .h5 is written at full size as a sparse file (a few images written, the rest holes).
The .npz formats are written small, with the factor grid shrunk to match, since the loaders insist
on the published image counts.
"""

import math
import sys

import h5py
import numpy as np
import pytest

from encdiff.data import DATASETS, FACTORS, iter_chunks, load_all, open_dataset
from encdiff.data import formats
from encdiff.errors import UserError

RNG = np.random.default_rng(0)


def random_images(n, shape=(64, 64, 3)):
    return RNG.integers(0, 256, (n, *shape), dtype=np.uint8)


def shrink(monkeypatch, name, sizes):
    """Replace a dataset's published factor sizes by a small grid (same names)."""
    factors = tuple((n, s) for (n, _), s in zip(FACTORS[name], sizes))
    monkeypatch.setitem(formats.FACTORS, name, factors)
    return math.prod(sizes)


def write_h5(path, images, sizes=None, names=None, **dataset_options):
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, **dataset_options)
        if sizes is not None:
            f.attrs["factor_sizes"] = np.array(sizes)
        if names is not None:
            f.attrs["factor_names"] = list(names)
    return path


def row_major_index(factors, sizes):
    """index = sum_k f_k * prod(sizes[k+1:]), written out."""
    return sum(int(f) * math.prod(sizes[k + 1 :]) for k, f in enumerate(factors))


# --- the dataset object ---


def test_generic_h5_is_memory_mapped_and_indexable(tmp_path):
    sizes, names = (2, 3, 4), ("a", "b", "c")
    images = random_images(24, (8, 6, 3))
    ds = open_dataset("h5", write_h5(tmp_path / "g.h5", images, sizes, names))
    assert (ds.factor_sizes, ds.factor_names, len(ds), ds.images.shape) == (sizes, names, 24, (24, 8, 6, 3))
    assert ds.images.memory_mapped
    np.testing.assert_array_equal(ds.images[5], images[5])
    np.testing.assert_array_equal(ds.images[3:9], images[3:9])
    idx = np.array([23, 0, 7, 7, 12])
    out = ds.images[idx]
    assert type(out) is np.ndarray and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images[idx])
    array = load_all(ds)
    assert not array.flags.owndata  # the map itself, not a copy
    np.testing.assert_array_equal(array, images)


def test_factor_index_is_row_major_and_vectorised(tmp_path):
    sizes = (3, 1, 4, 5)
    ds = open_dataset("h5", write_h5(tmp_path / "g.h5", random_images(60, (2, 2, 1)), sizes, "wxyz"))
    factors = np.stack([RNG.integers(0, s, 50) for s in sizes], axis=1)  # (50, 4)
    expected = [row_major_index(f, sizes) for f in factors]
    np.testing.assert_array_equal(ds.index_of(factors), expected)
    np.testing.assert_array_equal(ds.factors_of(expected), factors)
    np.testing.assert_array_equal(ds.factors_of(np.arange(60).reshape(6, 10)).shape, (6, 10, 4))
    np.testing.assert_array_equal(ds.factors_of([0, 1, 5]), [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    with pytest.raises(ValueError):
        ds.index_of([[3, 0, 0, 0]])  # out of range
    with pytest.raises(ValueError):
        ds.index_of([[0, 0, 0]])  # too few factors


def test_chunked_compressed_h5_streams_then_loads_once(tmp_path):
    images = random_images(40)
    path = write_h5(tmp_path / "c.h5", images, (5, 8), ("a", "b"), chunks=(7, 64, 64, 3), compression="gzip")
    ds = open_dataset("h5", path)
    assert not ds.images.memory_mapped
    starts = []
    for start, chunk in iter_chunks(ds, size=16, progress=False):
        starts.append(start)
        np.testing.assert_array_equal(chunk, images[start : start + 16])
    assert starts == [0, 16, 32] and ds.images.array is None  # streaming did not load it all
    np.testing.assert_array_equal(ds.images[[39, 2]], images[[39, 2]])
    np.testing.assert_array_equal(load_all(ds, progress=False), images)


# --- Shapes3D ---


def test_shapes3d_h5_full_size_sparse(tmp_path):
    """The published layout at full size: 480000 images (5.9 GB apparent), only a few written."""
    path = tmp_path / "3dshapes.h5"
    rows = np.array([0, 1, 12345, 479999])
    written = random_images(len(rows))
    with h5py.File(path, "w") as f:
        d = f.create_dataset("images", (480000, 64, 64, 3), np.uint8)
        for r, image in zip(rows, written):
            d[r] = image
        f.create_dataset("labels", (480000, 6), np.float64)
    ds = open_dataset("shapes3d", path)
    assert len(ds) == 480000 and ds.images.memory_mapped
    assert ds.factor_names == ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    assert ds.factor_sizes == (10, 10, 10, 8, 4, 15)
    np.testing.assert_array_equal(ds.images[rows], written)
    assert not ds.images[[2, 400000]].any()  # never written: holes read as zeros
    np.testing.assert_array_equal(ds.factors_of(479999), [9, 9, 9, 7, 3, 14])
    np.testing.assert_array_equal(ds.factors_of(12345), [0, 2, 5, 5, 3, 0])  # 12345 = 25*480 + 345


def test_shapes3d_wrong_count(tmp_path):
    path = tmp_path / "3dshapes.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=random_images(10))
        f.create_dataset("labels", data=np.zeros((10, 6)))
    with pytest.raises(UserError, match=r"3dshapes.h5: holds 10 images .* need 480000"):
        open_dataset("shapes3d", path)


@pytest.mark.parametrize("compressed", [False, True])
def test_shapes3d_npz(tmp_path, monkeypatch, compressed):
    n = shrink(monkeypatch, "shapes3d", (2, 1, 3, 2, 1, 2))
    images = random_images(n)
    path = tmp_path / "3dshapes.npz"
    (np.savez_compressed if compressed else np.savez)(path, images=images)
    ds = open_dataset("shapes3d", path)
    assert ds.images.memory_mapped is (not compressed)
    idx = RNG.permutation(n)[:9]
    np.testing.assert_array_equal(ds.images[idx], images[idx])
    np.testing.assert_array_equal(np.concatenate(list(ds.images.chunks(5))), images)


# --- MPI3D ---


def test_mpi3d_factors_match_the_published_count():
    assert math.prod(s for _, s in FACTORS["mpi3d"]) == 1036800
    assert math.prod(s for _, s in FACTORS["dsprites"]) == 737280
    assert math.prod(s for _, s in FACTORS["shapes3d"]) == 480000


def test_mpi3d_compressed_npz_streams(tmp_path, monkeypatch):
    n = shrink(monkeypatch, "mpi3d", (2, 1, 2, 1, 3, 2, 2))
    images = random_images(n)
    path = tmp_path / "mpi3d_toy.npz"
    np.savez_compressed(path, images=images)
    ds = open_dataset("mpi3d", path)
    assert ds.factor_names[-2:] == ("horizontal_axis", "vertical_axis") and len(ds) == n
    assert not ds.images.memory_mapped
    chunks = [(s, c.copy()) for s, c in iter_chunks(ds, size=10, progress=False)]
    assert [s for s, _ in chunks] == [0, 10, 20, 30, 40]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), images)
    factors = [1, 0, 1, 0, 2, 1, 0]
    np.testing.assert_array_equal(ds.images[ds.index_of(factors)], images[row_major_index(factors, ds.factor_sizes)])


def test_mpi3d_uncompressed_npz_is_memory_mapped(tmp_path, monkeypatch):
    n = shrink(monkeypatch, "mpi3d", (1, 2, 1, 1, 1, 3, 2))
    images = random_images(n)
    path = tmp_path / "mpi3d_real.npz"
    np.savez(path, images=images, extra=np.arange(5))  # another member first would shift offsets
    ds = open_dataset("mpi3d", path)
    assert ds.images.memory_mapped
    np.testing.assert_array_equal(load_all(ds), images)


# --- dSprites ---


def test_dsprites_masks_become_rgb(tmp_path, monkeypatch):
    n = shrink(monkeypatch, "dsprites", (3, 2, 2, 2, 2))
    masks = RNG.integers(0, 2, (n, 64, 64), dtype=np.uint8)
    path = tmp_path / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
    latents = np.zeros((n, 6), np.int64)
    np.savez_compressed(
        path,
        imgs=masks,
        latents_classes=latents,
        latents_values=latents.astype(np.float64),
        metadata=np.array({"title": "dSprites"}, dtype=object),
    )
    ds = open_dataset("dsprites", path)
    assert ds.images.shape == (n, 64, 64, 3) and ds.factor_sizes == (3, 2, 2, 2, 2)
    rgb = ds.images[[0, 7, n - 1]]
    assert set(np.unique(rgb)) <= {0, 255}
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], masks[[0, 7, n - 1]] * 255)
    np.testing.assert_array_equal(load_all(ds, progress=False)[..., 1], masks * 255)


def test_dsprites_rejects_non_binary_masks(tmp_path, monkeypatch):
    n = shrink(monkeypatch, "dsprites", (1, 1, 1, 1, 2))
    path = tmp_path / "dsprites.npz"
    np.savez(path, imgs=np.full((n, 64, 64), 255, np.uint8))
    with pytest.raises(UserError, match="dsprites.npz: 'imgs' should hold 0/1 masks"):
        open_dataset("dsprites", path)


# --- Cars3D ---

try:
    import scipy.io as scipy_io
except ImportError:  # scipy is optional: only Cars3D's .mat files need it
    scipy_io = None
needs_scipy = pytest.mark.skipif(scipy_io is None, reason="writing .mat files needs scipy")


def write_car(path, im):
    scipy_io.savemat(path, {"im": im})


def car_colour(o, a, e):
    return np.array([40 + 60 * o, 5 + 10 * a, 30 + 50 * e], np.uint8)


@needs_scipy
def test_cars3d_layout(tmp_path):
    """Each 128x128 view is one flat colour naming (object, azimuth, elevation): resizing keeps flat
    colours, so every row can be checked whatever the filter."""
    names = ["car_c.mat", "car_a.mat", "car_b.mat"]  # written out of order: objects follow sorted names
    for name in names:
        o = sorted(names).index(name)
        im = np.empty((128, 128, 3, 24, 4), np.uint8)
        for a in range(24):
            for e in range(4):
                im[:, :, :, a, e] = car_colour(o, a, e)
        write_car(tmp_path / name, im)
    (tmp_path / "readme.txt").write_text("not a car")
    ds = open_dataset("cars3d", tmp_path)
    assert ds.factor_names == ("elevation", "azimuth", "object") and ds.factor_sizes == (4, 24, 3)
    assert ds.images.shape == (4 * 24 * 3, 64, 64, 3)
    factors = ds.factors_of(np.arange(len(ds)))
    images = ds.images[np.arange(len(ds))]
    for (e, a, o), image in zip(factors, images):
        assert (image == car_colour(o, a, e)).all()


@needs_scipy
def test_cars3d_resizes_with_antialiasing(tmp_path):
    checker = ((np.arange(128)[:, None] + np.arange(128)) % 2 * 255).astype(np.uint8)  # (128, 128) one-pixel squares
    im = np.broadcast_to(checker[:, :, None, None, None], (128, 128, 3, 24, 4)).copy()
    write_car(tmp_path / "car.mat", im)
    image = open_dataset("cars3d", tmp_path).images[0].astype(int)
    assert image.shape == (64, 64, 3)
    # Antialiased: close to the mean grey. Point sampling would give all 0 or all 255.
    assert np.abs(image - 127.5).max() < 16


@needs_scipy
def test_cars3d_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such folder"):
        open_dataset("cars3d", tmp_path / "missing")
    with pytest.raises(UserError, match="no .mat files"):
        open_dataset("cars3d", tmp_path)
    scipy_io.savemat(tmp_path / "car.mat", {"images": np.zeros((2, 2), np.uint8)})
    with pytest.raises(UserError, match=r"car.mat: no variable 'im'"):
        open_dataset("cars3d", tmp_path)
    write_car(tmp_path / "car.mat", np.zeros((128, 128, 3, 24, 3), np.uint8))
    with pytest.raises(UserError, match=r"car.mat: 'im' is uint8 \(128, 128, 3, 24, 3\)"):
        open_dataset("cars3d", tmp_path)
    (tmp_path / "car.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(UserError, match="car.mat: not a readable MATLAB"):
        open_dataset("cars3d", tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(UserError, match="pip install scipy"):
        open_dataset("cars3d", tmp_path)


# --- every mistake is one clear line naming the file ---


def bad_h5_files(tmp_path):
    good = random_images(6, (4, 4, 3))
    (tmp_path / "text.h5").write_text("hello")
    yield "missing.h5", "no such file"
    yield "text.h5", "not a readable HDF5 file"
    with h5py.File(tmp_path / "nokey.h5", "w") as f:
        f.create_dataset("imgs", data=good)
    yield "nokey.h5", "no dataset 'images' \\(found: imgs\\)"
    write_h5(tmp_path / "float.h5", good.astype(np.float32), (6,), ("a",))
    yield "float.h5", "'images' has dtype float32, expected uint8"
    write_h5(tmp_path / "ndim.h5", good[..., 0], (6,), ("a",))
    yield "ndim.h5", r"'images' has shape \(6, 4, 4\), expected 4 dimensions"
    write_h5(tmp_path / "nosizes.h5", good, None, ("a",))
    yield "nosizes.h5", "no attribute 'factor_sizes'"
    write_h5(tmp_path / "nonames.h5", good, (6,), None)
    yield "nonames.h5", "no attribute 'factor_names'"
    write_h5(tmp_path / "names.h5", good, (2, 3), ("a",))
    yield "names.h5", "1 factor names for 2 factor sizes"
    write_h5(tmp_path / "count.h5", good, (2, 2), ("a", "b"))
    yield "count.h5", r"holds 6 images but its factors \(a 2 x b 2\) need 4"
    write_h5(tmp_path / "sizes.h5", good, (1.5, 4.0), ("a", "b"))
    yield "sizes.h5", r"attribute 'factor_sizes' must be a list of integers, got \[1.5, 4.0\]"


def test_generic_h5_errors(tmp_path):
    for name, message in bad_h5_files(tmp_path):
        with pytest.raises(UserError, match=f"{tmp_path / name}: {message}") as e:
            open_dataset("h5", tmp_path / name)
        assert "\n" not in str(e.value)


def test_npz_errors(tmp_path, monkeypatch):
    shrink(monkeypatch, "mpi3d", (1, 1, 1, 1, 1, 1, 2))
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "key.npz", imgs=random_images(2))
    np.savez(tmp_path / "dtype.npz", images=random_images(2).astype(np.int16))
    np.savez(tmp_path / "shape.npz", images=random_images(2, (32, 32, 3)))
    np.savez(tmp_path / "count.npz", images=random_images(3))
    cases = {
        "missing.npz": "no such file",
        "text.npz": "not an .npz \\(zip\\) file",
        "key.npz": "no array 'images' \\(found: imgs\\)",
        "dtype.npz": "'images' has dtype int16, expected uint8",
        "shape.npz": "'images' has shape \\(2, 32, 32, 3\\), expected \\(N, 64, 64, 3\\)",
        "count.npz": "holds 3 images but its factors .* need 2",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=f"{tmp_path / name}: {message}"):
            open_dataset("mpi3d", tmp_path / name)


def test_truncated_compressed_npz(tmp_path, monkeypatch):
    n = shrink(monkeypatch, "mpi3d", (1, 1, 1, 1, 1, 1, 4))
    path = tmp_path / "mpi3d.npz"
    np.savez_compressed(path, images=random_images(n))
    data = path.read_bytes()
    start = data.index(b"images.npy") + 200  # inside the compressed stream
    path.write_bytes(data[:start] + bytes(x ^ 0xFF for x in data[start : start + 200]) + data[start + 200 :])
    ds = open_dataset("mpi3d", path)  # the header is intact
    with pytest.raises(UserError, match="mpi3d.npz: 'images' is corrupt"):
        load_all(ds, progress=False)


def test_unknown_dataset_name():
    with pytest.raises(UserError, match="unknown dataset 'imagenet': choose one of synth3d, shapes3d"):
        open_dataset("imagenet", "x")
    assert set(DATASETS) == {"synth3d", "shapes3d", "mpi3d", "cars3d", "dsprites", "h5", "celeba", "imagefolder"}
