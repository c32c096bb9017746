"""EncDiff: diffusion with cross-attention as an inductive bias for disentanglement.

import encdiff
model = encdiff.load("runs/synth3d")   # a trained model: encode, decode, reconstruct, traverse
"""

__version__ = "0.1.0"


def load(path, device=None):
    """A run directory or a checkpoint file -> encdiff.model.Model (see there). Imported here on
    call, so that `import encdiff.config` stays light."""
    from encdiff.model import load as load_model

    return load_model(path, device)
