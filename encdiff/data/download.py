"""Download a published dataset, resume where a download stopped, and check that it opens.

    python -m encdiff.data.download shapes3d --out /data          # /data/3dshapes.h5
    python -m encdiff.data.download cars3d --out /data            # /data/cars/ (183 .mat files)
    python -m encdiff.data.download mpi3d_real --out /data --from http://lab-server/datasets/

Names: the keys of SOURCES. --from BASE fetches the same file name from a mirror (BASE/3dshapes.h5)
instead of the authors' address.

A download goes to <file>.part beside its target and continues from the end of that file (HTTP
Range) after a cut connection, a full disk or Ctrl-C: rerun the same command. Only a complete and
verified file is renamed (os.replace) to its final name, so whatever is under that name is whole;
a download that is not its dataset is kept as <file>.bad, never under the final name. Cars3D is a
tarball: its data/cars/*.mat are unpacked into cars.part/, verified, renamed to cars/, and the
tarball is deleted. A target that is already there is verified and nothing is fetched.

Verified means:
- every byte arrived: the Content-Length the server announced, and SOURCES' size where the authors
  state one (none of them does, so it is None in every row);
- the project's own loader opens it (encdiff.data.formats.open_dataset): uint8 images (N, 64, 64, 3)
  with N = the product of the factor sizes the loader reports (GroundTruthDataset enforces it);
- N is the count the authors publish (SOURCES' images).
A --from mirror is held to the same checks, as it serves the same files; there is no switch that
skips them. The tests serve small files in the real formats and shrink the loader's factor grids
(formats.FACTORS) and SOURCES' counts to match. Opening reads the headers (and dSprites' first
image), not every compressed byte: the byte count is what says the file is complete.
"""

import errno
import gzip
import os
import shlex
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from http.client import HTTPException
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from encdiff.data.formats import import_loadmat, open_dataset
from encdiff.errors import ArgumentParser, UserError, exit_on_user_error
from encdiff.images import IMAGE_SHAPE

BLOCK = 1 << 20  # bytes per read and write
TIMEOUT = 60  # seconds without a byte before the connection counts as cut
USER_AGENT = "encdiff-download"  # some servers refuse urllib's default agent


class Source(NamedTuple):
    url: str  # where its authors publish it
    file: str  # the file name there, and on a --from mirror
    loader: str  # the dataset name for open_dataset and data.name
    images: int  # how many images the authors publish
    size: int | None  # bytes, where the source states it
    member: str | None = None  # in a tarball: the folder that is the dataset, unpacked under its last name


SOURCES = {
    # github.com/deepmind/3d-shapes README: 3dshapes.h5 in the Google Cloud Storage bucket 3d-shapes.
    "shapes3d": Source(
        "https://storage.googleapis.com/3d-shapes/3dshapes.h5", "3dshapes.h5", "shapes3d", 480_000, None
    ),
    # github.com/google-research/disentanglement_lib bin/dlib_download_data (the dSprites repository's own file).
    "dsprites": Source(
        "https://github.com/deepmind/dsprites-dataset/raw/master/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
        "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
        "dsprites",
        737_280,
        None,
    ),
    # github.com/rr-learning/disentanglement_dataset README "Downloads" (moved to Hugging Face in 2025,
    # when mpi3d_real.npz was also replaced by a corrected file).
    "mpi3d_toy": Source(
        "https://huggingface.co/datasets/waleedgondal/mpi3d/resolve/main/mpi3d_toy.npz",
        "mpi3d_toy.npz",
        "mpi3d",
        1_036_800,
        None,
    ),
    "mpi3d_realistic": Source(
        "https://huggingface.co/datasets/waleedgondal/mpi3d/resolve/main/mpi3d_realistic.npz",
        "mpi3d_realistic.npz",
        "mpi3d",
        1_036_800,
        None,
    ),
    "mpi3d_real": Source(
        "https://huggingface.co/datasets/waleedgondal/mpi3d/resolve/main/mpi3d_real.npz",
        "mpi3d_real.npz",
        "mpi3d",
        1_036_800,
        None,
    ),
    # github.com/google-research/disentanglement_lib bin/dlib_download_data (Reed et al., NeurIPS 2015):
    # 183 cars x 4 elevations x 24 azimuths.
    "cars3d": Source(
        "http://www.scottreed.info/files/nips2015-analogy-data.tar.gz",
        "nips2015-analogy-data.tar.gz",
        "cars3d",
        17_568,
        None,
        member="data/cars",
    ),
}

CELEBA = (
    "CelebA has no downloader: its official Google Drive (linked from "
    "mmlab.ie.cuhk.edu.hk/projects/CelebA.html) needs a browser; put img_align_celeba/ (unzipped) and "
    "list_attr_celeba.txt in one folder and train with --config configs/celeba.toml --data.path=FOLDER"
)


def target_of(source, out):
    """Where the dataset ends up: the file, or the tarball's folder under its last name (data/cars -> cars)."""
    return out / (Path(source.member).name if source.member else source.file)


def command_for(loader, path):
    """How to get a missing dataset file or folder `path` of a loader ("mpi3d", ...), for its error message."""
    path = Path(path)
    names = [n for n, s in SOURCES.items() if s.loader == loader]
    name = next((n for n in names if target_of(SOURCES[n], path.parent) == path), names[0])
    command = f"get it with: python -m encdiff.data.download {name} --out {shlex.quote(str(path.parent))}"
    target = target_of(SOURCES[name], path.parent)
    if target != path:  # a renamed file, or an MPI3D variant the file name does not tell
        others = [n for n in names if n != name]
        command += (f" (or {', '.join(others)})" if others else "") + f" and set data.path={target}"
    return command


def size_text(n):
    return tqdm.format_sizeof(n, "B")


# --- fetching ---


def open_url(url, start):
    """The response for url from byte `start` on; None when nothing follows it (HTTP 416: the part is whole)."""
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            return None
        hint = " (the server failed: try again later)" if e.code >= 500 else ""
        raise UserError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot reach {url}: {reason} (no network, or a wrong address?)") from None
    except ValueError as e:  # urllib's word for a malformed address
        raise UserError(f"{url}: not a URL ({e})") from None


class Broken(Exception):
    """The connection broke mid-file (not an OSError: those, while copying, are the disk's)."""


def blocks(response):
    """The body in blocks. A cut with a Content-Length just ends early (the caller counts the bytes)."""
    while True:
        try:
            block = response.read(BLOCK)
        except (OSError, HTTPException) as e:  # reset, timeout, a chunked body cut short
            raise Broken from e
        if not block:
            return
        yield block


def write_error(e, part, total):
    if e.errno == errno.ENOSPC:
        need = f": {size_text(total - part.stat().st_size)} more needed" if total and part.exists() else ""
        return f"{part.parent}: disk full{need}; free some space and rerun: the download resumes from {part.name}"
    return f"{part}: cannot write ({e.strerror or e})"


def fetch(url, part):
    """Download url into `part`, continuing from its end; return once it holds the whole file."""
    have = part.stat().st_size if part.exists() else 0
    response = open_url(url, have)
    if response is None:
        return
    with response:
        if have and response.status != 206:  # the server ignored the Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        free = shutil.disk_usage(part.parent).free
        if total is not None and total - have > free:
            raise UserError(f"{part.parent}: {size_text(total - have)} needed for {url}, {size_text(free)} free")
        print(f"{url} -> {part}" + (f" (resuming at {size_text(have)})" if have else ""))
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, disable=None)
        broken = False
        try:
            with bar, open(part, "ab" if have else "wb") as f:
                for block in blocks(response):
                    f.write(block)
                    bar.update(len(block))
        except Broken:
            broken = True
        except OSError as e:
            raise UserError(write_error(e, part, total)) from None
    got = part.stat().st_size
    if broken or (total is not None and got != total):
        of = f" of {size_text(total)}" if total is not None else ""
        raise UserError(
            f"{url}: the connection broke after {size_text(got)}{of}; rerun the same command: it resumes from {part}"
        )


# --- checking and installing ---


def verify(name, source, path):
    """The dataset at `path` opened by the project's loader; UserError unless it is `name` as published."""
    ds = open_dataset(source.loader, path)
    if tuple(ds.images.shape[1:]) != IMAGE_SHAPE:
        raise UserError(f"{path}: images of shape {ds.images.shape[1:]}, expected {IMAGE_SHAPE}")
    if len(ds) != source.images:
        raise UserError(f"{path}: {len(ds):,} images, where {name} has {source.images:,}")
    return ds


def unpack(tarball, member, folder):
    """The .mat files directly in `member` of the tarball, into a fresh `folder` (by name: nothing else escapes)."""
    shutil.rmtree(folder, ignore_errors=True)  # half unpacked by an interrupted run
    folder.mkdir()
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for m in tar:
                if m.isfile() and str(Path(m.name).parent) == member and m.name.endswith(".mat"):
                    with tar.extractfile(m) as src, open(folder / Path(m.name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{tarball}: not a readable .tar.gz ({e})") from None
    except OSError as e:
        raise UserError(write_error(e, folder, None)) from None


def reject(part, url, name, reason):
    """Move a download that is not its dataset out of the way, kept for a look, and say so."""
    bad = part.with_suffix(".bad")  # 3dshapes.h5.part -> 3dshapes.h5.bad
    os.replace(part, bad)
    reason = " ".join(str(reason).split())  # one line, whatever the library said
    raise UserError(f"{url}: downloaded, but it is not {name} ({reason}); kept as {bad}: delete it")


def install(name, source, part, target, url):
    """Verify the complete download `part` and move it (or the folder it unpacks to) to `target`."""
    check = target.with_name(target.name + ".part") if source.member else part
    try:
        if source.size is not None and part.stat().st_size != source.size:
            raise UserError(f"{part}: {part.stat().st_size:,} bytes, where its source states {source.size:,}")
        if source.member:
            unpack(part, source.member, check)
        ds = verify(name, source, check)
    except UserError as e:
        if source.member:
            shutil.rmtree(check, ignore_errors=True)
        reject(part, url, name, e)
    os.replace(check, target)
    if source.member:
        part.unlink()
    return ds


def download(name, out, base=None):
    """Fetch the dataset `name` into the folder `out` (from the mirror `base` if given); return its path."""
    source = SOURCES[name]
    out.mkdir(parents=True, exist_ok=True)
    target = target_of(source, out)
    if target.exists():
        try:
            ds = verify(name, source, target)
        except UserError as e:
            raise UserError(f"{e}; it is there but not {name} as published: move it away and rerun") from None
        print(f"{name}: {target} is already there and verified ({len(ds):,} images)")
        return target
    if source.loader == "cars3d":
        import_loadmat()  # checking Cars3D needs scipy: say so before the download, not after it
    url = f"{base.rstrip('/')}/{source.file}" if base else source.url
    part = out / (source.file + ".part")
    fetch(url, part)
    ds = install(name, source, part, target, url)
    print(
        f"{name}: {target} ({len(ds):,} images, verified); train with --data.name={source.loader} --data.path={target}"
    )
    return target


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m encdiff.data.download",
        description="Download a published dataset, resuming where a download stopped (encdiff/data/download.py).",
        epilog=CELEBA,
    )
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(SOURCES)}")
    parser.add_argument("--out", default="data", help="the folder to put it in (default: data)")
    parser.add_argument("--from", dest="base", metavar="BASE", help="a mirror's base URL holding the same file names")
    args = parser.parse_args(argv)
    if args.name not in SOURCES:
        raise UserError(f"unknown dataset {args.name!r}: choose one of {', '.join(SOURCES)}. {CELEBA}")
    try:
        download(args.name, Path(args.out), args.base)
    except KeyboardInterrupt:
        print("\ninterrupted: the .part file stays; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    exit_on_user_error(main)
