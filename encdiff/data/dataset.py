"""A ground-truth dataset: images in row-major factor order (last factor fastest) and the factor grid.

index = sum_k f_k * prod(factor_sizes[k+1:])
"""

import math

import numpy as np
from tqdm import tqdm

from encdiff.errors import UserError

CHUNK = 4096  # images per read when streaming: 48 MiB of 64x64x3


class Images:
    """(N, H, W, C) uint8 images, indexable like an array (int, slice or index array) and always
    returning an np.ndarray.

    Backed either by `raw`, an array in RAM or a read-only (copy-on-write) memory map shared with
    every other process through the page cache, or by `stream(size)`, an iterator over the raw rows
    in order, in chunks (compressed files): then `chunks()` streams without holding the images, and
    the first random access reads them all into this process's RAM. `transform` maps raw rows to
    uint8 (n, H, W, C) images (dSprites' 0/1 masks to RGB)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, shape, raw=None, stream=None, raw_shape=None, transform=None):
        self.shape = tuple(int(s) for s in shape)
        self._raw, self._stream, self._transform = raw, stream, transform
        self._raw_shape = raw.shape if raw is not None else tuple(raw_shape)

    @property
    def memory_mapped(self):
        return isinstance(self._raw, np.memmap)

    @property
    def array(self):
        """The (N, H, W, C) images as one array without a copy, or None where rows must be
        transformed or read (the file is compressed, or not yet read)."""
        return None if self._raw is None or self._transform else np.asarray(self._raw)

    def transformed(self, transform, item_shape):
        """The same rows through `transform` (raw rows -> (n, *item_shape) uint8)."""
        return Images((len(self), *item_shape), self._raw, self._stream, self._raw_shape, transform)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if self._raw is None:
            self._raw = self._read_all()
        return self._apply(self._raw[index])

    def chunks(self, size=CHUNK):
        """The images in order, in arrays of up to `size` rows."""
        if self._raw is None:
            rows = self._stream(size)
        else:
            rows = (self._raw[start : start + size] for start in range(0, len(self), size))
        for raw in rows:
            yield self._apply(raw)

    def _apply(self, raw):
        return np.asarray(self._transform(raw) if self._transform else raw)

    def _read_all(self):
        raw = np.empty(self._raw_shape, np.uint8)
        start = 0
        for rows in self._stream(CHUNK):
            raw[start : start + len(rows)] = rows
            start += len(rows)
        return raw


class GroundTruthDataset:
    """Images with the factor combination of each row (row-major, last factor fastest).

    name, path, images (Images), factor_sizes (tuple of ints), factor_names (tuple of str)."""

    def __init__(self, name, path, images, factor_sizes, factor_names):
        self.name, self.path, self.images = name, path, images
        self.factor_sizes = tuple(int(s) for s in factor_sizes)
        self.factor_names = tuple(str(n) for n in factor_names)
        if len(self.factor_names) != len(self.factor_sizes):
            raise UserError(f"{path}: {len(self.factor_names)} factor names for {len(self.factor_sizes)} factor sizes")
        if any(s < 1 for s in self.factor_sizes):
            raise UserError(f"{path}: factor sizes must be positive, got {self.factor_sizes}")
        need = math.prod(self.factor_sizes)
        if len(images) != need:
            grid = " x ".join(f"{n} {s}" for n, s in zip(self.factor_names, self.factor_sizes))
            raise UserError(f"{path}: holds {len(images)} images but its factors ({grid}) need {need}")

    def __len__(self):
        return len(self.images)

    @property
    def num_factors(self):
        return len(self.factor_sizes)

    def index_of(self, factors):
        """Row of each factor combination: (..., num_factors) ints -> (...) int64."""
        factors = np.asarray(factors)
        if factors.shape[-1:] != (self.num_factors,):
            raise ValueError(f"factors must have shape (..., {self.num_factors}), got {factors.shape}")
        return np.ravel_multi_index(tuple(np.moveaxis(factors, -1, 0)), self.factor_sizes).astype(np.int64)

    def factors_of(self, indices):
        """Factor combination of each row: (...) ints -> (..., num_factors) int64."""
        return np.stack(np.unravel_index(np.asarray(indices), self.factor_sizes), axis=-1).astype(np.int64)

    def __repr__(self):
        grid = ", ".join(f"{n}={s}" for n, s in zip(self.factor_names, self.factor_sizes))
        how = "memory-mapped" if self.images.memory_mapped else "in memory or streamed"
        return (
            f"GroundTruthDataset({self.name}, {self.path}, {len(self)} images {self.images.shape[1:]}, {grid}; {how})"
        )


def iter_chunks(ds, size=CHUNK, progress=True):
    """Yield (start, images[start:start + n]) over the whole dataset in order, with a progress bar.
    Copy each chunk where it belongs (e.g. into a preallocated GPU tensor): a compressed file is then
    never held whole in host memory."""
    with tqdm(total=len(ds), desc=f"{ds.name}: reading", unit="img", unit_scale=True, disable=not progress) as bar:
        start = 0
        for chunk in ds.images.chunks(size):
            yield start, chunk
            start += len(chunk)
            bar.update(len(chunk))


def load_all(ds, progress=True):
    """All images as one (N, H, W, C) uint8 array. A memory-mapped file is returned as the map itself
    (no copy: pages are read on first touch and shared with every process); anything else is read
    in chunks into a new array."""
    array = ds.images.array
    if array is not None:
        return array
    out = np.empty(ds.images.shape, np.uint8)
    for start, chunk in iter_chunks(ds, progress=progress):
        out[start : start + len(chunk)] = chunk
    return out
