"""The concept encoder: image -> 20 scalars (the representation) -> 20 concept tokens.

Released architecture (1,374,292 parameters at the defaults): a small conv net gives N unbounded
scalars; each scalar goes through its own MLP to a token the U-Net cross-attends to.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class EncResBlock(nn.Module):
    """x + conv1x1(ReLU(BN(conv3x3(ReLU(x)))))."""

    def __init__(self, ch):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn(self.conv1(F.relu(x)))))


class TokenMLPs(nn.Module):
    """N independent MLPs 1 -> h1 -> h2 -> token_dim (ELU), run as batched matmuls.

    Weights are stacked along a leading unit axis, so unit n only ever sees scalar n; the
    initialisation is nn.Linear's (uniform +-1/sqrt(fan_in) for weights and biases).
    """

    def __init__(self, num_tokens, token_dim, hidden):
        super().__init__()
        dims = (1, *hidden, token_dim)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            weight = torch.empty(num_tokens, fan_in, fan_out)
            if fan_in == 1:  # the strides einsum's gradient has (the same memory): DDP then uses it as is
                weight = torch.empty(num_tokens, fan_out, 1).transpose(1, 2)  # (N, 1, fan_out), strides (fan_out, 1, 1)
            self.weights.append(nn.Parameter(weight.uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_tokens, fan_out).uniform_(-bound, bound)))

    def forward(self, s):
        h = s[:, :, None]  # (B, N, 1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i:
                h = F.elu(h)
            h = torch.einsum("bni,nio->bno", h, w) + b  # (B, N, fan_out)
        return h


class ConceptEncoder(nn.Module):
    """conv4x4/2 x4 (BN each; ReLU after 1, 2, 4 - not 3, as released), two residual blocks with
    BN + ReLU between them, flatten, Linear -> num_tokens scalars -> per-scalar MLP tokens."""

    def __init__(self, num_tokens=20, token_dim=16, ch=128, mlp_hidden=(64, 128), in_channels=3, image_size=64):
        super().__init__()
        if image_size % 16 or image_size < 16:
            raise ValueError(f"concept encoder: image_size={image_size} must be a multiple of 16")
        if num_tokens < 1 or token_dim < 1 or ch < 1:
            raise ValueError(f"concept encoder: num_tokens={num_tokens}, token_dim={token_dim}, ch={ch} must be >= 1")
        self.num_tokens, self.token_dim, self.image_size = num_tokens, token_dim, image_size

        def down(cin):
            return [nn.Conv2d(cin, ch, 4, stride=2, padding=1), nn.BatchNorm2d(ch)]

        self.features = nn.Sequential(
            *down(in_channels),
            nn.ReLU(),
            *down(ch),
            nn.ReLU(),
            *down(ch),
            *down(ch),
            nn.ReLU(),
            EncResBlock(ch),
            nn.BatchNorm2d(ch),
            nn.ReLU(),
            EncResBlock(ch),
        )
        self.to_scalars = nn.Linear(ch * (image_size // 16) ** 2, num_tokens)
        self.mlps = TokenMLPs(num_tokens, token_dim, tuple(mlp_hidden))

    def encode(self, x):
        """Image (B, 3, 64, 64) in [-1, 1] -> scalars (B, num_tokens): the representation."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"concept encoder expects {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}"
            )
        # (B, ch, 4, 4) -> (B, ch*16), channel-major like the released View, whatever the memory format
        return self.to_scalars(self.features(x).flatten(1))

    def forward(self, x):
        """-> (scalars (B, N), tokens (B, N, token_dim))."""
        s = self.encode(x)
        return s, self.mlps(s)
