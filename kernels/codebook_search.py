"""The nearest codebook entry of each vector, without the N x K distance matrix: a Triton kernel.

A VQ autoencoder quantises N = batch * 16 * 16 latent vectors of C = 3 channels against a codebook
of K = 2,048 entries. Written as torch ops (kernels/reference.py, `nearest_code_reference`) that is
an N x K fp32 matrix (512 MB at batch 256) built by a matmul, two broadcast additions and an argmin:
four passes over half a gigabyte for what is 2 MB of input. Here each program keeps BLOCK_M vectors
in registers, walks the codebook BLOCK_K entries at a time and keeps the running minimum, so only
the N indices are written. Distances are the reference's, |z|^2 - 2 z.e + |e|^2 in fp32, and ties
go to the lowest index, as torch.argmin's do.

There is nothing to differentiate (integer indices): no autograd.Function. The kernel is the custom
op kernels::nearest_code (opaque to torch.compile, shapes only on meta tensors); kernels.nearest_code
(kernels/dispatch.py) runs it on CUDA and the reference elsewhere (the CPU runs Triton only through
its interpreter, for tests).
"""

import contextlib

import torch
import triton
import triton.language as tl

from kernels.reference import BackendUnavailable

MAX_CHANNELS = 16  # each vector's channels are unrolled in registers
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _nearest_kernel(
    z_ptr,
    e_ptr,
    out_ptr,
    N,
    K,
    stride_zn,
    stride_zc,
    stride_ek,
    stride_ec,
    C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    zz = tl.zeros([BLOCK_M], tl.float32)
    for c in tl.static_range(C):
        zc = tl.load(z_ptr + rows * stride_zn + c * stride_zc, mask=row_ok, other=0.0).to(tl.float32)
        zz += zc * zc
    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        ze = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        ee = tl.zeros([BLOCK_K], tl.float32)
        for c in tl.static_range(C):
            zc = tl.load(z_ptr + rows * stride_zn + c * stride_zc, mask=row_ok, other=0.0).to(tl.float32)
            ec = tl.load(e_ptr + cols * stride_ek + c * stride_ec, mask=col_ok, other=0.0).to(tl.float32)
            ze += zc[:, None] * ec[None, :]
            ee += ec * ec
        d = zz[:, None] - 2.0 * ze + ee[None, :]
        d = tl.where(col_ok[None, :], d, float("inf"))
        block_best = tl.min(d, axis=1)
        block_idx = tl.argmin(d, axis=1) + k0  # the first of equal minima, as torch.argmin
        better = block_best < best  # strict: an earlier block keeps a tie
        best = tl.where(better, block_best, best)
        best_idx = tl.where(better, block_idx, best_idx)
    tl.store(out_ptr + rows, best_idx.to(tl.int64), mask=row_ok)


def unsupported_reason(z, codebook):
    """Why the kernel cannot run on valid inputs here, or None (meta tensors: their shapes)."""
    interpreted = not isinstance(_nearest_kernel, triton.runtime.jit.JITFunction)
    if z.device.type not in ("cuda", "meta") and not (z.device.type == "cpu" and interpreted):
        return f"needs CUDA tensors, got {z.device.type} (on the CPU only with TRITON_INTERPRET=1 set before import)"
    if z.shape[1] > MAX_CHANNELS:
        return f"{z.shape[1]} channels > {MAX_CHANNELS}"
    return None


def check_codes(z, codebook):
    """ValueError unless z is (N, C) and codebook (K, C), K >= 1, of float dtypes on one device."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1] or codebook.shape[0] < 1:
        raise ValueError(
            f"nearest_code expects z (N, C) and a codebook (K >= 1, C); got {tuple(z.shape)}, {tuple(codebook.shape)}"
        )
    if z.dtype not in DTYPES or codebook.dtype not in DTYPES:
        raise ValueError(f"nearest_code: fp32, bf16 or fp16 inputs, got {z.dtype} and {codebook.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"nearest_code: z on {z.device}, the codebook on {codebook.device}")


def nearest_code_triton(z, codebook, block_m=64, block_k=32):
    """The launcher: indices (N,) int64 of the nearest codebook row of each row of z. The blocks:
    64 x 32 with 4 warps compiles for sm_90 to 128 registers without spills (RESULTS.md)."""
    check_codes(z, codebook)
    reason = unsupported_reason(z, codebook)
    if reason is not None:
        raise BackendUnavailable(f"nearest_code's kernel cannot run: {reason}")
    N, C = z.shape
    out = torch.empty(N, dtype=torch.int64, device=z.device)
    if N == 0:
        return out
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        _nearest_kernel[(triton.cdiv(N, block_m),)](
            z,
            codebook,
            out,
            N,
            codebook.shape[0],
            z.stride(0),
            z.stride(1),
            codebook.stride(0),
            codebook.stride(1),
            C=C,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return out


@torch.library.custom_op("kernels::nearest_code", mutates_args=())
def _nearest_op(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return nearest_code_triton(z, codebook)


@_nearest_op.register_fake
def _(z, codebook):
    return z.new_empty(z.shape[0], dtype=torch.int64)
