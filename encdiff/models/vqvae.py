"""The stage-1 VQ autoencoder: LDM's convolutional encoder/decoder around a 2048 x 3 codebook.

64x64x3 image in [-1, 1] -> latent 3x16x16 -> image. At the defaults this is the released model,
3,478,078 parameters. Stage 2 diffuses the pre-quantisation latent `encode(x)` (times a scale
factor the trainer measures); `decode(z)` quantises it first, as LDM's decode_first_stage does.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels

from encdiff.models.layers import group_norm, upsample2x


GN_EPS = 1e-6  # the released autoencoder's (the U-Net's ResBlocks use 1e-5)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice, with a 1x1 shortcut when the width changes (no time embedding)."""

    def __init__(self, cin, cout, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(cin, GN_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, GN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1 conv projections with bias."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels, GN_EPS)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, HW, C)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        o = o.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        # asymmetric padding (right/bottom only), as LDM does, so 64 -> 32 exactly
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(upsample2x(x))


def middle(channels, dropout):
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout)
    )


class Encoder(nn.Module):
    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, z_channels, dropout):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        layers, cin = [], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(cin, ch * mult, dropout))
                cin = ch * mult
            if level != len(ch_mult) - 1:
                layers.append(Downsample(cin))
        self.down = nn.Sequential(*layers)
        self.mid = middle(cin, dropout)
        self.norm_out = group_norm(cin, GN_EPS)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, z_channels, dropout):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = middle(cin, dropout)
        layers = []
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(cin, ch * ch_mult[level], dropout))
                cin = ch * ch_mult[level]
            if level != 0:
                layers.append(Upsample(cin))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(cin, GN_EPS)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    Loss (gradient codebook): ||sg(z) - e||^2 + beta ||z - sg(e)||^2, the VQ-VAE form. The released
    code (taming's `legacy=True` quantiser) swaps the two weights by mistake; `legacy_beta=True`
    reproduces that.

    EMA codebook (`ema=True`, off by default, not in the release): the codebook is not trained by
    gradients but set to the exponential moving average (decay `ema_decay`) of the encoder outputs
    assigned to each code (Laplace-smoothed counts, as in VQ-VAE-2), and the loss is only
    beta ||z - sg(e)||^2. Dead-code restarts: a code whose EMA usage falls below
    `dead_threshold` vectors per step is moved onto a random encoder output of the current batch
    (Jukebox), so the codebook never collapses onto a few entries. Under torch.distributed the
    statistics are summed over ranks and the restart vectors come from rank 0, so every rank holds
    the same codebook. The statistics move only in a training forward with autograd on, so a
    no-grad re-run (the GAN step's) leaves them. The codebook weight then has requires_grad=False:
    leave it out of the optimiser.
    """

    def __init__(self, n_embed, embed_dim, beta=0.25, ema=False, ema_decay=0.99, dead_threshold=1.0, legacy_beta=False):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.ema, self.ema_decay, self.dead_threshold = ema, ema_decay, dead_threshold
        self.legacy_beta = legacy_beta
        self.codebook = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / n_embed, 1.0 / n_embed)
        if ema:
            self.codebook.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(n_embed))
            self.register_buffer("ema_sum", self.codebook.weight.detach().clone())

    def forward(self, z):
        """z: (B, C, H, W) -> (zq with straight-through gradient, loss, indices (B, H, W))."""
        B, C, H, W = z.shape
        with torch.autocast(z.device.type, enabled=False):
            zf = z.float().permute(0, 2, 3, 1).reshape(-1, C)  # (BHW, C)
            e = self.codebook.weight.float()  # (K, C)
            idx = kernels.nearest_code(zf, e)  # (BHW,); on CUDA without the (BHW, K) distance matrix
            if self.ema and self.training and torch.is_grad_enabled():  # not on a no-grad re-run
                self._ema_update(zf.detach(), idx)
                e = self.codebook.weight.float()
            zq = F.embedding(idx, e)  # (BHW, C)
            commit = F.mse_loss(zf, zq.detach())
            if self.ema:
                loss = self.beta * commit
            else:
                codebook = F.mse_loss(zq, zf.detach())
                loss = commit + self.beta * codebook if self.legacy_beta else codebook + self.beta * commit
            zq = zf + (zq - zf).detach()  # straight-through: the decoder's gradient goes to z
        zq = zq.view(B, H, W, C).permute(0, 3, 1, 2).to(z.dtype)  # (B, C, H, W)
        return zq, loss, idx.view(B, H, W)

    @torch.no_grad()
    def _ema_update(self, zf, idx):
        K = self.n_embed
        count = torch.zeros(K, device=zf.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        total = torch.zeros(K, self.embed_dim, device=zf.device).index_add_(0, idx, zf)
        # restart candidates: random encoder outputs (with replacement, so shapes stay static)
        candidates = zf[torch.randint(0, zf.shape[0], (K,), device=zf.device)]  # (K, C)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            dist.all_reduce(total)
            dist.broadcast(candidates, 0)
        self.ema_count.mul_(self.ema_decay).add_(count, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(total, alpha=1 - self.ema_decay)
        dead = (self.ema_count < self.dead_threshold)[:, None]  # (K, 1)
        # a restarted code starts as if it had been used dead_threshold times at the new place
        self.ema_sum.copy_(torch.where(dead, candidates * self.dead_threshold, self.ema_sum))
        self.ema_count.copy_(
            torch.where(dead[:, 0], torch.full_like(self.ema_count, self.dead_threshold), self.ema_count)
        )
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + K * 1e-5) * n  # Laplace smoothing: no division by 0
        self.codebook.weight.copy_(self.ema_sum / smoothed[:, None])


class VQModel(nn.Module):
    """LDM VQModel (f=4). Defaults = the released EncDiff autoencoder (3,478,078 parameters).

    enc_res_blocks / dec_res_blocks are the ResnetBlocks per level (LDM's num_res_blocks and
    num_res_blocks + 1). See VectorQuantizer for the loss and the optional EMA codebook.
    """

    def __init__(
        self,
        in_channels=3,
        ch=32,
        ch_mult=(1, 2, 4),
        enc_res_blocks=2,
        dec_res_blocks=3,
        z_channels=3,
        embed_dim=3,
        n_embed=2048,
        beta=0.25,
        dropout=0.0,
        ema_codebook=False,
        ema_decay=0.99,
        dead_threshold=1.0,
        legacy_beta=False,
    ):
        super().__init__()
        if ch <= 0 or not ch_mult or min(ch_mult) <= 0:
            raise ValueError(f"vqvae: ch={ch} and ch_mult={tuple(ch_mult)} must be positive")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"vqvae.ema_decay={ema_decay} must be in (0, 1)")
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(in_channels, ch, ch_mult, enc_res_blocks, z_channels, dropout)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantizer = VectorQuantizer(n_embed, embed_dim, beta, ema_codebook, ema_decay, dead_threshold, legacy_beta)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(in_channels, ch, ch_mult, dec_res_blocks, z_channels, dropout)

    def encode(self, x):
        """Image (B, 3, H, W) in [-1, 1] -> pre-quantisation latent (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def quantize(self, z):
        """-> (zq, codebook loss, indices (B, H/f, W/f))."""
        return self.quantizer(z)

    def decode_quantized(self, zq):
        return self.decoder(self.post_quant_conv(zq))

    def decode(self, z):
        """Pre-quantisation latent -> image; snaps z to the codebook first (LDM's decode_first_stage)."""
        return self.decode_quantized(self.quantize(z)[0])

    def forward(self, x):
        """-> (reconstruction, codebook loss, indices)."""
        zq, loss, idx = self.quantize(self.encode(x))
        return self.decode_quantized(zq), loss, idx

    def last_layer_weight(self):
        """The decoder's output conv weight: the adaptive GAN weight compares gradients there."""
        return self.decoder.conv_out.weight
