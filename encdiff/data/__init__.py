"""Ground-truth datasets: the paper's (Shapes3D, MPI3D, Cars3D, dSprites), a generic HDF5 format, photos.

ds = open_dataset("shapes3d", "data/3dshapes.h5")
ds.images[idx]                  # (n, 64, 64, 3) uint8 for an index array
ds.factors_of(idx)              # (n, num_factors) factor classes, row-major
images = load_all(ds)           # (N, 64, 64, 3) uint8: the memory map itself where possible
for start, chunk in iter_chunks(ds): ...   # streamed in order, with a progress bar

ds = open_dataset("celeba", "data/celeba")      # photos without a factor grid (encdiff.data.folders):
ds.factor_sizes is None; ds.attributes          # (N, 40) uint8 in {0, 1}; imagefolder has none
"""

from encdiff.data.dataset import GroundTruthDataset, Images, iter_chunks, load_all
from encdiff.data.folders import PhotoDataset
from encdiff.data.formats import DATASETS, FACTORS, open_dataset


def ensure_synth3d(path, grid="full", progress=True, stop=None):
    """Generate the bundled synth3d file at `path` if it is missing, else check its grid (see
    encdiff.data.synth); stop() is polled while it generates."""
    # Imported here, not above: `python -m encdiff.data.synth` must not find the module already imported.
    from encdiff.data.synth import _no_stop, ensure_synth3d

    return ensure_synth3d(path, grid, progress, stop or _no_stop)


__all__ = [
    "DATASETS",
    "FACTORS",
    "GroundTruthDataset",
    "Images",
    "PhotoDataset",
    "ensure_synth3d",
    "iter_chunks",
    "load_all",
    "open_dataset",
]
