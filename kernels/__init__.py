"""Attention for the EncDiff U-Net: one public entry point, several backends.

Provisional version (math and sdpa only); the kernels issue replaces it with the full dispatch.
"""
import torch
import torch.nn.functional as F


def attention(q, k, v, heads, *, backend="auto"):
    """q: (B, Lq, heads*d); k, v: (B, Lk, heads*d) -> (B, Lq, heads*d)."""
    B, Lq, C = q.shape
    Lk = k.shape[1]
    d = C // heads
    qh = q.view(B, Lq, heads, d).transpose(1, 2)  # (B, H, Lq, d)
    kh = k.view(B, Lk, heads, d).transpose(1, 2)  # (B, H, Lk, d)
    vh = v.view(B, Lk, heads, d).transpose(1, 2)  # (B, H, Lk, d)
    if backend == "math":
        w = torch.softmax((qh @ kh.transpose(-1, -2)).float() * d**-0.5, dim=-1).to(q.dtype)
        o = w @ vh
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh)
    return o.transpose(1, 2).reshape(B, Lq, C)  # (B, Lq, heads*d)
