"""Property-based tests (hypothesis) of what users hand the trainer: whatever the config files and
command lines (random TOML, random --section.key=value) and whatever the data (random, truncated or
malformed HDF5 and .npz files, image folders holding files that are not images), the outcome is a
valid config or a readable dataset, or one UserError of one line; never another exception.

The default run draws a fixed set of examples (derandomized, no example database) in well under a
minute; `pytest -m slow tests/test_properties.py` draws 20x as many. Each crash these properties
found is kept below as a plain regression test (test_found_*).
"""

import dataclasses
import io
import os
import re
import struct
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from encdiff import config
from encdiff.config import Config, from_toml_text, parse_args
from encdiff.data import formats, load_all, open_dataset
from encdiff.data.folders import list_images
from encdiff.errors import UserError
from encdiff.images import check_images

SOAK = 20  # the slow runs draw this many times the default run's examples


def budget(n):
    """Settings for a property drawing n examples: reproducible (derandomized, no database), no
    deadline (the machine is shared), and no health check on slow data generation."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


def one_line_error(e):
    assert isinstance(e, UserError)
    message = str(e)
    assert message and "\n" not in message and "\r" not in message, repr(message)


def outcome(fn, *args):
    """fn(*args), or the UserError it raised (checked to be one line); any other exception fails."""
    try:
        result = fn(*args)
    except UserError as e:
        one_line_error(e)
        event("UserError")  # the share of each outcome: pytest --hypothesis-show-statistics
        return e
    event("accepted")
    return result


def holds(examples, check, **strategies):
    """check(**drawn) for `examples` examples drawn from the strategies (hypothesis)."""
    budget(examples)(given(**strategies)(check))()


@pytest.fixture(params=[1, pytest.param(SOAK, marks=pytest.mark.slow)], ids=["ci", "soak"])
def scale(request):
    """Each property twice: its CI budget, and SOAK times it behind -m slow."""
    return request.param


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for every example of the module (hypothesis runs many examples per test call)."""
    return tmp_path_factory.mktemp("properties")


# ---------------------------------------------------------------------------------------------
# the config layer: TOML files and command-line overrides (what train.py's parse_args reads)

SECTIONS = {f.name: [k.name for k in dataclasses.fields(f.type)] for f in dataclasses.fields(Config)}
ALL_KEYS = sorted({k for keys in SECTIONS.values() for k in keys})
CHOICES = sorted(  # the valid values of the string keys, and a few more
    {
        *config.STAGES,
        *config.DATASET_NAMES,
        *config.ATTENTION_BACKENDS,
        *config.COMPILE_MODES,
        *config.COMPILE_SCOPES,
        *config.PRECISIONS,
        *config.METRIC_NAMES,
        *"auto never cpu cuda full small vq kl pool cosine linear l1 l2 eps v x0 SIGTERM SIGUSR1".split(),
    }
)


def toml_str(s):
    """s as a TOML basic string (control characters escaped)."""
    body = "".join(
        "\\" + ch if ch in '"\\' else f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in s
    )
    return f'"{body}"'


def toml_key(s):
    return s if re.fullmatch(r"[A-Za-z0-9_-]+", s) else toml_str(s)


def toml_float(x):
    return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(x), repr(x))


@st.composite
def often(draw, common, rare, one_in=10):
    """common, and rare once in about one_in draws."""
    return draw(rare if draw(st.integers(1, one_in)) == one_in else common)


short_text = st.text(max_size=8)
# hex has no such limit: past int64, past a float's range, past str()'s limit
HUGE_INTS = ["0x" + "f" * n for n in (16, 17, 300, 3600)]
exotic_literals = st.one_of(
    st.integers(4300, 5000).map(lambda n: "9" * n),  # Python refuses int(str) past 4300 digits
    st.sampled_from(HUGE_INTS),
    st.integers(500, 2000).map(lambda d: "[" * d + "]" * d),  # deeper than tomllib's recursion goes
    st.integers(500, 2000).map(lambda d: "{a = " * d + "1" + "}" * d),
    st.sampled_from(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "'''x'''", "'\\'", '"\\u00e9"']),
)
scalar_literals = often(
    st.one_of(
        st.sampled_from(["true", "false", "0", "-1", "1", "2", "32", "4294967296", "-9223372036854775809"]),
        st.sampled_from(["nan", "-nan", "+inf", "-inf", "1e400", "-0.0", "0.5", "0.9999", '""']),
        st.integers(-(2**70), 2**70).map(str),
        st.floats().map(toml_float),
        st.sampled_from(CHOICES).map(toml_str),
        short_text.map(toml_str),
    ),
    exotic_literals,
    one_in=30,
)
toml_literals = st.recursive(
    scalar_literals,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(short_text, inner), max_size=3).map(
            lambda kvs: "{" + ", ".join(f"{toml_key(k)} = {v}" for k, v in kvs) + "}"
        ),
    ),
    max_leaves=6,
)


def typed_literals(default):
    """Values of a key's own type (the type of its default), in and out of its valid range."""
    if isinstance(default, bool):
        return st.sampled_from(["true", "false"])
    if isinstance(default, int):
        ints = st.sampled_from([str(default), "0", "-1", "1", "3", "64", *HUGE_INTS])
        return st.one_of(ints, st.integers(-5, 2**40).map(str))
    if isinstance(default, float):
        floats = st.sampled_from([repr(default), "0.0", "1.0", "-1.0", "1e-3", "0", *HUGE_INTS])
        return st.one_of(floats, st.floats().map(toml_float))
    if isinstance(default, str):
        return st.one_of(st.just(toml_str(default)), st.sampled_from(CHOICES).map(toml_str), short_text.map(toml_str))
    item = typed_literals(default[0] if default else "")
    return st.lists(item, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")


DEFAULTS = {(t, k): getattr(getattr(Config(), t), k) for t, keys in SECTIONS.items() for k in keys}


def keys_of(section):
    """Mostly the section's own keys, then any known key, then anything."""
    own = st.sampled_from(SECTIONS.get(section, ALL_KEYS))
    return often(own, st.one_of(st.sampled_from(ALL_KEYS), short_text), one_in=4)


def values_for(section, key):
    """Mostly a value of the key's type; else any TOML value."""
    if (section, key) in DEFAULTS:
        return often(typed_literals(DEFAULTS[section, key]), toml_literals, one_in=3)
    return toml_literals


@st.composite
def toml_documents(draw):
    """A TOML document (str), mostly well-formed, with known and unknown tables and keys; or bytes."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.one_of(st.binary(max_size=40), st.text(max_size=40)))
    lines = []
    tables = draw(st.lists(often(st.sampled_from(list(SECTIONS)), short_text, one_in=6), max_size=4, unique=True))
    for section in tables:
        header = draw(often(st.just("[{}]"), st.sampled_from(["[[{}]]", "[{}.sub]", "{} = 1", ""]), one_in=8))
        if header:
            lines.append(header.format(toml_key(section)))
        for key in draw(st.lists(keys_of(section), max_size=5, unique=True)):
            lines.append(f"{toml_key(key)} = {draw(values_for(section, key))}")
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=20)))  # a garbage line
    return "\n".join(lines) + "\n"


@st.composite
def command_lines(draw):
    """train.py's argv after `--config FILE`: overrides in every form, well-formed or not; "@DOC"
    stands for the generated file."""
    argv = []
    for _ in range(draw(st.integers(0, 5))):
        section = draw(often(st.sampled_from(list(SECTIONS)), short_text))
        key = draw(keys_of(section))
        value = draw(
            often(
                st.one_of(
                    values_for(section, key),
                    st.sampled_from(CHOICES),
                    st.lists(st.sampled_from(CHOICES + ["0", "1", "2", "-1"]), max_size=3).map(",".join),
                ),
                st.one_of(toml_literals, st.text(max_size=10)),
                one_in=4,
            )
        )
        form = draw(st.integers(0, 19))
        if form <= 14:
            argv.append(f"--{section}.{key}={value}")
        elif form == 15:
            argv += [f"--{section}.{key}", value]
        elif form == 16:
            argv.append(f"--{section}.{key}")  # no value (the next argument becomes it, if any)
        elif form == 17:
            argv += draw(st.sampled_from([["--config", "@DOC"], ["--config=@DOC"], ["--config"], ["--config", "nope"]]))
        elif form == 18:
            argv.append(draw(st.sampled_from(["--a..b=c", "--=", "--.=1", "--.", f"--{section}..{key}=1", "--x"])))
        else:
            argv.append(draw(st.text(max_size=10)))
    return argv


def check_config(workdir, doc, overrides):
    """parse_args on a file holding doc and the overrides: a valid Config or a one-line UserError.
    The same text as a checkpoint's stored config (from_toml_text, evaluate.py): the same."""
    path = workdir / "random.toml"
    path.write_bytes(doc if isinstance(doc, bytes) else doc.encode())
    argv = ["--config", str(path), *(a.replace("@DOC", str(path)) for a in overrides)]
    cfg = outcome(parse_args, argv)
    if isinstance(cfg, Config):
        config.validate(cfg)  # what parse_args returns passes its own checks
        assert outcome(from_toml_text, config.to_toml(cfg)) == cfg  # and round-trips
    if isinstance(doc, str):
        stored = outcome(from_toml_text, doc)
        assert isinstance(stored, (Config, UserError))


def test_any_config_is_valid_or_one_user_error(workdir, scale):
    holds(
        400 * scale,
        lambda doc, overrides: check_config(workdir, doc, overrides),
        doc=toml_documents(),
        overrides=command_lines(),
    )


# ---------------------------------------------------------------------------------------------
# the data openers: HDF5 and .npz files (open_dataset), image folders and CelebA (encdiff.data.folders)

# Small factor grids in place of the published ones, so that small files of the published layouts
# open: (1, ..., 2, 2): 4 images each.
SMALL_GRIDS = {
    name: tuple((n, 1) for n, _ in f[:-2]) + tuple((n, 2) for n, _ in f[-2:]) for name, f in formats.FACTORS.items()
}


@pytest.fixture(scope="module")
def small_grids():
    with pytest.MonkeyPatch.context() as mp:
        for name, factors in SMALL_GRIDS.items():
            mp.setitem(formats.FACTORS, name, factors)
        yield


def read_dataset(name, path):
    """What train.py and evaluate.py do with a dataset: open it, read single images, an index
    array and the whole set, check the image shape the models need. -> (dataset, its warnings)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = open_dataset(name, path)
    n = len(ds)
    assert ds.images.shape[0] == n and ds.images.dtype == np.uint8
    if n:
        assert ds.images[0].shape == ds.images.shape[1:]
        assert ds.images[np.array([n - 1, 0])].shape == (2, *ds.images.shape[1:])
    everything = load_all(ds, progress=False)
    assert everything.shape == ds.images.shape and everything.dtype == np.uint8
    if ds.factor_sizes is not None:
        assert ds.factors_of(np.arange(n)).shape == (n, len(ds.factor_sizes))
    check_images(ds.images.shape, path)
    return ds, [str(w.message) for w in caught]


WRONG_DTYPES = st.sampled_from(["float32", "float64", "int64", "bool", "int8", "uint16"])


@st.composite
def image_arrays(draw, masks=False):
    """(shape, dtype, seed, values below, NaN first) of an array that is, or nearly is, a stack of
    images: wrong dtypes, shapes and sizes included (make_array builds it)."""
    n = draw(often(st.just(4), st.sampled_from([0, 1, 3, 5]), one_in=4))
    wrong_shapes = [(n, 64, 64), (n, 64, 64, 1), (n, 32, 32, 3), (n, 64, 64, 3, 1), (n,), (), (n, 0, 64, 3)]
    shape = draw(often(st.just((n, 64, 64) if masks else (n, 64, 64, 3)), st.sampled_from(wrong_shapes), one_in=4))
    dtype = draw(often(st.just("uint8"), WRONG_DTYPES, one_in=4))
    high = draw(st.sampled_from([2, 256])) if masks else 256
    return shape, dtype, draw(st.integers(0, 2**32 - 1)), high, draw(st.booleans())


def make_array(desc):
    shape, dtype, seed, high, nan = desc
    array = np.random.default_rng(seed).integers(0, high, shape).astype(dtype)
    if array.dtype.kind == "f" and array.size and nan:
        array.flat[0] = np.nan
    return array


FACTOR_SIZES = often(
    st.just("grid"),
    st.sampled_from(
        ["none", [2, 3], [0, 4], [-2, -2], [4.0], [np.nan, 4.0], [True, True], [[2, 2]], [], [2**62, 2**62]]
        + ["four", b"\xff", 4, np.uint64(2**64 - 1)]
    ),
    one_in=3,
)
FACTOR_NAMES = often(
    st.just("match"),
    st.one_of(
        st.sampled_from(["none", ["a"], ["a", "b", "c"], 7, [b"\xff\xfe"] * 2]),
        st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5), min_size=2, max_size=2),
    ),
    one_in=3,
)


def attribute(value, n, sizes):
    """An HDF5 attribute value: "grid" is a factor grid matching n images, "match" names for sizes."""
    if value == "grid":
        return np.array([2, n // 2] if n else [0], np.int64)
    if value == "match":
        return [f"f{i}" for i in range(len(sizes))]
    if isinstance(value, list) and value and isinstance(value[0], (bytes, int, float, list)):
        return np.array(value)  # numbers, or fixed-length bytes (not necessarily UTF-8)
    return value  # a scalar, or a list of str (h5py writes variable-length UTF-8)


@st.composite
def file_damage(draw):
    """How the written file is damaged: not at all, truncated, bytes flipped (mostly where the
    container keeps its layout: the first and last KiB), or replaced by random bytes."""
    kind = draw(often(st.just("none"), st.sampled_from(["truncate", "flip", "flip", "random"]), one_in=3))
    where = draw(st.sampled_from(["head", "tail", "anywhere"]))
    return kind, where, draw(st.floats(0, 1)), draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8))


def damage(path, how):
    kind, where, fraction, positions = how
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        data = data[: int(len(data) * fraction)]
    elif kind == "flip" and data:
        span = len(data) if where == "anywhere" else min(len(data), 1024)
        for p in positions:
            i = p % span if where != "tail" else len(data) - 1 - p % span
            data[i] ^= 1 + p % 255
    elif kind == "random":
        data = np.random.default_rng(positions[0]).bytes(int(4096 * fraction))
    path.write_bytes(bytes(data))


@st.composite
def h5_files(draw):
    return {
        "name": draw(st.sampled_from(["h5", "synth3d", "shapes3d"])),
        "key": draw(often(st.just("images"), st.sampled_from(["imgs", "group"]), one_in=6)),
        "images": draw(image_arrays()),
        "storage": draw(st.sampled_from(["contiguous", "chunked", "gzip", "unwritten"])),
        "labels": draw(st.sampled_from([None, "nan", "ok"])),
        "factor_sizes": draw(FACTOR_SIZES),
        "factor_names": draw(FACTOR_NAMES),
        "damage": draw(file_damage()),
    }


def write_h5_file(path, spec):
    images = make_array(spec["images"])
    with h5py.File(path, "w") as f:
        if spec["key"] == "group":
            f.create_group("images").create_dataset("x", data=images)
        elif spec["storage"] == "unwritten":
            f.create_dataset(spec["key"], shape=images.shape, dtype=images.dtype)
        elif spec["storage"] == "contiguous" or images.ndim == 0 or images.size == 0:
            f.create_dataset(spec["key"], data=images)
        else:
            gzip = "gzip" if spec["storage"] == "gzip" else None
            f.create_dataset(spec["key"], data=images, chunks=(1, *images.shape[1:]), compression=gzip)
        if spec["labels"]:  # Shapes3D's factor values (unused): NaN there must not matter
            labels = np.zeros((max(len(images.shape) and images.shape[0], 1), 6))
            labels[0, 0] = np.nan if spec["labels"] == "nan" else 0.0
            f.create_dataset("labels", data=labels)
        n = images.shape[0] if images.ndim else 0
        if spec["factor_sizes"] != "none":
            f.attrs["factor_sizes"] = attribute(spec["factor_sizes"], n, None)
        sizes = np.atleast_1d(f.attrs.get("factor_sizes", []))
        if spec["factor_names"] != "none":
            f.attrs["factor_names"] = attribute(spec["factor_names"], n, sizes)
    damage(path, spec["damage"])


def check_file(workdir, spec, name, write):
    """Write the drawn file into a folder of its own, then open it as train.py would."""
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        path = Path(d) / name
        write(path, spec)
        outcome(read_dataset, spec["name"], path)


def test_any_hdf5_file_opens_or_is_one_user_error(workdir, small_grids, scale):
    holds(200 * scale, lambda spec: check_file(workdir, spec, "data.h5", write_h5_file), spec=h5_files())


def npy_bytes(array, content):
    """array as .npy bytes: "npy" as numpy writes it; "bigger" / "smaller" / "negative": a header
    that claims more, fewer or -1 - n rows for n; "version": a format version numpy does not know."""
    buf = io.BytesIO()
    if content == "version":
        buf.write(b"\x93NUMPY\x03\x00\x10\x00" + b"{}".ljust(16))
    elif content == "npy" or array.ndim == 0:
        np.lib.format.write_array(buf, array, allow_pickle=False)
    else:
        rows = {"bigger": array.shape[0] + 100, "smaller": 0, "negative": -1 - array.shape[0]}[content]
        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(buf, {**header, "shape": (rows, *array.shape[1:])})
        buf.write(array.tobytes())
    return buf.getvalue()


@st.composite
def npz_files(draw):
    name = draw(st.sampled_from(["mpi3d", "dsprites", "shapes3d"]))
    key = "imgs" if name == "dsprites" else "images"
    members = []
    for _ in range(draw(often(st.just(1), st.integers(0, 3), one_in=3))):
        members.append(
            (
                draw(often(st.just(key), st.sampled_from(["images", "imgs", "labels"]), one_in=6)),
                draw(image_arrays(masks=name == "dsprites")),
                draw(
                    often(
                        st.just("npy"),
                        st.sampled_from(["bigger", "smaller", "negative", "version", "garbage"]),
                        one_in=4,
                    )
                ),
                draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])),
            )
        )
    return {"name": name, "members": members, "damage": draw(file_damage())}


def write_npz_file(path, spec):
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name: that is one of the cases
        for key, desc, content, compress in spec["members"]:
            array = make_array(desc)
            data = np.random.default_rng(desc[2]).bytes(40) if content == "garbage" else npy_bytes(array, content)
            zf.writestr(key + ".npy", data, compress_type=compress)
    damage(path, spec["damage"])


def test_any_npz_file_opens_or_is_one_user_error(workdir, small_grids, scale):
    holds(200 * scale, lambda spec: check_file(workdir, spec, "data.npz", write_npz_file), spec=npz_files())


# --- image folders ---

EXTENSIONS = [".png", ".jpg", ".jpeg", ".PNG", ".gif", ".bmp", ".webp", ".tif", ".txt"]


def encoded_image(width, height, mode, fmt, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    im = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    try:
        im.save(buf, fmt)
    except (OSError, KeyError, ValueError):  # a mode the format cannot store
        buf = io.BytesIO()
        im.convert("RGB").save(buf, fmt)
    return buf.getvalue()


def forged_png(width, height):
    """A PNG signature and header claiming width x height, then no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


@st.composite
def image_files(draw):
    """(relative path, bytes) of a file in an image folder: valid images and everything else."""
    stem = draw(
        st.one_of(
            st.sampled_from(["a", "b", "c", "sub/d", ".hidden", "é", "x y", "\udcff"]), st.text("abc/ .\n", max_size=6)
        )
    )
    ext = draw(st.sampled_from(EXTENSIONS))
    kind = draw(often(st.just("image"), st.sampled_from(["truncated", "empty", "random", "forged", "header"]), 2))
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "CMYK", "I", "F"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF"]))
    if fmt in ("JPEG", "GIF", "BMP") and mode in ("I", "F"):
        mode = "RGB"
    good = encoded_image(width, height, mode, fmt, draw(st.integers(0, 2**32 - 1)))
    cut = draw(st.floats(0, 1))
    data = {
        "image": good,
        "truncated": good[: int(len(good) * cut)],
        "empty": b"",
        "random": draw(st.binary(max_size=64)),
        "forged": forged_png(*draw(st.sampled_from([(1, 1), (0, 5), (5000, 1), (100_000, 100_000), (2**31 - 1, 1)]))),
        "header": good[:8] + draw(st.binary(max_size=64)),
    }[kind]
    return stem.strip("/") + ext, data


def write_files(folder, files):
    """Write (name, bytes) below folder, skipping a name that cannot be (a folder already, or a
    file in the way of one)."""
    for name, data in files:
        path = folder / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError:
            pass


def check_imagefolder(workdir, files):
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        folder = Path(d) / "photos"
        folder.mkdir()
        write_files(folder, files)
        opened = outcome(read_dataset, "imagefolder", folder)
        if not isinstance(opened, UserError):
            ds, caught = opened
            assert sorted(ds.files + tuple(n for n, _ in ds.skipped)) == list_images(folder)
            ours = [m for m in caught if "could not be read" in m]  # (Pillow warns of bad EXIF data, say)
            assert len(ours) == (1 if ds.skipped else 0)  # one warning lists the skipped files


def test_any_image_folder_opens_skipping_bad_files_or_is_one_user_error(workdir, scale):
    holds(
        150 * scale,
        lambda files: check_imagefolder(workdir, files),
        files=st.lists(image_files(), min_size=1, max_size=5),
    )


# --- CelebA: an attribute table naming the images ---

BAD_ATTRIBUTE_VALUES = ["0", "2", "+1", "300", "-129", "99999999999999999999", "nan", "1.0", "x"]


@st.composite
def celeba_folders(draw):
    """(image files, list_attr_celeba.txt text): mostly a well-formed table of those files."""
    files = draw(st.lists(image_files(), min_size=1, max_size=4))
    k = draw(st.integers(0, 3))
    value = often(st.sampled_from(["1", "-1"]), st.sampled_from(BAD_ATTRIBUTE_VALUES), one_in=8)
    listed = [n for n, _ in files if n.split() == [n]] or ["missing.jpg"]  # a name with a space splits
    rows = []
    for _ in range(draw(often(st.integers(1, 4), st.just(0)))):
        name = draw(often(st.sampled_from(listed), st.text(max_size=6), one_in=6))
        rows.append([name] + [draw(value) for _ in range(draw(often(st.just(k), st.integers(0, k + 1), one_in=10)))])
    count = draw(often(st.just(str(len(rows))), st.sampled_from([str(len(rows) + 1), "-1", "x", ""]), one_in=8))
    text = "\n".join([count, " ".join(f"attr_{i}" for i in range(k)), *(" ".join(r) for r in rows)]) + "\n"
    return files, text


def check_celeba(workdir, folder_spec):
    files, text = folder_spec
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        root = Path(d) / "celeba"
        (root / "img_align_celeba").mkdir(parents=True)
        write_files(root / "img_align_celeba", files)
        (root / "list_attr_celeba.txt").write_bytes(text.encode("utf-8", "surrogateescape"))
        opened = outcome(read_dataset, "celeba", root)
        if not isinstance(opened, UserError):
            ds, _ = opened
            assert ds.attributes.shape == (len(ds), len(ds.attribute_names))


def test_any_celeba_folder_opens_skipping_bad_files_or_is_one_user_error(workdir, scale):
    holds(100 * scale, lambda folder_spec: check_celeba(workdir, folder_spec), folder_spec=celeba_folders())


# ---------------------------------------------------------------------------------------------
# the crashes the properties found, each kept as a plain test (all raised another exception type)


@pytest.mark.parametrize(
    "text",
    [
        "[encdiff]\nsteps = " + "9" * 4301 + "\n",  # tomllib: ValueError (Python's int(str) limit)
        "[encdiff]\nbetas = " + "[" * 1000 + "]" * 1000 + "\n",  # tomllib: RecursionError
        "[encdiff]\nlr = 0x" + "f" * 300 + "\n",  # float() of it: OverflowError
        "[encdiff]\nsteps = 0x" + "f" * 3600 + "\n",  # str() of it in a message: ValueError
        "[run]\nout_dir = [0x" + "f" * 3600 + "]\n",  # repr() of it in a message: ValueError
        '["\\r"]\nx = 1\n',  # a line break in the message
    ],
    ids=["4301 digits", "deep arrays", "float past range", "int past str", "list past repr", "line break"],
)
def test_found_config_file_crashes(tmp_path, text):
    path = tmp_path / "found.toml"
    path.write_text(text)
    for parse in (lambda: parse_args(["--config", str(path)]), lambda: from_toml_text(text)):
        with pytest.raises(UserError) as e:
            parse()
        one_line_error(e.value)


@pytest.mark.parametrize(
    "arg",
    [
        "--encdiff.steps=" + "9" * 4301,  # ValueError
        "--encdiff.betas=" + "[" * 1000 + "]" * 1000,  # RecursionError
        "--encdiff.lr=0x" + "f" * 300,  # OverflowError
        "--encdiff.channel_mult=[0x" + "f" * 3600 + "]",  # ValueError
        "--run.\r=true",  # line breaks in the message
        "--run.\r",
    ],
    ids=["4301 digits", "deep arrays", "float past range", "list past str", "line break", "line break, no value"],
)
def test_found_command_line_crashes(arg):
    with pytest.raises(UserError) as e:
        parse_args([arg])
    one_line_error(e.value)


def test_numbers_past_64_bits_are_refused_by_name():
    with pytest.raises(UserError, match=r"command line: encdiff.steps: 2951\d+ is out of range \(more than 64 bits\)"):
        parse_args(["--encdiff.steps=0x" + "f" * 17])


def h5_bytes(tmp_path, **options):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((4, 64, 64, 3), np.uint8), **options)
        f.attrs["factor_sizes"], f.attrs["factor_names"] = [2, 2], ["a", "b"]
    return path, bytearray(path.read_bytes())


def test_found_hdf5_with_damaged_metadata(tmp_path):
    """The root group's B-tree damaged: h5py raised RuntimeError ("wrong B-tree signature")."""
    path, data = h5_bytes(tmp_path)
    i = data.index(b"TREE")
    data[i : i + 4] = b"XXXX"
    path.write_bytes(data)
    with pytest.raises(UserError, match="data.h5: damaged HDF5 file"):
        open_dataset("h5", path)


def test_found_hdf5_with_a_damaged_compressed_chunk(tmp_path):
    """It opens (the metadata is fine); reading the images raised OSError ("inflate() failed")."""
    path, data = h5_bytes(tmp_path, chunks=(1, 64, 64, 3), compression="gzip")
    with h5py.File(path, "r") as f:
        chunk = f["images"].id.get_chunk_info(0)
    data[chunk.byte_offset : chunk.byte_offset + chunk.size] = b"\xff" * chunk.size
    path.write_bytes(data)
    ds = open_dataset("h5", path)
    with pytest.raises(UserError, match="data.h5: 'images' is corrupt"):
        load_all(ds, progress=False)


def test_found_hdf5_factor_names_that_are_not_utf8(tmp_path):
    """UnicodeDecodeError from the names' decode."""
    path, _ = h5_bytes(tmp_path)
    with h5py.File(path, "a") as f:
        f.attrs["factor_names"] = np.array([b"\xff", b"b"])
    with pytest.raises(UserError, match="attribute 'factor_names' must be UTF-8 text"):
        open_dataset("h5", path)


def npz_bytes(tmp_path, array, content="npy", compress=zipfile.ZIP_STORED, name="images.npy"):
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, npy_bytes(array, content), compress_type=compress)
    return path, bytearray(path.read_bytes())


IMAGES = np.zeros((4, 64, 64, 3), np.uint8)


def test_found_npz_with_a_damaged_member_header(tmp_path, small_grids):
    """The member's local header damaged: zipfile raised BadZipFile ("Bad magic number")."""
    path, data = npz_bytes(tmp_path, IMAGES)
    data[0] ^= 1
    path.write_bytes(data)
    with pytest.raises(UserError, match="data.npz: 'images' is corrupt"):
        open_dataset("mpi3d", path)


def test_found_npz_with_a_bad_checksum(tmp_path, small_grids):
    """A member that is all header: reading the header reaches its end, where zipfile raised
    BadZipFile ("Bad CRC-32") for a changed byte."""
    path, data = npz_bytes(tmp_path, IMAGES[:0])
    i = data.index(b"   \n")  # the header's padding: still a valid header, no longer the same bytes
    data[i] = ord("\t")
    path.write_bytes(data)
    with pytest.raises(UserError, match="data.npz: 'images' is corrupt"):
        open_dataset("mpi3d", path)


def test_found_npz_whose_header_claims_more_rows_than_it_holds(tmp_path, small_grids):
    """np.memmap raised ValueError ("mmap length is greater than file size")."""
    path, _ = npz_bytes(tmp_path, IMAGES, content="bigger")
    with pytest.raises(UserError, match=r"data.npz: 'images' ends early: its shape \(104, 64, 64, 3\)"):
        open_dataset("mpi3d", path)


def test_found_npz_of_an_unknown_zip_version(tmp_path, small_grids):
    """The central directory's 'version needed' damaged: ZipFile() raised NotImplementedError."""
    path, data = npz_bytes(tmp_path, IMAGES)
    i = data.index(b"PK\x01\x02")  # the central directory entry; its 'version needed' at +6
    data[i + 6] = 67
    path.write_bytes(data)
    with pytest.raises(UserError, match="data.npz: not an .npz"):
        open_dataset("mpi3d", path)


def test_found_npz_with_a_name_flagged_utf8_that_is_not(tmp_path, small_grids):
    """ZipFile() raised UnicodeDecodeError."""
    path, data = npz_bytes(tmp_path, IMAGES, name="imágenes.npy")  # a non-ASCII name: flagged UTF-8
    data = data.replace("á".encode(), b"\xff\xff")
    path.write_bytes(data)
    with pytest.raises(UserError, match="data.npz: not an .npz"):
        open_dataset("mpi3d", path)


def test_found_dsprites_without_images(tmp_path, small_grids):
    """next() on no rows raised StopIteration."""
    path, _ = npz_bytes(tmp_path, np.zeros((0, 64, 64), np.uint8), name="imgs.npy")
    with pytest.raises(UserError, match="data.npz: holds 0 images"):
        open_dataset("dsprites", path)


def png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_found_image_folder_with_a_file_name_that_is_not_utf8(tmp_path):
    """The cache's signature encoded the name as UTF-8: UnicodeEncodeError."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / os.fsdecode(b"\xff.png")).write_bytes(png())
    ds = open_dataset("imagefolder", tmp_path / "photos")
    assert ds.files == (os.fsdecode(b"\xff.png"),) and load_all(ds, progress=False)[0, 0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("row", ["a.png 300", "a\x00.png 1"], ids=["past int8", "NUL in a name"])
def test_found_celeba_attribute_lists(tmp_path, row):
    """A value past int8 raised OverflowError; a name with a NUL byte, ValueError from os.stat."""
    (tmp_path / "img_align_celeba").mkdir()
    (tmp_path / "img_align_celeba" / "a.png").write_bytes(png())
    (tmp_path / "list_attr_celeba.txt").write_text(f"1\nattr_0\n{row}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError) as e:
            open_dataset("celeba", tmp_path)
    one_line_error(e.value)


def test_found_a_control_character_in_a_string_survives_the_written_config():
    """to_toml wrote it unescaped: the stored config (a checkpoint's) was no longer valid TOML."""
    cfg = parse_args(["--run.out_dir=runs/a\x1fb\tc\x7f"])
    assert from_toml_text(config.to_toml(cfg)) == cfg


def test_found_hdf5_with_a_name_that_is_not_utf8(tmp_path):
    """The "no dataset" message joined h5py's names, which are bytes when not UTF-8: TypeError."""
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f.create_dataset(b"\xff", data=IMAGES)
    with pytest.raises(UserError, match=r"no dataset 'images' \(found: b'\\xff'\)"):
        open_dataset("h5", tmp_path / "data.h5")


def test_found_npz_whose_header_is_not_python(tmp_path, small_grids):
    """An unclosed bracket in the .npy header: numpy's retry raised tokenize.TokenError."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (4, 64, 64, 3, }".ljust(117) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + IMAGES.tobytes()
    with zipfile.ZipFile(tmp_path / "data.npz", "w") as zf:
        zf.writestr("images.npy", npy)
    with pytest.raises(UserError, match="data.npz: 'images' is not a valid .npy array"):
        open_dataset("mpi3d", tmp_path / "data.npz")


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "compressed"])
def test_found_npz_whose_header_claims_a_negative_size(tmp_path, small_grids, compress):
    """numpy reads (-5, 64, 64, 3) as given: np.memmap raised OverflowError, len() ValueError."""
    path, _ = npz_bytes(tmp_path, IMAGES, content="negative", compress=compress)
    with pytest.raises(UserError, match=r"data.npz: 'images' has shape \(-5, 64, 64, 3\), a negative size"):
        open_dataset("mpi3d", path)
