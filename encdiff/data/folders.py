"""Photo datasets without a factor grid: the aligned CelebA release and any folder of images.

    ds = open_dataset("celeba", "data/celeba")        # img_align_celeba/ + list_attr_celeba.txt
    ds.images                                          # (N, 64, 64, 3) uint8, memory-mapped
    ds.attributes, ds.attribute_names                  # (N, 40) uint8 in {0, 1}, the 40 names
    ds = open_dataset("imagefolder", "my_photos/")     # every image below the folder, sorted by path

Every image is decoded once, cropped to its centred square and resized to 64x64 with antialiasing
(Lanczos), into a uint8 .npy cache: training then never decodes a JPEG in the step, and every
process of a node shares the cache through the page cache (it is memory-mapped, copy-on-write,
like the published datasets in formats.py). The cache lives in `<data folder>/.encdiff_cache/`, or
in `$XDG_CACHE_HOME/encdiff/` (default ~/.cache/encdiff/) when the data folder is read-only. It is
written to a temporary name and renamed (atomic), under a file lock so that the ranks of a node
decode once; a changed folder (a file added, removed, resized or touched) is decoded again.

Unreadable images (corrupt, truncated, missing) are skipped and listed in one warning; their rows
(and CelebA attributes) are left out, so row i is always `ds.files[i]`.
"""

import fcntl
import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from encdiff.data.dataset import Images
from encdiff.errors import UserError

SIZE = 64
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CACHE_VERSION = 1
# CelebA crop: the centred square of 2/3 of the short side (119 x 119 px of the aligned 178 x 218
# images), which is the region EncDiff's TAD evaluation sees (torchvision Resize(96) then
# CenterCrop(64)). The other common choice, a 140 x 140 crop, keeps more hair and background.
CELEBA_CROP = 2 / 3
FOLDER_CROP = 1.0  # imagefolder: the largest centred square
DECODE_BLOCK = 4096  # images decoded per block of thread-pool work (bounds the pending futures)


class PhotoDataset:
    """Images without a factor grid (factor_sizes = factor_names = None).

    name, path, images (Images, (N, 64, 64, 3) uint8), files (the source file of each row, relative
    to the image folder), skipped ([(file, reason)] of the unreadable images), attributes ((N, K)
    uint8 in {0, 1}, or None) and attribute_names (K names, or None)."""

    factor_sizes = None
    factor_names = None

    def __init__(self, name, path, images, files, skipped, attributes=None, attribute_names=None):
        self.name, self.path, self.images = name, path, images
        self.files, self.skipped = tuple(files), list(skipped)
        self.attributes, self.attribute_names = attributes, attribute_names
        if len(self.files) != len(images) or (attributes is not None and len(attributes) != len(images)):
            raise ValueError("files, images and attributes must have one row per image")

    def __len__(self):
        return len(self.images)

    def __repr__(self):
        attrs = f", {len(self.attribute_names)} attributes" if self.attribute_names else ""
        return f"PhotoDataset({self.name}, {self.path}, {len(self)} images {self.images.shape[1:]}{attrs})"


# ---------------------------------------------------------------------------------------------
# decoding


def decode_square(file, crop):
    """(64, 64, 3) uint8 of the centred square of side crop * short side, resized with antialiasing
    -> (image, None), or (None, reason) when the file cannot be read."""
    try:
        with Image.open(file) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")  # phone photos store their rotation in EXIF
            w, h = im.size
            side = crop * min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            # Pillow widens the Lanczos kernel by the downscale factor: antialiased, like Cars3D's resize
            return np.asarray(im.resize((SIZE, SIZE), Image.Resampling.LANCZOS, box=box)), None
    except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        return None, f"{type(e).__name__}: {str(e).strip()[:120]}"


def decode_all(folder, names, crop, out, desc, progress):
    """Decode folder/names[i] into out[i]; -> boolean mask of the rows read and [(name, reason)].
    Threads, not processes: Pillow releases the GIL while it decodes and resizes."""
    ok = np.zeros(len(names), bool)
    skipped = []
    workers = 1 if len(names) < 256 else min(16, len(os.sched_getaffinity(0)))
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(names), desc=desc, unit="img", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar,
    ):
        for start in range(0, len(names), DECODE_BLOCK):
            block = names[start : start + DECODE_BLOCK]
            for i, (image, reason) in enumerate(pool.map(lambda n: decode_square(folder / n, crop), block), start):
                if reason is None:
                    out[i] = image
                    ok[i] = True
                else:
                    skipped.append((names[i], reason))
            bar.update(len(block))
    return ok, skipped


# ---------------------------------------------------------------------------------------------
# the cache


def file_signature(folder, names, extra):
    """Hash of (name, size, mtime) of every source file and of how they are decoded: any change
    to the folder or to the decoding gives another hash, hence a new decode."""
    h = hashlib.sha1(json.dumps([CACHE_VERSION, SIZE, extra]).encode())
    for name in names:
        key = os.fsencode(name)  # the name's bytes: os.walk gives a name that is not UTF-8 with surrogate escapes
        try:
            st = os.stat(folder / name)
            h.update(key + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except (OSError, ValueError):  # missing, or a name no file can have (a NUL byte in CelebA's list)
            h.update(key + b"\0missing\n")
    return h.hexdigest()


def writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a unique probe name: two readers in one process (threads) must not delete each other's probe
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
        return True
    except OSError:
        return False


def cache_dir(data_dir):
    """<data>/.encdiff_cache, or a per-folder directory under the user's cache when data is read-only."""
    here = data_dir / ".encdiff_cache"
    if writable(here):
        return here
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    elsewhere = home / "encdiff" / hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:16]
    if not writable(elsewhere):
        raise UserError(f"{data_dir}: cannot write the decoded-image cache there nor in {elsewhere}")
    return elsewhere


@contextmanager
def file_lock(path):
    """An exclusive lock held by one process at a time (the other ranks wait for the decode)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_cache(npy, meta_path, signature):
    """(images memory map, meta) if the cache matches `signature`, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("signature") != signature:
            return None
        images = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, shared until written
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or images.shape != (len(meta["files"]), SIZE, SIZE, 3):
        return None
    return images, meta


def where_tmp(*paths):
    """This process's leftover temporary files next to paths (after a failure)."""
    return [t for p in paths for t in p.parent.glob(f".{p.name}.{os.getpid()}*.tmp")]


def write_cache(folder, names, crop, npy, meta_path, signature, desc, progress):
    """Decode every image into npy (atomically: a temporary file, then a rename), then the meta."""
    tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(names), SIZE, SIZE, 3))
        ok, skipped = decode_all(folder, names, crop, out, desc, progress)
        if not ok.all():  # rewrite without the unreadable rows (rare, so a second pass is fine)
            kept = np.flatnonzero(ok)
            tmp2 = npy.with_name(f".{npy.name}.{os.getpid()}.kept.tmp")
            compact = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(len(kept), SIZE, SIZE, 3))
            for start in range(0, len(kept), DECODE_BLOCK):
                compact[start : start + DECODE_BLOCK] = out[kept[start : start + DECODE_BLOCK]]
            compact.flush()
            del compact
            os.replace(tmp2, tmp)
        else:
            out.flush()
        del out
        os.replace(tmp, npy)
        meta = {"signature": signature, "files": [n for n, good in zip(names, ok) if good], "skipped": skipped}
        tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)  # written last: a meta file always describes a complete .npy
    except OSError as e:
        raise UserError(f"{npy}: cannot write the decoded-image cache ({e.strerror or e})") from None
    finally:
        for t in where_tmp(npy, meta_path):
            t.unlink(missing_ok=True)


def cached_images(folder, names, crop, data_dir, stem, desc, progress):
    """(images (N, 64, 64, 3) uint8 memory map, kept file names, skipped [(name, reason)]) of
    folder/names, decoded once into the cache of data_dir."""
    if not names:
        raise UserError(f"{folder}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    signature = file_signature(folder, names, [stem, crop])
    where = cache_dir(data_dir)
    npy, meta_path = where / f"{stem}.npy", where / f"{stem}.json"
    found = read_cache(npy, meta_path, signature)
    if found is None:
        with file_lock(where / f".{stem}.lock"):
            found = read_cache(npy, meta_path, signature)  # another rank may have written it meanwhile
            if found is None:
                write_cache(folder, names, crop, npy, meta_path, signature, desc, progress)
                found = read_cache(npy, meta_path, signature)
    if found is None:
        raise UserError(f"{npy}: the decoded-image cache could not be read back")
    images, meta = found
    skipped = [tuple(s) for s in meta["skipped"]]
    if skipped:
        listed = "; ".join(f"{n} ({why})" for n, why in skipped[:20])
        more = f"; ... and {len(skipped) - 20} more (all in {meta_path})" if len(skipped) > 20 else ""
        warnings.warn(
            f"{folder}: skipped {len(skipped)} of {len(names)} images that could not be read: {listed}{more}",
            stacklevel=4,
        )  # the caller of open_dataset
    if len(images) == 0:
        raise UserError(f"{folder}: none of the {len(names)} images could be read")
    return images, meta["files"], skipped


# ---------------------------------------------------------------------------------------------
# the datasets


def list_images(folder):
    """Image files below folder (hidden files and folders excluded), as sorted relative posix paths."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(folder)
        names += [
            (rel / f).as_posix() for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return sorted(names)


def open_imagefolder(path, progress=True):
    """Every image below the folder `path` (sorted by relative path, subfolders included), centre
    square crop, 64x64. No factors, no attributes."""
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (imagefolder: a folder of images)")
    names = list_images(path)
    images, files, skipped = cached_images(
        path, names, FOLDER_CROP, path, "imagefolder_64", f"{path.name}: decoding", progress
    )
    return PhotoDataset("imagefolder", path, Images(images.shape, raw=images), files, skipped)


def find_celeba(root):
    """(image folder, attribute file) of the aligned CelebA release under root: img_align_celeba/ and
    list_attr_celeba.txt side by side, or the download's Img/ and Anno/ folders."""
    if not root.is_dir():
        raise UserError(
            f"{root}: no such folder (celeba: the folder holding img_align_celeba/ and list_attr_celeba.txt)"
        )
    if root.name == "img_align_celeba":  # pointed at the image folder itself
        attr_candidates, image_candidates = [root.parent / "list_attr_celeba.txt"], [root]
    else:
        attr_candidates = [root / "list_attr_celeba.txt", root / "Anno" / "list_attr_celeba.txt"]
        image_candidates = [root / "img_align_celeba", root / "Img" / "img_align_celeba"]
    attr = next((p for p in attr_candidates if p.is_file()), None)
    if attr is None:
        raise UserError(
            f"{root}: no list_attr_celeba.txt here or in Anno/ (celeba: the aligned release's "
            "img_align_celeba/ folder and its list_attr_celeba.txt)"
        )
    folder = next((p for p in image_candidates if p.is_dir()), None)
    if folder is None:
        raise UserError(f"{root}: no img_align_celeba/ folder here or in Img/ (celeba: the aligned release)")
    if (folder / "img_align_celeba").is_dir():  # some archives unpack into img_align_celeba/img_align_celeba/
        folder = folder / "img_align_celeba"
    return folder, attr


def read_celeba_attributes(path):
    """list_attr_celeba.txt -> (file names, (N, K) uint8 attributes in {0, 1}, K attribute names).
    Line 1: the image count; line 2: the names; then `file v_1 ... v_K` with v in {-1, 1}."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the CelebA attribute file ({e})") from None
    try:
        count = int(lines[0].strip())
        names = lines[1].split()
    except (IndexError, ValueError):
        raise UserError(f"{path}: line 1 must be the image count and line 2 the attribute names") from None
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != count:
        raise UserError(f"{path}: line 1 announces {count} images but {len(rows)} rows follow")
    for i, row in enumerate(rows):
        if len(row) != len(names) + 1:
            raise UserError(f"{path}: line {i + 3} has {len(row) - 1} values for {len(names)} attributes")
    try:
        values = np.array([row[1:] for row in rows], dtype=np.int8).reshape(len(rows), len(names))
    except (ValueError, OverflowError):  # OverflowError: a number past int8 ("300")
        raise UserError(f"{path}: attribute values must be -1 or 1") from None
    bad = ~np.isin(values, (-1, 1))
    if bad.any():
        line = int(np.argwhere(bad)[0, 0]) + 3
        raise UserError(f"{path}: line {line}: attribute values must be -1 or 1")
    return [row[0] for row in rows], (values > 0).astype(np.uint8), tuple(names)


def open_celeba(path, progress=True):
    """The aligned CelebA release: rows in list_attr_celeba.txt order, each the centred square of
    2/3 of the short side (119 x 119 of 178 x 218, see CELEBA_CROP) resized to 64x64 with
    antialiasing; attributes (N, 40) in {0, 1} from the file's -1 / 1."""
    folder, attr_file = find_celeba(path)
    names, attributes, attribute_names = read_celeba_attributes(attr_file)
    images, files, skipped = cached_images(folder, names, CELEBA_CROP, path, "celeba_64", "celeba: decoding", progress)
    if len(files) != len(names):
        row = {n: i for i, n in enumerate(names)}
        attributes = attributes[[row[f] for f in files]]
    return PhotoDataset("celeba", path, Images(images.shape, raw=images), files, skipped, attributes, attribute_names)
