"""Layers both autoencoders and the U-Net use: norms and upsampling in their input's precision.

Under bf16 autocast a convolution's output is bf16, and autocast runs group_norm, layer_norm and
upsampling in fp32: it casts each input up and, at the next convolution, each result down (four
casts per norm with the backward; 600 of a stage-2 step's kernels, benchmarks/step_trace.py). These
run in the input's precision instead, autocast off: the norm kernels accumulate their statistics in
fp32 whatever the input, and a nearest upsampling only copies values. In fp32 they are exactly the
torch layers; in bf16 the activations are rounded to bf16 where autocast kept fp32 (RESULTS.md,
"The step's budget", says how far that moves a step). Their weights are cast with the other
layers' in one pass (encdiff/low_precision.py).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _as(param, x):
    return None if param is None else param.to(x.dtype)


class GroupNorm(nn.GroupNorm):
    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, _as(self.weight, x), _as(self.bias, x), self.eps)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, _as(self.weight, x), _as(self.bias, x), self.eps)


def group_norm(channels, eps):
    # 32 groups as released; tiny test models whose width is not a multiple of 32 get fewer.
    return GroupNorm(math.gcd(32, channels), channels, eps=eps)


def upsample2x(x):
    """Nearest-neighbour x2 in x's own precision."""
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
