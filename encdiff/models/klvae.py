"""The stage-1 KL autoencoder: LDM's AutoencoderKL with the VQ model's encoder and decoder.

The paper's CelebA runs use it instead of the VQ autoencoder. The encoder predicts a diagonal
Gaussian over the latent (mean and log-variance, 2 x embed_dim channels); training decodes a sample
(reparameterisation) and adds the KL divergence to N(0, I), weighted by kl_weight; encode(x) is the
mean, which stage 2 diffuses (times the 1/std scale factor the trainer measures).

kl_weight has LDM's meaning: LDM adds kl_weight x KL (summed over the latent) to the reconstruction
error summed over the image's values, while VQLoss averages the error over them; so forward()
returns kl_weight x KL / (values per image) - the same balance, so LDM's 1e-6 carries over.
"""

import torch
import torch.nn as nn

from encdiff.models.vqvae import Decoder, Encoder

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamps log-variances here


class KLModel(nn.Module):
    """LDM AutoencoderKL (f = 2^(len(ch_mult) - 1)) with VQModel's interface:
    encode(x) -> latent mean, decode(z) -> image, forward(x) -> (image, weighted KL, None)."""

    def __init__(
        self,
        in_channels=3,
        ch=32,
        ch_mult=(1, 2, 4),
        enc_res_blocks=2,
        dec_res_blocks=3,
        z_channels=3,
        embed_dim=3,
        kl_weight=1e-6,
        dropout=0.0,
    ):
        super().__init__()
        if ch <= 0 or not ch_mult or min(ch_mult) <= 0:
            raise ValueError(f"vqvae: ch={ch} and ch_mult={tuple(ch_mult)} must be positive")
        if not kl_weight >= 0:
            raise ValueError(f"vqvae.kl_weight={kl_weight} must be >= 0")
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.kl_weight = float(kl_weight)
        self.encoder = Encoder(in_channels, ch, ch_mult, enc_res_blocks, 2 * z_channels, dropout)  # LDM's double_z
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)  # -> mean, log-variance
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(in_channels, ch, ch_mult, dec_res_blocks, z_channels, dropout)

    def posterior(self, x):
        """Image (B, 3, H, W) in [-1, 1] -> (mean, clamped log-variance), each (B, embed_dim, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # (B, 2E, h, w) -> 2 x (B, E, h, w)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x):
        """Image -> the latent's mean (B, embed_dim, H/f, W/f): what stage 2 diffuses."""
        return self.posterior(x)[0]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        """-> (reconstruction, kl_weight x KL per image value, None). Training decodes a sample of
        the posterior, evaluation its mean."""
        mean, logvar = self.posterior(x)
        z = mean
        if self.training:
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        m, lv = mean.float(), logvar.float()
        kl = 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).sum(dim=(1, 2, 3))  # (B,) KL(q(z|x) || N(0, I))
        return self.decode(z), self.kl_weight * kl.mean() / x[0].numel(), None

    def last_layer_weight(self):
        """The decoder's output conv weight: the adaptive GAN weight compares gradients there."""
        return self.decoder.conv_out.weight
