"""synth3d: an offline, procedural Shapes3D look-alike, so the whole pipeline runs without downloads.

    python -m encdiff.data.synth --out data/synth3d.h5 --grid full    # 480,000 images
    python -m encdiff.data.synth --out /tmp/synth3d_small.h5 --grid small  # 3,840 images

Shapes3D's six factors with its exact label values: floor, wall and object hue (10 each), object
scale (8), shape (4: cube, cylinder, sphere, capsule) and orientation (15 camera azimuths from -30
to 30 degrees). The scene is ray-cast: a room corner (a floor and two walls) seen by a camera that
orbits the object, so the horizon and the corner move with the azimuth; the object is lit by one
directional light (ambient + diffuse + a small specular highlight) and casts a hard shadow; every
pixel averages SUPERSAMPLE x SUPERSAMPLE rays.

Why it is fast: given the geometry (scale, shape, orientation) the linear-light image is a sum of
four layers, floor * floor_albedo + wall * wall_albedo + object * object_albedo + highlight, so only
the 480 geometries are ray-cast and the 1000 hue combinations of each are sums of layers, followed
by one gamma look-up. This is also why a hue changes exactly the pixels its surface covers.

The output is the generic ground-truth HDF5 format (`images` (N, 64, 64, 3) uint8, attributes
`factor_sizes` and `factor_names`, rows in row-major factor order) plus `labels` (N, 6) float64
holding Shapes3D's label values; datasets are contiguous and uncompressed so they memory-map.
"""

import argparse
import colorsys
import os
import signal
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from encdiff.errors import UserError, exit_on_user_error

FACTOR_NAMES = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
HUES = np.arange(10) / 10  # 0.0, 0.1, ..., 0.9 as in Shapes3D's labels
FACTOR_VALUES = (HUES, HUES, HUES, np.linspace(0.75, 1.25, 8), np.arange(4.0), np.linspace(-30.0, 30.0, 15))
SHAPES = ("cube", "cylinder", "sphere", "capsule")  # Shapes3D's shape label order

# Per factor, the indices into FACTOR_VALUES that a grid keeps.
GRIDS = {
    "full": tuple(tuple(range(len(v))) for v in FACTOR_VALUES),
    "small": ((0, 2, 5, 7), (0, 2, 5, 7), (0, 2, 5, 7), (0, 4, 7), (0, 1, 2, 3), (0, 4, 7, 10, 14)),
}

RES = 64
SUPERSAMPLE = 4

# The scene, world units, y up. The camera orbits the object (at the origin, standing on the floor)
# and looks at a room corner straight behind it at orientation 0.
CAMERA_DISTANCE = 4.0
CAMERA_HEIGHT = 1.8
LOOK_AT = np.array([0.0, 0.6, 0.0])
FOV_DEG = 42.0
CORNER = np.array([0.0, 0.0, 3.2])
# The room is the convex set {p : n . (p - q) >= 0} over its planes (floor, left wall, right wall).
ROOM_NORMALS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, -1.0], [-1.0, 0.0, -1.0]]) / np.array([[1.0], [2**0.5], [2**0.5]])
ROOM_POINTS = np.array([[0.0, 0.0, 0.0], CORNER, CORNER])
LIGHT = np.array([-0.75, 1.0, -0.2]) / np.linalg.norm([-0.75, 1.0, -0.2])  # towards the light
AMBIENT, DIFFUSE, SPECULAR, SHININESS = 0.28, 0.62, 0.08, 30.0  # sum < 1: 16-bit linear values never overflow
SATURATION = 0.8
GAMMA = 2.2
EPS = 1e-6


def normalize(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def dot(a, b):
    return np.einsum("...i,...i->...", a, b)


def finite(t):
    """Distances with misses (inf) and undefined ones (nan) set to 0, to compute hit points without nan."""
    return np.where(np.isfinite(t), t, 0.0)


def camera_rays(orientation):
    """The camera position (3,) and unit ray directions (S*S, 3), S = RES * SUPERSAMPLE, one per
    sub-pixel, row-major from the top-left corner of the image."""
    azimuth = np.radians(orientation)
    eye = np.array([CAMERA_DISTANCE * np.sin(azimuth), CAMERA_HEIGHT, -CAMERA_DISTANCE * np.cos(azimuth)])
    forward = normalize(LOOK_AT - eye)
    right = normalize(np.cross([0.0, 1.0, 0.0], forward))
    up = np.cross(forward, right)
    n = RES * SUPERSAMPLE
    s = ((np.arange(n) + 0.5) / n * 2 - 1) * np.tan(np.radians(FOV_DEG) / 2)  # sub-pixel centres
    u, v = np.meshgrid(s, -s)  # (n, n) each: columns go right, rows go down
    dirs = forward + u[..., None] * right + v[..., None] * up  # (n, n, 3)
    return eye, normalize(dirs.reshape(-1, 3))  # (n, n, 3) -> (n*n, 3)


def hit_room(eye, dirs):
    """Distance to the room surface each ray leaves the room through, and which surface
    (0 floor, 1 left wall, 2 right wall). The camera is inside the convex room."""
    facing = dirs @ ROOM_NORMALS.T  # (M, 3): < 0 where the ray heads towards that plane
    reach = dot(ROOM_POINTS - eye, ROOM_NORMALS)  # (3,): <= 0 since the eye is inside
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(facing < 0, reach / facing, np.inf)
    surface = t.argmin(axis=1)
    return t[np.arange(len(t)), surface], surface


# Object intersections: o (3,) or (M, 3) origins, d (M, 3) or (3,) unit directions. Each returns
# the distance to the first hit in front of the origin (inf on a miss) and the outward normal there.


def hit_sphere(o, d, centre_y, r):
    oc = o - np.array([0.0, centre_y, 0.0])
    b = dot(oc, d)
    disc = b * b - (dot(oc, oc) - r * r)
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    t = np.where((disc >= 0) & (t > EPS), t, np.inf)
    return t, (oc + finite(t)[:, None] * d) / r


def hit_cylinder_side(o, d, r, y0, y1):
    o, d = np.broadcast_arrays(o, d)
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    disc = b * b - a * (o[:, 0] ** 2 + o[:, 2] ** 2 - r * r)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / np.maximum(a, 1e-12)
    y = o[:, 1] + t * d[:, 1]
    t = np.where((disc >= 0) & (a > 1e-12) & (t > EPS) & (y >= y0) & (y <= y1), t, np.inf)
    p = o + finite(t)[:, None] * d
    return t, p * np.array([1.0, 0.0, 1.0]) / r


def hit_top_disk(o, d, r, y):
    o, d = np.broadcast_arrays(o, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (y - o[:, 1]) / d[:, 1]
    p = o + finite(t)[:, None] * d
    t = np.where((d[:, 1] < 0) & (t > EPS) & (p[:, 0] ** 2 + p[:, 2] ** 2 <= r * r), t, np.inf)
    return t, np.broadcast_to([0.0, 1.0, 0.0], p.shape)


def hit_box(o, d, half, height):
    """An axis-aligned box [-half, half] x [0, height] x [-half, half] (slab method)."""
    o, d = np.broadcast_arrays(o, d)
    lo, hi = np.array([-half, 0.0, -half]), np.array([half, height, half])
    d = np.where(d == 0, 1e-12, d)  # a ray parallel to a slab: a huge finite distance, not nan
    t1, t2 = (lo - o) / d, (hi - o) / d  # (M, 3) each
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    axis = near.argmax(axis=1)
    t_in, t_out = near.max(axis=1), far.min(axis=1)
    t = np.where((t_in <= t_out) & (t_in > EPS), t_in, np.inf)
    normal = np.zeros_like(o)
    rows = np.arange(len(o))
    normal[rows, axis] = -np.sign(d[rows, axis])  # the slab we entered through faces the ray
    return t, normal


def nearest(*hits):
    """The union of solids: the first of several (t, normal) hits."""
    t = np.stack([h[0] for h in hits], axis=1)  # (M, k)
    first = t.argmin(axis=1)
    rows = np.arange(len(t))
    normals = np.stack([np.broadcast_to(h[1], (len(t), 3)) for h in hits], axis=1)  # (M, k, 3)
    return t[rows, first], normals[rows, first]


# A sphere around every shape at scale 1 (the cube's bottom corners, at 0.81, are the farthest points).
BOUND_CENTRE_Y, BOUND_RADIUS = 0.5, 0.85


def hit_object(shape, scale, o, d):
    """The object of a Shapes3D shape index at a Shapes3D scale value, standing at the origin."""
    name = SHAPES[shape]
    if name == "cube":
        return hit_box(o, d, 0.45 * scale, 0.9 * scale)
    if name == "cylinder":
        r, h = 0.45 * scale, 0.95 * scale
        return nearest(hit_cylinder_side(o, d, r, 0.0, h), hit_top_disk(o, d, r, h))
    if name == "sphere":
        return hit_sphere(o, d, 0.52 * scale, 0.52 * scale)
    r, h = 0.33 * scale, 1.15 * scale  # capsule: a cylinder between two hemispheres
    return nearest(hit_cylinder_side(o, d, r, r, h - r), hit_sphere(o, d, r, r), hit_sphere(o, d, h - r, r))


def view(orientation):
    """What one camera azimuth sees of the empty room: the eye, ray directions (M, 3), distance to
    the room (M,), surface index (M,), hit point (M, 3) and diffuse shading of the lit room (M,)."""
    eye, dirs = camera_rays(orientation)
    t_room, surface = hit_room(eye, dirs)
    p_room = eye + t_room[:, None] * dirs
    room = AMBIENT + DIFFUSE * np.maximum(ROOM_NORMALS[surface] @ LIGHT, 0.0)
    return eye, dirs, t_room, surface, p_room, room


def near_object(o, d, scale):
    """Rays that pass within the bounding sphere of every object shape at this scale: the exact
    (costlier) intersection only needs to run on these."""
    oc = o - np.array([0.0, BOUND_CENTRE_Y * scale, 0.0])
    b = dot(oc, d)
    return b * b - (dot(oc, oc) - (BOUND_RADIUS * scale) ** 2) >= 0


def render_layers(scale, shape, orientation, room_view=None):
    """The four linear-light layers of one geometry, each (RES, RES) float32: floor, wall and object
    shading times coverage (multiplied by that surface's albedo later), and the object's white
    highlight. Arguments are Shapes3D label values (scale, shape index, orientation in degrees);
    room_view is view(orientation), passed in when rendering many objects from one azimuth."""
    eye, dirs, t_room, surface, p_room, room = room_view or view(orientation)
    m = len(dirs)
    obj, highlight = np.zeros((2, m))

    rays = np.flatnonzero(near_object(eye, dirs, scale))
    t_obj, n_obj = hit_object(shape, scale, eye, dirs[rays])
    hit = t_obj < t_room[rays]
    rays, n_obj, d_obj = rays[hit], n_obj[hit], dirs[rays[hit]]
    on_object = np.zeros(m, bool)
    on_object[rays] = True
    cos_light = n_obj @ LIGHT
    obj[rays] = AMBIENT + DIFFUSE * np.maximum(cos_light, 0.0)
    halfway = normalize(LIGHT - d_obj)
    highlight[rays] = SPECULAR * np.maximum(dot(n_obj, halfway), 0.0) ** SHININESS * (cos_light > 0)

    room = room.copy()
    maybe_shadowed = np.flatnonzero(near_object(p_room, LIGHT, scale) & ~on_object)
    shadowed = np.isfinite(hit_object(shape, scale, p_room[maybe_shadowed], LIGHT)[0])
    room[maybe_shadowed[shadowed]] = AMBIENT  # no direct light: ambient only
    floor = np.where(~on_object & (surface == 0), room, 0.0)
    wall = np.where(~on_object & (surface > 0), room, 0.0)

    layers = np.stack([floor, wall, obj, highlight])  # (4, S*S)
    s = SUPERSAMPLE
    layers = layers.reshape(4, RES, s, RES, s).mean(axis=(2, 4))  # (4, S*S) -> (4, RES, s, RES, s) -> (4, RES, RES)
    return layers.astype(np.float32)


def grid_values(grid):
    """Per factor, the Shapes3D label values a grid keeps."""
    return [FACTOR_VALUES[k][list(idx)] for k, idx in enumerate(GRIDS[grid])]


def _no_stop():
    pass


def grid_layers(grid, progress=False, stop=_no_stop):
    """(G, 4, RES, RES) layers of every geometry (scale, shape, orientation) of a grid, row-major.
    stop() is called between geometries (it raises to abandon the work)."""
    scales, shapes, orientations = grid_values(grid)[3:]
    geometries = [(sc, int(sh), o) for sc in scales for sh in shapes for o in orientations]
    views = {o: view(o) for o in orientations}
    layers = []
    for g in tqdm(geometries, desc="synth3d: ray-casting", unit="geometry", disable=not progress):
        stop()
        layers.append(render_layers(*g, room_view=views[g[2]]))
    return np.stack(layers)


def albedo(hues):
    """Linear-light RGB albedo (len(hues), 3) of each hue."""
    return np.array([colorsys.hsv_to_rgb(h, SATURATION, 1.0) for h in hues], dtype=np.float32)


def grid_labels(grid):
    """(N, 6) float64 Shapes3D label values of every row, row-major (last factor fastest)."""
    values = grid_values(grid)
    mesh = np.meshgrid(*values, indexing="ij")  # 6 arrays of the grid's shape
    return np.stack([m.reshape(-1) for m in mesh], axis=1)  # (N, 6)


def check_grid(grid):
    if grid not in GRIDS:
        raise UserError(f"unknown synth3d grid {grid!r}: choose one of {', '.join(GRIDS)}")


def generate(out, grid="full", progress=True, stop=_no_stop):
    """Write the grid's images, labels and factor attributes to the HDF5 file `out` (the full grid
    takes about 2 GB of RAM while it runs). stop() is called about once a second: a stop signal
    (train.py's) raises there, outside h5py, so that it is never swallowed by h5py's callbacks."""
    check_grid(grid)
    values = grid_values(grid)
    sizes = tuple(len(v) for v in values)
    n = int(np.prod(sizes))
    layers = grid_layers(grid, progress, stop) * np.float32(65535)  # linear light in 16-bit units
    # Per surface and hue, the geometry's contribution: (hues, G, RES, RES, 3).
    floor, wall, obj = (layers[None, :, k, :, :, None] * albedo(values[k])[:, None, None, None, :] for k in range(3))
    obj_and_highlight = obj + layers[None, :, 3, :, :, None] + np.float32(0.5)  # + 0.5: round, not floor
    to_srgb = np.round(255 * (np.arange(65536) / 65535) ** (1 / GAMMA)).astype(np.uint8)

    block = sizes[2] * len(layers)  # images per (floor hue, wall hue) pair: contiguous rows
    linear = np.empty(obj_and_highlight.shape, np.float32)  # (object hues, G, RES, RES, 3), reused
    quantized = np.empty(linear.shape, np.uint16)
    srgb = np.empty(linear.shape, np.uint8)
    with h5py.File(out, "w") as f:
        images = f.create_dataset("images", (n, RES, RES, 3), np.uint8, track_times=False)
        f.create_dataset("labels", data=grid_labels(grid), track_times=False)
        f.attrs["factor_sizes"] = np.array(sizes, dtype=np.int64)
        f.attrs["factor_names"] = list(FACTOR_NAMES)
        f.attrs["grid"] = grid
        with tqdm(total=n, desc="synth3d: writing images", unit="img", unit_scale=True, disable=not progress) as bar:
            for i in range(sizes[0]):
                for j in range(sizes[1]):
                    stop()
                    np.add(obj_and_highlight, floor[i] + wall[j], out=linear)
                    np.copyto(quantized, linear, casting="unsafe")  # truncates: + 0.5 above rounds
                    np.take(to_srgb, quantized, out=srgb)
                    start = (i * sizes[1] + j) * block
                    images[start : start + block] = srgb.reshape(block, RES, RES, 3)  # (hues, G, ...) -> rows
                    bar.update(block)


def write_via_temp(path, write):
    """write(tmp) into a temporary file beside `path`, then rename it: an interrupted run never
    leaves a partial file at `path`, and the temporary file goes whatever stops the write (an
    exception, a stop signal raised through stop()). Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_synth3d(path, grid="full", progress=True, stop=_no_stop):
    check_grid(grid)
    return write_via_temp(path, lambda tmp: generate(tmp, grid, progress, stop))


def ensure_synth3d(path, grid="full", progress=True, stop=_no_stop):
    """Generate the synth3d file at `path` unless it is there already (then check its grid). In a
    multi-process run call it on one rank, then barrier. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; data.path must name the synth3d .h5 file")
    if not path.exists():
        return write_synth3d(path, grid, progress, stop)
    try:
        with h5py.File(path, "r") as f:
            found = f.attrs.get("grid")
    except OSError:
        raise UserError(f"{path}: exists but is not an HDF5 file; delete it to regenerate synth3d") from None
    if found is not None and found != grid:
        raise UserError(f"{path}: holds the {found!r} synth3d grid, not {grid!r}; delete it or change data.grid")
    return path


def main():
    parser = argparse.ArgumentParser(
        description="Generate synth3d, a procedural Shapes3D look-alike (encdiff/data/synth.py)."
    )
    parser.add_argument("--out", required=True, help="output HDF5 file (replaced if it exists)")
    parser.add_argument("--grid", default="full", choices=sorted(GRIDS), help="full: 480,000 images; small: 3,840")
    args = parser.parse_args()
    received = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop between blocks, removing the temporary file
        signal.signal(sig, lambda signum, frame: received.append(signum))

    def stop():
        if received:
            raise SystemExit(128 + received[0])

    print(f"wrote {write_synth3d(args.out, args.grid, stop=stop)}")


if __name__ == "__main__":
    exit_on_user_error(main)
