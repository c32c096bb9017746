"""What the kernels compute: the plain PyTorch definitions every backend is tested against
(attention, the nearest codebook entry), attention's input contract, and the error a backend that
cannot run raises. Imports without Triton, so the kernels and kernels/dispatch.py can all use it."""

import torch


class BackendUnavailable(RuntimeError):
    """A backend cannot run on these inputs here (no CUDA, no library, a shape it does not take):
    the inputs themselves are valid, another backend can take them."""


def check_inputs(q, k, v, heads):
    """Raise ValueError unless q is (B, Lq, C), k and v are (B, Lk, C) with Lk >= 1, heads divides C,
    and q, k, v share one floating dtype and one device."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention expects q (B, Lq, C) and k, v (B, Lk, C); got {shapes}")
    if k.shape[1] < 1:
        raise ValueError(f"attention needs at least one key; got {shapes}")
    if not isinstance(heads, int) or heads < 1 or q.shape[2] % heads:
        raise ValueError(f"attention: heads={heads!r} must be a positive integer dividing the {q.shape[2]} channels")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"attention: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def reference_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, computed in fp32 (fp64 for fp64 inputs) and returned in
    q's dtype. q: (B, Lq, heads*d); k, v: (B, Lk, heads*d) -> (B, Lq, heads*d)."""
    B, Lq, C = q.shape
    Lk = k.shape[1]
    d = C // heads
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.view(B, Lq, heads, d).transpose(1, 2).to(compute)  # (B, H, Lq, d)
    kh = k.view(B, Lk, heads, d).transpose(1, 2).to(compute)  # (B, H, Lk, d)
    vh = v.view(B, Lk, heads, d).transpose(1, 2).to(compute)  # (B, H, Lk, d)
    w = torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)  # (B, H, Lq, Lk)
    o = w @ vh  # (B, H, Lq, d)
    return o.transpose(1, 2).reshape(B, Lq, C).to(q.dtype)  # (B, Lq, heads*d)


def nearest_code_reference(z, codebook):
    """argmin_k ||z_n - codebook_k||^2 per row of z (N, C), in fp32 as |z|^2 - 2 z.e + |e|^2 (an
    N x K matrix), the first index among equal distances -> (N,) int64."""
    zf, e = z.float(), codebook.float()
    dist2 = zf.pow(2).sum(1, keepdim=True) - 2 * zf @ e.t() + e.pow(2).sum(1)  # (N, K)
    return dist2.argmin(1)
