"""EncDiff = concept encoder + latent U-Net cross-attending to its tokens, trained by the diffusion
loss alone. Builders from the config live here so train.py and evaluate.py build the same models."""

import torch.nn as nn

from encdiff.diffusion import Diffusion
from encdiff.models.encoder import ConceptEncoder
from encdiff.models.klvae import KLModel
from encdiff.models.poolae import PoolModel
from encdiff.models.unet import UNet
from encdiff.models.vqvae import VQModel


def build_vq(v):
    """The stage-1 autoencoder of a VQVAEConfig: VQModel (kind "vq"), KLModel (kind "kl") or the
    fixed PoolModel (kind "pool", nothing to train)."""
    if v.kind == "pool":
        return PoolModel(pool_size=v.pool_size, embed_dim=v.embed_dim)
    # the encoder/decoder shape both trainable kinds share
    shape = dict(
        ch=v.ch,
        ch_mult=tuple(v.ch_mult),
        enc_res_blocks=v.enc_res_blocks,
        dec_res_blocks=v.dec_res_blocks,
        z_channels=v.z_channels,
        embed_dim=v.embed_dim,
    )
    if v.kind == "kl":
        return KLModel(**shape, kl_weight=v.kl_weight)
    if v.kind != "vq":
        raise ValueError(f"vqvae.kind = {v.kind!r}: choose vq, kl or pool")
    return VQModel(**shape, n_embed=v.n_embed, beta=v.beta, ema_codebook=v.ema_codebook, legacy_beta=v.legacy_beta)


def build_encoder(e):
    return ConceptEncoder(num_tokens=e.num_tokens, token_dim=e.token_dim, ch=e.encoder_ch)


def latent_side(v, image_side=64):
    """The side of the first stage's latent (16 at the defaults) for a VQVAEConfig."""
    return image_side // (v.pool_size if v.kind == "pool" else 2 ** (len(v.ch_mult) - 1))


def build_unet(e, latent_channels, attn_backend="auto"):
    unet = UNet(
        in_channels=latent_channels,
        out_channels=latent_channels,
        model_channels=e.model_channels,
        channel_mult=tuple(e.channel_mult),
        num_res_blocks=e.num_res_blocks,
        attention_levels=tuple(e.attention_levels),
        num_heads=e.num_heads,
        context_dim=e.token_dim,
        dropout=e.dropout,
        grad_checkpoint=e.grad_checkpoint,
        attn_backend=attn_backend,
    )
    return unet


def build_diffusion(e):
    return Diffusion(
        timesteps=e.timesteps, schedule=e.schedule, loss=e.loss, prediction=e.prediction, t_power=e.t_power
    )


class EncDiff(nn.Module):
    """forward(images, z0, t, noise) -> scalar diffusion loss; the step that DDP and compile see."""

    def __init__(self, encoder, unet, diffusion):
        super().__init__()
        self.encoder = encoder
        self.unet = unet
        self.diffusion = diffusion

    def forward(self, images, z0, t, noise):
        _, tokens = self.encoder(images)  # (B, num_tokens, token_dim)
        return self.diffusion.loss(self.unet, z0, tokens, t=t, noise=noise)


def count_params(module):
    return sum(p.numel() for p in module.parameters())
