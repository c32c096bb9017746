"""sprites2d: a second procedural ground-truth set, flat 2D sprites on a plain background, written
in the generic HDF5 format. It exists so that a preset can be checked on data with other factors
than synth3d's (a dSprites-like layout, in colour), without downloads.

    python -m encdiff.data.sprites --out data/sprites2d.h5     # 3,840 images, 5 factors

Factors (row-major, last fastest): shape 3 (square, disc, triangle), hue 5, scale 4, x 8, y 8.
There is no rotation factor: the square and the disc are symmetric under rotation, so an angle
would not be identifiable from the image (dSprites has that flaw). Every factor combination gives
a distinct image, and a one-step change of any factor changes the image (tested).
"""

import argparse
import colorsys

import h5py
import numpy as np
from tqdm import tqdm

from encdiff.data.synth import write_via_temp
from encdiff.errors import exit_on_user_error

FACTOR_NAMES = ("shape", "hue", "scale", "pos_x", "pos_y")
SHAPES = ("square", "disc", "triangle")
HUES = np.arange(5) / 5
SCALES = np.linspace(0.12, 0.26, 4)  # half-extent of the sprite, in units of the image side
POSITIONS = np.linspace(0.3, 0.7, 8)  # sprite centre; the largest sprite stays inside the image
FACTOR_SIZES = (len(SHAPES), len(HUES), len(SCALES), len(POSITIONS), len(POSITIONS))
RES = 64
SUPERSAMPLE = 4
BACKGROUND = np.array([0.12, 0.12, 0.14], np.float32)


def coverage(shape, scale, cx, cy):
    """(RES, RES) fraction of each pixel the sprite covers, from SUPERSAMPLE^2 samples per pixel."""
    n = RES * SUPERSAMPLE
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    y, x = np.meshgrid(c, c, indexing="ij")  # (n, n) sample positions in [0, 1], y down
    dx, dy = x - cx, y - cy
    if shape == "square":
        inside = (np.abs(dx) <= scale * 0.85) & (np.abs(dy) <= scale * 0.85)  # 0.85: a similar area to the disc
    elif shape == "disc":
        inside = dx * dx + dy * dy <= scale * scale
    else:  # an upward triangle with its centroid at the centre
        top, base = cy - scale, cy + scale * 0.7
        half_width = (dy - (top - cy)) / (base - top) * scale * 1.1
        inside = (y >= top) & (y <= base) & (np.abs(dx) <= half_width)
    return inside.reshape(RES, SUPERSAMPLE, RES, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def generate(out, progress=True):
    n = int(np.prod(FACTOR_SIZES))
    colours = np.array([colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in HUES], np.float32)  # (hues, 3)
    with h5py.File(out, "w") as f:
        images = f.create_dataset("images", (n, RES, RES, 3), np.uint8, track_times=False)
        f.attrs["factor_sizes"] = np.array(FACTOR_SIZES, dtype=np.int64)
        f.attrs["factor_names"] = list(FACTOR_NAMES)
        rows = np.ndindex(*FACTOR_SIZES)  # row-major: the last factor varies fastest
        block = np.empty((len(POSITIONS), RES, RES, 3), np.uint8)  # one run of pos_y
        covered = {}  # the coverage does not depend on the hue: each computed once, not once per hue
        with tqdm(total=n, desc="sprites2d", unit="img", unit_scale=True, disable=not progress) as bar:
            for start in range(0, n, len(POSITIONS)):
                for j in range(len(POSITIONS)):
                    s, h, k, ix, iy = next(rows)
                    if (s, k, ix, iy) not in covered:
                        covered[s, k, ix, iy] = coverage(SHAPES[s], SCALES[k], POSITIONS[ix], POSITIONS[iy])
                    a = covered[s, k, ix, iy][..., None]  # (RES, RES, 1)
                    block[j] = np.round(255 * (a * colours[h] + (1 - a) * BACKGROUND))
                images[start : start + len(POSITIONS)] = block
                bar.update(len(POSITIONS))


def write_sprites(path, progress=True):
    return write_via_temp(path, lambda tmp: generate(tmp, progress))


def main():
    parser = argparse.ArgumentParser(description="Generate sprites2d, 2D sprites in the generic HDF5 format.")
    parser.add_argument("--out", required=True, help="output HDF5 file (replaced if it exists)")
    args = parser.parse_args()
    print(f"wrote {write_sprites(args.out)}")


if __name__ == "__main__":
    exit_on_user_error(main)
