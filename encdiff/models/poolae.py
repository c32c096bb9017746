"""A fixed stage 1 for small CPU runs: the "latent" is the image itself at 1/f resolution.

encode(x) averages f x f pixel blocks (B, 3, 64, 64) -> (B, 3, 64/f, 64/f); decode(z) upsamples
bilinearly. Nothing is learned, so stage 1 costs nothing and the latent keeps every colour exactly,
where a VQ autoencoder trained for a few CPU minutes loses hues and object shape (measured:
benchmarks/RESULTS.md). Stage 2 is unchanged: the U-Net denoises this 16x16 thumbnail while
cross-attending to the concept tokens, i.e. EncDiff at 16x16 in pixel space. The released recipe
keeps the VQ autoencoder; this is `vqvae.kind = "pool"`, meant for configs/cpu.toml.
"""

import torch.nn as nn
import torch.nn.functional as F


class PoolModel(nn.Module):
    """VQModel's interface with no parameters: encode, decode, forward -> (image, 0, None)."""

    def __init__(self, pool_size=4, embed_dim=3, in_channels=3):
        super().__init__()
        if embed_dim != in_channels:
            raise ValueError(
                f"vqvae.kind = 'pool': the latent is the image, so embed_dim must be {in_channels}, got {embed_dim}"
            )
        self.downsample = pool_size

    def encode(self, x):
        return F.avg_pool2d(x, self.downsample)  # (B, 3, H, W) -> (B, 3, H/f, W/f)

    def decode(self, z):
        return F.interpolate(z, scale_factor=self.downsample, mode="bilinear", align_corners=False)

    def forward(self, x):
        return self.decode(self.encode(x)), x.new_zeros(()), None
