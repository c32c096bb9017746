"""shapes2d: a third procedural ground-truth set, with factor kinds the other two lack: an in-plane
rotation of asymmetric shapes and the background's brightness. Written in the generic HDF5 format,
for checking a preset on data it was not tuned on.

    python -m encdiff.data.shapes2d --out data/shapes2d.h5     # 9,600 images, 6 factors
    python -m encdiff.data.shapes2d --out data/shapes2d_big.h5 --size 0.28   # the shapes 1.65x as large

Factors (row-major, last fastest): shape 4 (arrow, L, T, half-disc: none of them looks the same
after any of the rotations, so the angle can be read off the image), orientation 8 (45 degree
steps), hue 4, background 3 (dark to light grey), x 5, y 5. Every factor combination gives a
distinct image, and a one-step change of any factor changes the image (tested).
"""

import argparse
import colorsys

import h5py
import numpy as np
from tqdm import tqdm

from encdiff.data.synth import write_via_temp
from encdiff.errors import UserError, exit_on_user_error

FACTOR_NAMES = ("shape", "orientation", "hue", "background", "pos_x", "pos_y")
SHAPES = ("arrow", "L", "T", "half_disc")
ORIENTATIONS = np.arange(8) * (np.pi / 4)
HUES = np.arange(4) / 4
BACKGROUNDS = np.array([0.08, 0.3, 0.55], np.float32)
N_POSITIONS = 5
FACTOR_SIZES = (len(SHAPES), len(ORIENTATIONS), len(HUES), len(BACKGROUNDS), N_POSITIONS, N_POSITIONS)
RES = 64
SUPERSAMPLE = 4
SIZE = 0.17  # half-extent of a shape, in units of the image side (about 22 pixels across)
SIZES = (0.1, 0.3)  # the --size range: no shape point is further than 1.25 half-extents from its centre


def inside(shape, u, v):
    """Whether the points (u, v) of the shape's own frame (unit half-extent, +u its 'forward') are in it."""
    if shape == "arrow":  # a shaft and a head pointing along +u
        shaft = (u >= -0.9) & (u <= 0.15) & (np.abs(v) <= 0.22)
        head = (u >= 0.15) & (u <= 0.95) & (np.abs(v) <= (0.95 - u) * 0.85)
        return shaft | head
    if shape == "L":
        return ((u >= -0.8) & (u <= 0.8) & (v >= -0.8) & (v <= -0.35)) | (
            (u >= -0.8) & (u <= -0.35) & (np.abs(v) <= 0.8)
        )
    if shape == "T":
        return ((u >= 0.35) & (u <= 0.8) & (np.abs(v) <= 0.8)) | ((u >= -0.8) & (u <= 0.8) & (np.abs(v) <= 0.22))
    return (u * u + v * v <= 0.8**2) & (u >= -0.1)  # the half-disc's round side faces +u


def positions(size=SIZE):
    """The shape centres along x (and y): 0.3 ... 0.7, moved inwards where a large shape needs it to
    stay inside the image at any angle."""
    margin = max(0.3, 1.25 * size)
    return np.linspace(margin, 1 - margin, N_POSITIONS)


def coverage(shape, angle, cx, cy, size=SIZE):
    """(RES, RES) fraction of each pixel the rotated shape covers, from SUPERSAMPLE^2 samples."""
    n = RES * SUPERSAMPLE
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    y, x = np.meshgrid(c, c, indexing="ij")  # (n, n) sample positions in [0, 1], y down
    dx, dy = (x - cx) / size, (cy - y) / size  # y up in the shape's frame
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotate the samples by -angle: the shape by +angle
    return inside(shape, u, v).reshape(RES, SUPERSAMPLE, RES, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def generate(out, progress=True, size=SIZE):
    n = int(np.prod(FACTOR_SIZES))
    centres = positions(size)
    colours = np.array([colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in HUES], np.float32)  # (hues, 3)
    per_shape = int(np.prod(FACTOR_SIZES[1:]))
    with h5py.File(out, "w") as f:
        images = f.create_dataset("images", (n, RES, RES, 3), np.uint8, track_times=False)
        f.attrs["factor_sizes"] = np.array(FACTOR_SIZES, dtype=np.int64)
        f.attrs["factor_names"] = list(FACTOR_NAMES)
        block = np.empty((per_shape, RES, RES, 3), np.uint8)  # one shape's rows
        with tqdm(total=n, desc="shapes2d", unit="img", unit_scale=True, disable=not progress) as bar:
            for s, shape in enumerate(SHAPES):
                # the geometry once per (orientation, x, y); hue and background only colour it
                cover = {
                    (o, ix, iy): coverage(shape, ORIENTATIONS[o], centres[ix], centres[iy], size)[..., None]
                    for o in range(len(ORIENTATIONS))
                    for ix in range(N_POSITIONS)
                    for iy in range(N_POSITIONS)
                }
                for i, (o, h, b, ix, iy) in enumerate(np.ndindex(*FACTOR_SIZES[1:])):  # row-major
                    a = cover[o, ix, iy]  # (RES, RES, 1)
                    block[i] = np.round(255 * (a * colours[h] + (1 - a) * BACKGROUNDS[b]))
                images[s * per_shape : (s + 1) * per_shape] = block
                bar.update(per_shape)


def write_shapes2d(path, progress=True, size=SIZE):
    if not SIZES[0] <= size <= SIZES[1]:
        raise UserError(f"--size {size}: the half-extent must be in [{SIZES[0]}, {SIZES[1]}] of the image side")
    return write_via_temp(path, lambda tmp: generate(tmp, progress, size))


def main():
    parser = argparse.ArgumentParser(description="Generate shapes2d, rotated 2D shapes in the generic HDF5 format.")
    parser.add_argument("--out", required=True, help="output HDF5 file (replaced if it exists)")
    parser.add_argument(
        "--size",
        type=float,
        default=SIZE,
        help=f"a shape's half-extent in units of the image side (default {SIZE}; {SIZES[0]} to {SIZES[1]})",
    )
    args = parser.parse_args()
    print(f"wrote {write_shapes2d(args.out, size=args.size)}")


if __name__ == "__main__":
    exit_on_user_error(main)
