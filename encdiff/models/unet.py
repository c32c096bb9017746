"""The latent U-Net of EncDiff: LDM's openaimodel UNet with SpatialTransformers that cross-attend
to the concept tokens. Defaults = the released model (37,469,635 parameters).

Every attention (self and cross) goes through `kernels.attention`, so the backend (math, sdpa,
the Triton kernel, ...) is one switch: `UNet(attn_backend=...)` or `unet.set_attn_backend(...)`.
`record_cross_attention(unet)` collects the cross-attention maps for pictures.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from encdiff.models.layers import LayerNorm, group_norm, upsample2x


def zero_init(module):
    # output layers of residual branches start at zero, so every block starts as the identity
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), [cos | sin] as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, device=t.device, dtype=torch.float32))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN-SiLU-conv, FiLM by the time embedding (GN(h) * (1 + scale) + shift), SiLU-dropout-zero
    conv, skip. With up/down it also resamples (nearest x2 / average pool), as resblock_updown."""

    def __init__(self, cin, emb_dim, cout, dropout=0.0, up=False, down=False):
        super().__init__()
        self.in_norm = group_norm(cin, eps=1e-5)
        self.in_conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout)
        self.out_norm = group_norm(cout, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.up, self.down = up, down

    def resample(self, x):
        if self.up:
            return upsample2x(x)
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        h = self.in_conv(self.resample(F.silu(self.in_norm(x))))
        x = self.resample(x)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, cout, 1, 1) each
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_conv(self.dropout(F.silu(h)))


class Attention(nn.Module):
    """Multi-head attention on (B, L, C): self-attention (fused qkv) or cross-attention to a context
    (q from x, fused kv from the context). Projections without bias, output with bias."""

    def __init__(self, dim, heads, context_dim=None, dropout=0.0, backend="auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.recorder = None  # a list while record_cross_attention is active

    def forward(self, x, context=None):
        C = x.shape[-1]
        if self.is_cross:
            q = self.to_q(x)
            k, v = self.to_kv(context).split(C, dim=-1)  # strided views (B, Lk, C)
        else:
            q, k, v = self.to_qkv(x).split(C, dim=-1)  # strided views (B, L, C)
        if self.recorder is None:
            o = kernels.attention(q, k, v, self.heads, backend=self.backend)
        else:
            o = self.attention_recorded(q, k, v)
        return self.dropout(self.to_out(o))

    def attention_recorded(self, q, k, v):
        """Plain math attention that also stores the softmax (B, heads, Lq, Lk)."""
        B, Lq, C = q.shape
        d = C // self.heads
        qh, kh, vh = (t.reshape(B, -1, self.heads, d).transpose(1, 2).float() for t in (q, k, v))  # (B, H, L, d)
        w = torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)  # (B, H, Lq, Lk)
        self.recorder.append(w.detach())
        return (w @ vh).transpose(1, 2).reshape(B, Lq, C).to(q.dtype)  # (B, Lq, C)


class TransformerBlock(nn.Module):
    """x += SelfAttn(LN x); x += CrossAttn(LN x, context); x += GEGLU-FF(LN x)."""

    def __init__(self, dim, heads, context_dim, dropout=0.0, backend="auto"):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, dropout, backend)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, dropout, backend)
        self.norm3 = LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 8 * dim)
        self.ff_dropout = nn.Dropout(dropout)
        self.ff_out = nn.Linear(4 * dim, dim)

    def feed_forward(self, x):
        value, gate = self.ff_in(x).chunk(2, dim=-1)  # (B, L, 4C) each
        return self.ff_out(self.ff_dropout(value * F.gelu(gate)))

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.feed_forward(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN -> 1x1 conv -> tokens (B, HW, C) -> TransformerBlock -> zero 1x1 conv -> residual."""

    def __init__(self, channels, heads, context_dim, dropout=0.0, grad_checkpoint=False, backend="auto"):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, heads, context_dim, dropout, backend)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))
        self.grad_checkpoint = grad_checkpoint

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C); a view when channels-last
        if self.grad_checkpoint and torch.is_grad_enabled():
            h = checkpoint(self.block, h, context, use_reentrant=False)
        else:
            h = self.block(h, context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        return x + self.proj_out(h)


class Stage(nn.ModuleList):
    """Layers of one U-Net step; each gets what it needs (ResBlock: emb, transformer: context)."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """forward(x (B, C, H, W), t (B,), context (B, N, context_dim)) -> eps (B, C_out, H, W).

    Levels at 16/8/4/2 px with model_channels * channel_mult widths; a SpatialTransformer after
    every ResBlock of the levels in `attention_levels` (down and up paths) and in the middle.
    """

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        model_channels=64,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        num_heads=8,
        context_dim=16,
        dropout=0.0,
        grad_checkpoint=False,
        attn_backend="auto",
    ):
        super().__init__()
        # Programming invariants: encdiff/config.py gives the user the one-line error first.
        widths = [model_channels * m for m in channel_mult]
        for level in attention_levels:
            if not 0 <= level < len(channel_mult):
                raise ValueError(
                    f"unet.attention_levels: level {level} does not exist (channel_mult has {len(channel_mult)} levels)"
                )
        for c in {widths[lvl] for lvl in attention_levels} | {widths[-1]}:
            if c % num_heads:
                raise ValueError(f"unet.num_heads={num_heads} does not divide the attention width {c}")
        self.model_channels = model_channels
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch):
            # no dropout in the transformers: the release's SpatialTransformers never receive the U-Net's
            return SpatialTransformer(ch, num_heads, context_dim, 0.0, grad_checkpoint)

        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        skip_widths, ch = [model_channels], model_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_dim, width, dropout)]
                ch = width
                if level in attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(Stage(layers))
                skip_widths.append(ch)
            if level != len(widths) - 1:
                self.input_blocks.append(Stage([ResBlock(ch, emb_dim, ch, dropout, down=True)]))
                skip_widths.append(ch)

        self.middle_block = Stage(
            [ResBlock(ch, emb_dim, ch, dropout), transformer(ch), ResBlock(ch, emb_dim, ch, dropout)]
        )

        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), emb_dim, width, dropout)]
                ch = width
                if level in attention_levels:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_dim, ch, dropout, up=True))
                self.output_blocks.append(Stage(layers))

        head = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))
        self.out = nn.Sequential(group_norm(ch, eps=1e-5), nn.SiLU(), head)
        self.set_attn_backend(attn_backend)  # one place knows what "triton" means per layer

    def set_attn_backend(self, backend):
        """The attention backend of every layer (layer_backend's rule)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = layer_backend(backend, m.is_cross)

    def forward(self, x, t, context):
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        skips, h = [], x
        for stage in self.input_blocks:
            h = stage(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


def layer_backend(backend, is_cross):
    """The backend a layer runs under perf.attention = backend: "triton" is the short-key kernel,
    which serves the cross-attention (a few tokens); self-attention (up to 256 keys) stays on "auto"."""
    return "auto" if backend == "triton" and not is_cross else backend


def attention_sites(model_channels, channel_mult, attention_levels, num_tokens, side):
    """(queries, keys, width, is_cross) of each kind of attention call the U-Net makes on a side x
    side latent: self- and cross-attention at every attended level and in the middle block (at the
    last level), one tuple each."""
    for level in sorted({*attention_levels, len(channel_mult) - 1}):
        positions, width = (side >> level) ** 2, model_channels * channel_mult[level]
        yield positions, positions, width, False
        yield positions, num_tokens, width, True


@contextmanager
def record_cross_attention(model):
    """Inside the block every cross-attention of `model` appends its softmax (B, heads, HW, Lk),
    computed on the math path, to the yielded list, in forward order (down, middle, up)."""
    maps = []
    layers = [m for m in model.modules() if isinstance(m, Attention) and m.is_cross]
    for m in layers:
        m.recorder = maps
    try:
        yield maps
    finally:
        for m in layers:
            m.recorder = None
