"""python -m encdiff.data.download against a local HTTP server (with Range support): no test touches the internet.

The served files are in the real formats but small; the `small` fixture shrinks the loader's factor
grids and the downloader's published counts to match them (the downloader has no switch that skips checks).
"""

import errno
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h5py
import numpy as np
import pytest
from encdiff.data import download, formats
from encdiff.data.formats import open_dataset
from encdiff.errors import UserError, exit_on_user_error

try:
    from scipy.io import savemat
except ImportError:  # scipy is optional: only Cars3D's .mat files need it
    savemat = None
needs_scipy = pytest.mark.skipif(savemat is None, reason="writing and reading .mat files needs scipy")

SMALL = {"shapes3d": 4, "dsprites": 4, "mpi3d": 4, "cars3d": 4 * 24 * 2}  # images per loader: 2x2 grids, 2 cars


@pytest.fixture
def small(monkeypatch):
    """Grids of 2 x 2 (other factors 1) for the fixed-grid loaders, and the published counts to match."""
    for loader in ("shapes3d", "dsprites", "mpi3d"):
        names = [n for n, _ in formats.FACTORS[loader]]
        sizes = [2, 2] + [1] * (len(names) - 2)
        monkeypatch.setitem(formats.FACTORS, loader, tuple(zip(names, sizes)))
    for name, source in download.SOURCES.items():
        monkeypatch.setitem(download.SOURCES, name, source._replace(images=SMALL[source.loader]))


# --- the files, in the published formats ---


def rng_images(n, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(n, 64, 64, 3)).astype(np.uint8)


def to_bytes(save):
    buf = io.BytesIO()
    save(buf)
    return buf.getvalue()


def shapes3d_file():
    def save(buf):
        with h5py.File(buf, "w") as f:
            f.create_dataset("images", data=rng_images(4))
            f.create_dataset("labels", data=np.zeros((4, 6)))

    return to_bytes(save)


def dsprites_file():
    masks = np.random.RandomState(1).randint(0, 2, size=(4, 64, 64)).astype(np.uint8)
    return to_bytes(lambda buf: np.savez(buf, imgs=masks, latents_classes=np.zeros((4, 6), np.int64)))


def mpi3d_file():
    return to_bytes(lambda buf: np.savez(buf, images=rng_images(4, seed=2)))


def car_mat(seed):
    im = np.random.RandomState(seed).randint(0, 256, size=(8, 8, 3, 24, 4)).astype(np.uint8)
    return to_bytes(lambda buf: savemat(buf, {"im": im}))


def cars3d_tarball(cars):
    """The analogy-data tarball's layout: data/cars/*.mat beside other folders that are not Cars3D."""

    def save(buf):
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in {**cars, "data/sprites/notes.txt": b"not cars"}.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    return to_bytes(save)


CARS = {f"data/cars/car_{i:03d}_mesh.mat": car_mat(i) for i in (1, 2)} if savemat else {}
FILES = {
    "3dshapes.h5": shapes3d_file(),
    "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz": dsprites_file(),
    "mpi3d_real.npz": mpi3d_file(),
    "mpi3d_toy.npz": mpi3d_file(),
    "nips2015-analogy-data.tar.gz": cars3d_tarball(CARS),
}


# --- the server ---


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        name, ranged = self.path.lstrip("/"), self.headers.get("Range")
        server.requests.append((name, ranged))
        if name.startswith("moved/"):  # as GitHub's and Hugging Face's addresses redirect to a file server
            self.send_response(302)
            self.send_header("Location", "/" + name.removeprefix("moved/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if name in server.fail:
            return self.send_error(server.fail[name])
        if name not in server.files:
            return self.send_error(404)
        data = server.files[name]
        start = int(ranged.removeprefix("bytes=").removesuffix("-")) if ranged else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = server.cut.pop(name, None)  # drop the connection after this many bytes, once
        self.wfile.write(data[start:] if cut is None else data[start : start + cut])

    def log_message(self, *args):
        pass  # no request log in the test output


@pytest.fixture
def mirror():
    """A mirror on 127.0.0.1: .files (name -> bytes), .fail (name -> status), .cut (name -> bytes), .requests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.files, server.fail, server.cut, server.requests = dict(FILES), {}, {}, []
    server.base = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run(capsys, *args):
    """The command, in this process: (exit status, stdout, stderr)."""
    try:
        exit_on_user_error(lambda: download.main([str(a) for a in args]))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def fails(capsys, *args):
    """The command's error: one line on stderr, exit status 2."""
    code, _, err = run(capsys, *args)
    return one_line_error(code, err)


# --- tests ---


@pytest.mark.parametrize("name", ["shapes3d", "dsprites", "mpi3d_real", pytest.param("cars3d", marks=needs_scipy)])
def test_downloads_from_a_mirror_and_verifies(name, small, mirror, tmp_path, capsys):
    code, out, err = run(capsys, name, "--out", tmp_path, "--from", mirror.base)
    assert code == 0, err
    source = download.SOURCES[name]
    target = download.target_of(source, tmp_path)
    assert "verified" in out and f"--data.path={target}" in out
    if source.member:  # unpacked: exactly the cars, byte for byte; the tarball and the temporary folder gone
        assert {p.name: p.read_bytes() for p in target.iterdir()} == {n.split("/")[-1]: d for n, d in CARS.items()}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cars"]
    else:
        assert target.read_bytes() == FILES[source.file]
        assert [p.name for p in tmp_path.iterdir()] == [source.file]
    assert len(open_dataset(source.loader, target)) == SMALL[source.loader]


@pytest.mark.parametrize("via", ["", "moved/"], ids=["direct", "through-a-redirect"])
def test_a_cut_connection_resumes_to_the_same_bytes(via, small, mirror, tmp_path, capsys):
    data = FILES["mpi3d_toy.npz"]
    mirror.cut["mpi3d_toy.npz"] = len(data) // 2
    err = fails(capsys, "mpi3d_toy", "--out", tmp_path, "--from", mirror.base + via)
    assert "connection broke" in err and "rerun" in err
    assert not (tmp_path / "mpi3d_toy.npz").exists()
    assert (tmp_path / "mpi3d_toy.npz.part").stat().st_size == len(data) // 2

    code, _, err = run(capsys, "mpi3d_toy", "--out", tmp_path, "--from", mirror.base + via)
    assert code == 0, err
    assert mirror.requests[-1] == ("mpi3d_toy.npz", f"bytes={len(data) // 2}-")  # the Range survives a redirect
    assert (tmp_path / "mpi3d_toy.npz").read_bytes() == data
    assert not (tmp_path / "mpi3d_toy.npz.part").exists()


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors(status, small, mirror, tmp_path, capsys):
    mirror.fail["3dshapes.h5"] = status
    err = fails(capsys, "shapes3d", "--out", tmp_path, "--from", mirror.base)
    assert f"HTTP {status}" in err and "3dshapes.h5" in err
    assert list(tmp_path.iterdir()) == []


def test_connection_refused(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = fails(capsys, "shapes3d", "--out", tmp_path, "--from", f"http://127.0.0.1:{port}")
    assert "cannot reach" in err and "refused" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, file, data",
    [
        ("shapes3d", "3dshapes.h5", b"<html>please log in</html>"),
        ("mpi3d_toy", "mpi3d_toy.npz", FILES["dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"]),  # another dataset
        pytest.param("cars3d", "nips2015-analogy-data.tar.gz", b"\x1f\x8b not gzip", marks=needs_scipy),
    ],
    ids=["a-web-page", "another-dataset", "not-gzip"],
)
def test_a_file_that_is_not_the_dataset_never_gets_the_final_name(name, file, data, small, mirror, tmp_path, capsys):
    mirror.files[file] = data
    err = fails(capsys, name, "--out", tmp_path, "--from", mirror.base)
    assert f"not {name}" in err and ".bad" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [file + ".bad"]


def test_a_size_the_source_states_is_checked(small, mirror, tmp_path, capsys, monkeypatch):
    source = download.SOURCES["shapes3d"]
    monkeypatch.setitem(download.SOURCES, "shapes3d", source._replace(size=len(FILES["3dshapes.h5"]) + 1))
    err = fails(capsys, "shapes3d", "--out", tmp_path, "--from", mirror.base)
    assert "its source states" in err
    assert not (tmp_path / "3dshapes.h5").exists()


def test_a_finished_file_is_not_fetched_again(small, mirror, tmp_path, capsys):
    assert run(capsys, "dsprites", "--out", tmp_path, "--from", mirror.base)[0] == 0
    mirror.requests.clear()
    code, out, err = run(capsys, "dsprites", "--out", tmp_path, "--from", mirror.base)
    assert code == 0, err
    assert "already there and verified" in out and out.count("\n") == 1
    assert mirror.requests == []


def test_a_bad_file_under_the_final_name_is_reported_not_replaced(small, mirror, tmp_path, capsys):
    (tmp_path / "3dshapes.h5").write_bytes(b"junk")
    err = fails(capsys, "shapes3d", "--out", tmp_path, "--from", mirror.base)
    assert "move it away" in err
    assert (tmp_path / "3dshapes.h5").read_bytes() == b"junk" and mirror.requests == []


def test_an_unknown_name_lists_the_names_and_says_how_to_get_celeba(tmp_path, capsys):
    err = fails(capsys, "celeba", "--out", tmp_path)
    assert all(name in err for name in download.SOURCES)
    assert "img_align_celeba/" in err and "list_attr_celeba.txt" in err


class FailingFile:
    """A file whose writes raise `error` once `room` bytes are written (a disk filling up, a Ctrl-C)."""

    def __init__(self, f, room, error):
        self.f, self.room, self.error = f, room, error

    def write(self, data):
        if len(data) > self.room:
            raise self.error
        self.room -= len(data)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize(
    "error, code",
    [(OSError(errno.ENOSPC, "No space left on device"), 2), (KeyboardInterrupt, 130)],
    ids=["ENOSPC", "ctrl-c"],
)
def test_a_full_disk_or_ctrl_c_keeps_the_part_for_resume(error, code, small, mirror, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(download, "BLOCK", 1024)
    monkeypatch.setattr(download, "open", lambda *a, **k: FailingFile(open(*a, **k), 2048, error), raising=False)
    got, _, err = run(capsys, "mpi3d_toy", "--out", tmp_path, "--from", mirror.base)
    assert got == code, err
    if code == 2:
        one_line_error(got, err)
        assert "disk full" in err and "more needed" in err
    assert not (tmp_path / "mpi3d_toy.npz").exists()
    assert (tmp_path / "mpi3d_toy.npz.part").stat().st_size == 2048

    monkeypatch.delattr(download, "open")  # space again
    assert run(capsys, "mpi3d_toy", "--out", tmp_path, "--from", mirror.base)[0] == 0
    assert mirror.requests[-1] == ("mpi3d_toy.npz", "bytes=2048-")
    assert (tmp_path / "mpi3d_toy.npz").read_bytes() == FILES["mpi3d_toy.npz"]


@pytest.mark.parametrize(
    "loader, path, command",
    [
        ("shapes3d", "3dshapes.h5", "shapes3d --out {dir}"),
        ("mpi3d", "mpi3d_realistic.npz", "mpi3d_realistic --out {dir}"),
        (
            "dsprites",
            "dsprites.npz",
            "dsprites --out {dir} and set data.path={dir}/" + download.SOURCES["dsprites"].file,
        ),
        ("cars3d", "cars", "cars3d --out {dir}"),
    ],
)
def test_a_missing_dataset_names_its_download_command(loader, path, command, tmp_path):
    with pytest.raises(UserError) as e:
        open_dataset(loader, tmp_path / path)
    message = str(e.value)
    assert "\n" not in message
    assert message.endswith("; get it with: python -m encdiff.data.download " + command.format(dir=tmp_path))
