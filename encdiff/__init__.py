"""EncDiff: diffusion with cross-attention as an inductive bias for disentanglement."""

__version__ = "0.1.0"
