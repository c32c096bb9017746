"""Readers for the published dataset files, the generic ground-truth HDF5 format and synth3d.

Memory: eight ranks on one node must not hold eight copies of Shapes3D (5.9 GB) or MPI3D (12.7 GB),
so images are memory-mapped (read-only, copy-on-write) wherever the file layout allows; every
process then shares one copy through the page cache:
- HDF5 datasets stored contiguous and unfiltered (the published 3dshapes.h5, synth3d, generic files
  written without chunks or compression): an np.memmap at the dataset's offset in the file.
- .npz members stored uncompressed (np.savez): an np.memmap at the member's offset in the zip.
Chunked or compressed HDF5 datasets and compressed .npz members (np.savez_compressed: the published
MPI3D and dSprites files) cannot be mapped: `Images.chunks()` streams them in order without holding
them (the trainer copies the stream to the GPU), and the first random access reads them whole into
the process's RAM. To share those as well, re-save them uncompressed (np.savez, or the generic
HDF5 format). Cars3D (216 MB) is decoded and resized into RAM.
"""

import lzma
import math
import struct
import tokenize
import zipfile
import zlib
from functools import partial
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from encdiff.data.dataset import GroundTruthDataset, Images
from encdiff.data.folders import open_celeba, open_imagefolder
from encdiff.errors import UserError
from encdiff.images import IMAGE_SHAPE

# (name, size) of each factor, in the row order of the published files.
FACTORS = {
    "shapes3d": (
        ("floor_hue", 10),
        ("wall_hue", 10),
        ("object_hue", 10),
        ("scale", 8),
        ("shape", 4),
        ("orientation", 15),
    ),
    "mpi3d": (
        ("object_color", 6),
        ("object_shape", 6),
        ("object_size", 2),
        ("camera_height", 3),
        ("background_color", 3),
        ("horizontal_axis", 40),
        ("vertical_axis", 40),
    ),
    "dsprites": (("shape", 3), ("scale", 6), ("orientation", 40), ("pos_x", 32), ("pos_y", 32)),
    "cars3d": (("elevation", 4), ("azimuth", 24)),  # then ("object", number of .mat files)
}


def need_file(path, what, download=None):
    """`download`: a published dataset's loader name; its error then names the command that fetches it."""
    if not path.is_file():
        raise UserError(f"{path}: no such file ({what}){how_to_get(download, path)}")


def how_to_get(download, path):
    if download is None:
        return ""
    from encdiff.data.download import command_for  # here, not above: the downloader imports this module

    return f"; {command_for(download, path)}"


def check_array(path, key, shape, dtype, item_shape=None, ndim=4):
    """Images must be uint8 (N, *item_shape), or any (N, H, W, C) without an item_shape."""
    if dtype != np.uint8:
        raise UserError(f"{path}: '{key}' has dtype {dtype}, expected uint8")
    if any(s < 0 for s in shape):  # numpy takes a .npy header's negative sizes as they are
        raise UserError(f"{path}: '{key}' has shape {tuple(shape)}, a negative size (damaged header?)")
    if item_shape is not None:
        if tuple(shape[1:]) != tuple(item_shape):
            raise UserError(
                f"{path}: '{key}' has shape {tuple(shape)}, expected (N, {', '.join(map(str, item_shape))})"
            )
    elif len(shape) != ndim:
        raise UserError(f"{path}: '{key}' has shape {tuple(shape)}, expected 4 dimensions (N, H, W, C)")


# --- HDF5 ---


# What h5py raises for a file that opens but is damaged: the HDF5 library's errors surface as one of
# these, depending on which part of the file is damaged.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def read_h5(path, key, item_shape=None):
    """(Images, file attributes) of the uint8 dataset `key`; memory-mapped when contiguous."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path}: not a readable HDF5 file") from None
    try:
        with f:
            if key not in f or not isinstance(f[key], h5py.Dataset):
                found = ", ".join(map(str, f.keys())) or "nothing"  # str(): h5py gives bytes for a name not UTF-8
                raise UserError(f"{path}: no dataset '{key}' (found: {found})")
            d = f[key]
            shape, dtype, attrs = d.shape, d.dtype, dict(f.attrs)
            # Unfiltered contiguous storage is one run of bytes; the offset is None until data is written.
            offset = d.id.get_offset() if d.chunks is None else None
    except H5_ERRORS as e:
        raise UserError(f"{path}: damaged HDF5 file ({e})") from None
    check_array(path, key, shape, dtype, item_shape)
    if offset is not None:
        if offset + math.prod(shape) > path.stat().st_size:  # np.memmap would fail with a ValueError
            raise UserError(f"{path}: '{key}' ends early (truncated file?)")
        return Images(shape, raw=np.memmap(path, np.uint8, mode="c", offset=offset, shape=shape)), attrs
    return Images(shape, stream=partial(stream_h5, path, key), raw_shape=shape), attrs


def stream_h5(path, key, size):
    try:
        with h5py.File(path, "r") as f:
            d = f[key]
            for start in range(0, len(d), size):
                yield d[start : start + size]
    except H5_ERRORS as e:  # damaged compressed chunks show only when they are read
        raise UserError(f"{path}: '{key}' is corrupt ({e})") from None


# --- .npz ---

# What zipfile raises for a damaged member: a bad header or checksum (BadZipFile), bad compressed data
# (zlib.error, lzma.LZMAError, OSError from bz2), data cut short (EOFError), an unknown compression
# method or zip version (NotImplementedError), an encrypted member (RuntimeError), or a name flagged
# UTF-8 that is not (UnicodeDecodeError).
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    OSError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
)


def read_npy_header(f, path, key):
    """(shape, dtype) from the .npy header at the start of file object f."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read(f)
    except (ValueError, KeyError, tokenize.TokenError):  # TokenError: numpy's retry on a header that is not Python
        raise UserError(f"{path}: '{key}' is not a valid .npy array") from None
    if fortran_order and len(shape) > 1:
        raise UserError(f"{path}: '{key}' is stored in Fortran order; re-save it C-contiguous")
    return shape, dtype


def read_npz(path, key, item_shape=None, ndim=4):
    """Images of the uint8 array `key` of an .npz; memory-mapped when stored uncompressed."""
    try:
        zf = zipfile.ZipFile(path)
    except ZIP_ERRORS:
        raise UserError(f"{path}: not an .npz (zip) file") from None
    with zf:
        names = zf.namelist()
        if key + ".npy" not in names:
            found = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
            raise UserError(f"{path}: no array '{key}' (found: {found})")
        info = zf.getinfo(key + ".npy")
        try:
            with zf.open(info) as f:
                shape, dtype = read_npy_header(f, path, key)
                header = f.tell()
        except ZIP_ERRORS:
            raise UserError(f"{path}: '{key}' is corrupt (bad zip header, compressed data or checksum)") from None
    check_array(path, key, shape, dtype, item_shape, ndim)
    if info.compress_type != zipfile.ZIP_STORED:
        return Images(shape, stream=partial(stream_npz, path, key), raw_shape=shape)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(
            30
        )  # the local file header; its name and extra field lengths may differ from the central directory's
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise UserError(f"{path}: corrupt zip header for '{key}'")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_len + extra_len + header
    if header + math.prod(shape) > info.file_size or offset + math.prod(shape) > path.stat().st_size:
        # a header claiming more rows than the member holds: np.memmap would fail, or map the next member
        raise UserError(f"{path}: '{key}' ends early: its shape {tuple(shape)} needs more bytes than it holds")
    return Images(shape, raw=np.memmap(path, np.uint8, mode="c", offset=offset, shape=shape))


def stream_npz(path, key, size):
    """The rows of a compressed .npz member, decompressed in order, `size` rows at a time."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
            shape, dtype = read_npy_header(f, path, key)
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], size):
                n = min(size, shape[0] - start)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise UserError(f"{path}: '{key}' ends early (truncated file?)")
                yield np.frombuffer(data, dtype).reshape(n, *shape[1:])  # bytes -> (n, ...)
    except ZIP_ERRORS:
        raise UserError(f"{path}: '{key}' is corrupt (bad compressed data or checksum)") from None


# --- the datasets ---


def dataset(name, path, images, factors):
    return GroundTruthDataset(name, path, images, [s for _, s in factors], [n for n, _ in factors])


def open_shapes3d(path):
    """3dshapes.h5 (`images` (480000, 64, 64, 3) uint8, `labels`), or the .npz with key `images`."""
    need_file(path, "Shapes3D: 3dshapes.h5 or 3dshapes.npz", "shapes3d")
    if zipfile.is_zipfile(path):
        images = read_npz(path, "images", IMAGE_SHAPE)
    else:
        images, _ = read_h5(path, "images", IMAGE_SHAPE)
    return dataset("shapes3d", path, images, FACTORS["shapes3d"])


def open_mpi3d(path):
    """mpi3d_{toy,realistic,real}.npz: `images` (1036800, 64, 64, 3) uint8; factors from the row."""
    need_file(path, "MPI3D: mpi3d_*.npz", "mpi3d")
    return dataset("mpi3d", path, read_npz(path, "images", IMAGE_SHAPE), FACTORS["mpi3d"])


def masks_to_rgb(masks):
    return np.repeat(masks[..., None] * np.uint8(255), 3, axis=-1)  # (n, H, W) 0/1 -> (n, H, W, 3) 0/255


def open_dsprites(path):
    """dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz: `imgs` (737280, 64, 64) uint8 0/1 -> 0/255 RGB."""
    need_file(path, "dSprites: dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz", "dsprites")
    masks = read_npz(path, "imgs", IMAGE_SHAPE[:2], ndim=3)
    rows = masks.chunks(1)
    first = next(rows, None)  # one image: cheap even when compressed (None: no images, an error below)
    rows.close()
    if first is not None and first.max() > 1:
        raise UserError(f"{path}: 'imgs' should hold 0/1 masks, found the value {first.max()}")
    return dataset("dsprites", path, masks.transformed(masks_to_rgb, IMAGE_SHAPE), FACTORS["dsprites"])


def import_loadmat():
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading Cars3D's .mat files needs scipy, which is not installed: pip install scipy") from None
    return loadmat


def read_car(file, loadmat):
    """One Cars3D object: `im` (H, W, 3, 24 azimuths, 4 elevations) uint8 -> (4, 24, 64, 64, 3)."""
    from PIL import Image

    try:
        mat = loadmat(file)
    except Exception as e:  # scipy raises many types for a bad file (ValueError, NotImplementedError for v7.3, ...)
        raise UserError(f"{file}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None
    if "im" not in mat:
        raise UserError(f"{file}: no variable 'im' (found: {', '.join(k for k in mat if not k.startswith('__'))})")
    im = mat["im"]
    if im.dtype != np.uint8 or im.ndim != 5 or im.shape[2:] != (3, 24, 4):
        raise UserError(f"{file}: 'im' is {im.dtype} {im.shape}, expected uint8 (H, W, 3, 24, 4)")
    views = np.ascontiguousarray(im.transpose(4, 3, 0, 1, 2))  # (H, W, 3, az, el) -> (el, az, H, W, 3)
    out = np.empty((4, 24, *IMAGE_SHAPE), np.uint8)
    for e in range(4):
        for a in range(24):
            # LANCZOS = Pillow's former ANTIALIAS, as disentanglement_lib resizes Cars3D.
            out[e, a] = np.asarray(Image.fromarray(views[e, a]).resize(IMAGE_SHAPE[:2], Image.LANCZOS))
    return out


def open_cars3d(path, progress=True):
    """A folder of Cars3D .mat files (183 published), one object each, in sorted file-name order;
    factors elevation 4, azimuth 24, object; each 128x128 view resized to 64x64 with antialiasing."""
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (Cars3D: the folder of car .mat files){how_to_get('cars3d', path)}")
    files = sorted(path.glob("*.mat"), key=lambda p: p.name)
    if not files:
        raise UserError(f"{path}: no .mat files in this folder (Cars3D)")
    loadmat = import_loadmat()
    images = np.empty((4, 24, len(files), *IMAGE_SHAPE), np.uint8)
    for o, file in enumerate(tqdm(files, desc="cars3d: decoding and resizing", unit="car", disable=not progress)):
        images[:, :, o] = read_car(file, loadmat)
    images = images.reshape(-1, *IMAGE_SHAPE)  # (el, az, obj, 64, 64, 3) -> rows in row-major factor order
    return dataset("cars3d", path, Images(images.shape, raw=images), FACTORS["cars3d"] + (("object", len(files)),))


def open_h5(path, name="h5"):
    """The generic ground-truth format: `images` (N, H, W, C) uint8 and attributes `factor_sizes`
    and `factor_names`, rows in row-major factor order."""
    need_file(path, "a ground-truth HDF5 file")
    images, attrs = read_h5(path, "images")
    for key in ("factor_sizes", "factor_names"):
        if key not in attrs:
            raise UserError(f"{path}: no attribute '{key}' (the generic format needs factor_sizes and factor_names)")
    sizes, names = np.atleast_1d(attrs["factor_sizes"]), np.atleast_1d(attrs["factor_names"])
    if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer):
        raise UserError(f"{path}: attribute 'factor_sizes' must be a list of integers, got {sizes.tolist()}")
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError:
        raise UserError(f"{path}: attribute 'factor_names' must be UTF-8 text, got {names.tolist()}") from None
    return GroundTruthDataset(name, path, images, sizes, names)


def open_synth3d(path):
    """The bundled procedural set, in the generic format (see encdiff.data.synth)."""
    if not path.exists():
        raise UserError(f"{path}: no such file (generate it: python -m encdiff.data.synth --out {path})")
    return open_h5(path, "synth3d")


DATASETS = {
    "synth3d": open_synth3d,
    "shapes3d": open_shapes3d,
    "mpi3d": open_mpi3d,
    "cars3d": open_cars3d,
    "dsprites": open_dsprites,
    "h5": open_h5,
    "celeba": open_celeba,  # no factor grid: attributes (encdiff.data.folders)
    "imagefolder": open_imagefolder,  # no factor grid, no attributes
}


def open_dataset(name, path):
    """Open a dataset by name (one of DATASETS) from a file (a folder for cars3d, celeba, imagefolder).
    celeba and imagefolder have no factor grid: their factor_sizes is None."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    path = Path(path)
    if path.is_dir() and name not in FOLDER_DATASETS:
        raise UserError(f"{path}: is a directory; data.name = {name!r} reads one file (.h5 or .npz): name that file")
    return DATASETS[name](path)


FOLDER_DATASETS = ("cars3d", "celeba", "imagefolder")
