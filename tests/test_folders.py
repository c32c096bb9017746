"""celeba and imagefolder readers on small folders written here: crop geometry, attributes, the
decoded-image cache (reuse, invalidation, atomic files, read-only data), unreadable images skipped
with one warning, and every user mistake as one UserError."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from encdiff.data import DATASETS, load_all, open_dataset
from encdiff.data import folders
from encdiff.errors import UserError

CELEBA_NAMES = [f"attr_{k}" for k in range(5)]


def solid(w, h, rgb):
    return Image.new("RGB", (w, h), rgb)


def framed(w, h, inner_side, inner=(0, 200, 0), outer=(0, 0, 255)):
    """An image of colour `outer` with a centred inner_side x inner_side square of colour `inner`."""
    im = np.full((h, w, 3), outer, np.uint8)
    top, left = (h - inner_side) // 2, (w - inner_side) // 2
    im[top : top + inner_side, left : left + inner_side] = inner
    return Image.fromarray(im)


def write_celeba(root, n=6, missing=(), corrupt=()):
    """An aligned-CelebA-like folder: 178 x 218 JPEGs whose red channel encodes the row, and a
    list_attr_celeba.txt (count, names, then -1/1 values with the release's double spaces)."""
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    rs = np.random.RandomState(0)
    attrs = rs.randint(0, 2, size=(n, len(CELEBA_NAMES)))
    lines = [str(n), " ".join(CELEBA_NAMES)]
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        lines.append(name + "".join(f" {v:2d}" for v in 2 * attrs[i] - 1))
        if i in missing:
            continue
        if i in corrupt:
            (folder / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            continue
        solid(178, 218, (20 + 40 * i, 100, 100)).save(folder / name, quality=95)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return attrs


def write_folder(root):
    """Mixed sizes, modes and formats, in a subfolder too, with non-images and hidden files around."""
    root.mkdir(parents=True)
    solid(40, 40, (255, 0, 0)).save(root / "a_red.png")
    solid(300, 120, (0, 255, 0)).save(root / "b_green_wide.jpg", quality=95)
    Image.new("L", (70, 90), 128).save(root / "c_grey.bmp")
    Image.new("RGBA", (64, 64), (0, 0, 255, 255)).save(root / "d_blue_rgba.png")
    (root / "sub").mkdir()
    framed(200, 100, 100).save(root / "sub" / "e_framed.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    solid(10, 10, (1, 2, 3)).save(root / ".hidden" / "x.png")
    return ["a_red.png", "b_green_wide.jpg", "c_grey.bmp", "d_blue_rgba.png", "sub/e_framed.png"]


def quiet_open(name, path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning expected
        return open_dataset(name, path)


def test_imagefolder_reads_every_image_sorted_and_center_cropped(tmp_path):
    names = write_folder(tmp_path / "photos")
    ds = quiet_open("imagefolder", tmp_path / "photos")
    assert "imagefolder" in DATASETS and ds.factor_sizes is None and ds.factor_names is None
    assert ds.attributes is None and list(ds.files) == names and ds.skipped == []
    images = load_all(ds)
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape == (5, 64, 64, 3)
    assert ds.images.shape == images.shape and len(ds) == 5
    expected = [(255, 0, 0), (0, 255, 0), (128, 128, 128), (0, 0, 255), (0, 200, 0)]
    for image, rgb in zip(images, expected):
        # "sub/e_framed.png": the centred square of a 200 x 100 image is its green square (the
        # antialiasing kernel reaches one source pixel past the crop: the outermost ring may tint)
        assert np.abs(image[1:-1, 1:-1].astype(int) - rgb).max() <= 4  # Lanczos rings a little


def test_celeba_crop_is_the_central_two_thirds_of_the_width(tmp_path):
    """A frame outside a centred 124 px square is cut away; outside a 112 px square it shows at
    the border: the crop is between the two (2/3 of 178 = 118.7 px)."""
    for inner, frame_visible in ((124, False), (112, True)):
        root = tmp_path / str(inner)
        write_celeba(root, n=1)
        framed(178, 218, inner).save(root / "img_align_celeba" / "000001.png")
        (root / "img_align_celeba" / "000001.jpg").unlink()
        (root / "list_attr_celeba.txt").write_text(
            (root / "list_attr_celeba.txt").read_text().replace("000001.jpg", "000001.png")
        )
        image = load_all(quiet_open("celeba", root))[0].astype(int)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])  # (4 * 64, 3)
        blue_at_border = (border[:, 2] > 60).any()
        assert blue_at_border == frame_visible, inner
        assert np.abs(image[20:44, 20:44] - (0, 200, 0)).max() <= 3  # the centre is the inner square


def test_celeba_attributes_follow_their_images(tmp_path):
    attrs = write_celeba(tmp_path, n=6)
    ds = quiet_open("celeba", tmp_path)
    assert ds.attribute_names == tuple(CELEBA_NAMES) and ds.factor_sizes is None
    assert ds.attributes.dtype == np.uint8 and np.array_equal(ds.attributes, attrs)
    red = load_all(ds)[:, 32, 32, 0].astype(int)
    assert np.abs(red - (20 + 40 * np.arange(6))).max() <= 3  # row i is image i


def test_unreadable_images_are_skipped_with_one_warning(tmp_path):
    attrs = write_celeba(tmp_path, n=6, missing=(1,), corrupt=(4,))
    with pytest.warns(UserWarning) as caught:
        ds = open_dataset("celeba", tmp_path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 2 of 6" in message and "000002.jpg" in message and "000005.jpg" in message
    assert list(ds.files) == ["000001.jpg", "000003.jpg", "000004.jpg", "000006.jpg"]
    assert np.array_equal(ds.attributes, attrs[[0, 2, 3, 5]])
    red = load_all(ds)[:, 32, 32, 0].astype(int)
    assert np.abs(red - (20 + 40 * np.array([0, 2, 3, 5]))).max() <= 3
    # a truncated file in an image folder is skipped the same way
    folder = tmp_path / "photos"
    write_folder(folder)
    data = (folder / "b_green_wide.jpg").read_bytes()
    (folder / "b_green_wide.jpg").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="skipped 1 of 5 .*b_green_wide.jpg"):
        assert len(open_dataset("imagefolder", folder)) == 4


def test_the_cache_is_reused_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    write_folder(folder)
    first = load_all(quiet_open("imagefolder", folder)).copy()
    cache = folder / ".encdiff_cache"
    assert (cache / "imagefolder_64.npy").is_file() and (cache / "imagefolder_64.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # temporary files renamed or removed

    calls = []
    decode = folders.decode_square
    monkeypatch.setattr(folders, "decode_square", lambda *a: calls.append(a) or decode(*a))
    ds = quiet_open("imagefolder", folder)
    assert calls == [] and ds.images.memory_mapped and np.array_equal(load_all(ds), first)

    solid(50, 50, (9, 9, 9)).save(folder / "f_new.png")  # a new file: decoded again
    ds = quiet_open("imagefolder", folder)
    assert len(calls) == 6 and ds.files[4] == "f_new.png"
    old_rows = [0, 1, 2, 3, 5]  # "sub/e_framed.png" now sorts after "f_new.png"
    assert np.array_equal(load_all(ds)[old_rows], first)
    (cache / "imagefolder_64.npy").write_bytes(b"garbage")  # a damaged cache: decoded again
    assert np.array_equal(load_all(quiet_open("imagefolder", folder))[old_rows], first) and len(calls) == 12


def test_read_only_data_is_cached_in_the_user_cache(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    write_folder(folder)
    home_cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home_cache))
    real_writable = folders.writable
    monkeypatch.setattr(folders, "writable", lambda d: not d.is_relative_to(folder) and real_writable(d))
    ds = quiet_open("imagefolder", folder)
    assert len(ds) == 5 and not (folder / ".encdiff_cache").exists()
    assert list(home_cache.glob("encdiff/*/imagefolder_64.npy"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no folder", "no such folder"),
        ("no attribute file", "no list_attr_celeba.txt"),
        ("no image folder", "no img_align_celeba"),
        ("bad count", "announces 7 images but 6 rows follow"),
        ("bad value", "line 5: attribute values must be -1 or 1"),
        ("short row", "line 4 has 4 values for 5 attributes"),
        ("all unreadable", "none of the 6 images could be read"),
    ],
)
def test_celeba_mistakes_are_one_clear_error(tmp_path, case, message):
    root = tmp_path / "celeba"
    if case != "no folder":
        write_celeba(root, corrupt=range(6) if case == "all unreadable" else ())
    attr = root / "list_attr_celeba.txt"
    if case == "no attribute file":
        attr.unlink()
    elif case == "no image folder":
        (root / "img_align_celeba").rename(root / "elsewhere")
    elif case in ("bad count", "bad value", "short row"):
        lines = attr.read_text().splitlines()
        if case == "bad count":
            lines[0] = "7"
        elif case == "bad value":
            lines[4] = lines[4][:-2] + " 0"
        else:
            lines[3] = lines[3].rsplit(" ", 1)[0]
        attr.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match=message) as e:
            open_dataset("celeba", root)
    assert "\n" not in str(e.value)


def test_imagefolder_mistakes_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        open_dataset("imagefolder", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images found"):
        open_dataset("imagefolder", tmp_path / "empty")


def test_the_download_layout_and_the_image_folder_itself_are_found(tmp_path):
    attrs = write_celeba(tmp_path / "flat", n=3)
    root = tmp_path / "download"
    (root / "Img").mkdir(parents=True)
    (root / "Anno").mkdir()
    os.rename(tmp_path / "flat" / "img_align_celeba", root / "Img" / "img_align_celeba")
    os.rename(tmp_path / "flat" / "list_attr_celeba.txt", root / "Anno" / "list_attr_celeba.txt")
    assert np.array_equal(quiet_open("celeba", root).attributes, attrs)
    (root / "Img" / "list_attr_celeba.txt").write_bytes((root / "Anno" / "list_attr_celeba.txt").read_bytes())
    assert len(quiet_open("celeba", root / "Img" / "img_align_celeba")) == 3


def test_many_images_decode_in_parallel_in_order_and_once_for_concurrent_readers(tmp_path, monkeypatch):
    """Above 256 images a thread pool decodes; two readers at once (two ranks) decode once."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path / "many"
    folder.mkdir()
    n = 300
    for i in range(n):
        solid(8, 8, (i % 256, i // 256 * 100, 7)).save(folder / f"{i:04d}.png")
    calls = []
    decode = folders.decode_square
    monkeypatch.setattr(folders, "decode_square", lambda *a: calls.append(a) or decode(*a))
    with ThreadPoolExecutor(2) as pool:
        # open_dataset, not quiet_open: catch_warnings is not thread-safe (it would leave "error" on)
        opened = list(pool.map(lambda _: open_dataset("imagefolder", folder), range(2)))
    assert len(calls) == n
    for ds in opened:
        pixels = load_all(ds)[:, 32, 32].astype(int)  # (n, 3)
        assert np.array_equal(pixels[:, 0], np.arange(n) % 256)
        assert np.array_equal(pixels[:, 1], np.arange(n) // 256 * 100)


def test_concurrent_readers_in_one_process_all_see_a_writable_cache_folder(tmp_path):
    """The write probe is unique per call: threads of one process (one pid) used to delete each
    other's probe, and the loser then decoded a second copy into the user cache (a CI flake)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: folders.writable(tmp_path), range(2000)))
    assert all(answers)
    assert list(tmp_path.iterdir()) == []  # no probe left behind
