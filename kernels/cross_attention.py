"""Fused attention over a short key sequence (Lk <= 64): Triton forward and backward.

The U-Net cross-attends from up to 256 spatial queries to 20 concept tokens. All keys and values of
one (batch, head) fit in a single tile, so the kernels keep them in registers and compute the
softmax in one pass: no online-softmax loop, nothing stored for the backward (it recomputes the
probabilities from q and k, which costs no extra memory traffic, while storing a log-sum-exp would
add a write and a read per query row and head). The work is memory-bound: the floor is the bytes
of q, k, v and o moved once, so the kernels read q and write o directly in the (B, L, heads * d)
layout of the Linear layers, including strided slices of fused projections.

Layout of this module: jit kernels; launchers that check inputs and allocate outputs; custom ops
(so torch.compile treats the kernels as opaque calls instead of tracing into Triton); a thin
autograd.Function; the public `short_kv_attention`. The plain PyTorch definition every backend is
tested against, `reference_attention`, lives in kernels/reference.py so that it imports without
Triton.
"""

import contextlib

import torch
import triton
import triton.language as tl

from kernels.reference import BackendUnavailable, check_inputs

MAX_KEYS = 64  # all keys of one (batch, head) live in one register tile
MAX_HEAD_DIM = 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# jit kernels


@triton.jit
def _load_rows(base, offs_row, stride_row, offs_col, n_rows, n_cols):
    """A (rows, cols) tile; rows past n_rows and columns past n_cols (register padding) read 0."""
    mask = (offs_row[:, None] < n_rows) & (offs_col[None, :] < n_cols)
    return tl.load(base + offs_row[:, None] * stride_row + offs_col[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, tile, offs_row, stride_row, offs_col, n_rows, n_cols):
    mask = (offs_row[:, None] < n_rows) & (offs_col[None, :] < n_cols)
    tl.store(base + offs_row[:, None] * stride_row + offs_col[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_IN_FP32 is set only for bf16 under the CPU interpreter,
    which does not support bf16 arithmetic and multiplies its storage bits in tl.dot
    (triton-lang/triton#11584). The operands are already rounded to bf16, so the widened product
    is what the GPU's bf16 dot computes."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _softmax_rows(q, k, Lk, qk_scale_log2, offs_n, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """Exact softmax over all keys at once: (BLOCK_M, BLOCK_N) fp32 probabilities, 0 on padded keys."""
    s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_IN_FP32) * qk_scale_log2
    s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,  # noqa: E741  (q, k, v, o: the names of the attention's four tensors)
    stride_qb,
    stride_qm,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    stride_ob,
    stride_om,
    H,
    Lq,
    Lk,
    n_mblocks,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # Heads vary fastest across programs: neighbouring programs read neighbouring d-wide column
    # slices of the same rows, so each row is fetched from DRAM once and shared through L2.
    pid = tl.program_id(0)
    h = pid % H
    mblock = (pid // H) % n_mblocks
    b = (pid // H // n_mblocks).to(tl.int64)
    offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col = h * HEAD_DIM

    q = _load_rows(Q + b * stride_qb + col, offs_m, stride_qm, offs_d, Lq, HEAD_DIM)
    k = _load_rows(K + b * stride_kb + col, offs_n, stride_kn, offs_d, Lk, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + col, offs_n, stride_vn, offs_d, Lk, HEAD_DIM)
    p = _softmax_rows(q, k, Lk, qk_scale_log2, offs_n, DOT_PRECISION, DOT_IN_FP32)
    o = _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_IN_FP32)
    _store_rows(O + b * stride_ob + col, o, offs_m, stride_om, offs_d, Lq, HEAD_DIM)


@triton.jit
def _bwd_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    DK,
    DV,
    stride_qb,
    stride_qm,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    stride_dob,
    stride_dom,
    stride_dqb,
    stride_dqm,
    stride_dkb,
    stride_dkn,
    stride_dvb,
    stride_dvn,
    H,
    Lq,
    Lk,
    qk_scale_log2,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # One program per (batch, head) walks every query block, so dK and dV are summed in registers
    # in a fixed order: no atomics, bitwise the same result on every run.
    pid = tl.program_id(0)
    h = pid % H
    b = (pid // H).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col = h * HEAD_DIM

    k = _load_rows(K + b * stride_kb + col, offs_n, stride_kn, offs_d, Lk, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + col, offs_n, stride_vn, offs_d, Lk, HEAD_DIM)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q + b * stride_qb + col, offs_m, stride_qm, offs_d, Lq, HEAD_DIM)
        do = _load_rows(DO + b * stride_dob + col, offs_m, stride_dom, offs_d, Lq, HEAD_DIM)
        # Padded query rows have do = 0, hence dp = 0 and ds = 0: they add nothing to dk or dv.
        p = _softmax_rows(q, k, Lk, qk_scale_log2, offs_n, DOT_PRECISION, DOT_IN_FP32)
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, DOT_IN_FP32)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_IN_FP32)
        # sum_j p_ij dp_ij equals rowsum(do * o): no need to read o back from memory.
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        dq = _dot(ds.to(k.dtype), k, DOT_PRECISION, DOT_IN_FP32) * sm_scale
        _store_rows(DQ + b * stride_dqb + col, dq, offs_m, stride_dqm, offs_d, Lq, HEAD_DIM)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, DOT_IN_FP32)
    _store_rows(DK + b * stride_dkb + col, dk * sm_scale, offs_n, stride_dkn, offs_d, Lk, HEAD_DIM)
    _store_rows(DV + b * stride_dvb + col, dv, offs_n, stride_dvn, offs_d, Lk, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# launchers

# Triton's own interpreter replaces @triton.jit functions when TRITON_INTERPRET=1 at import time.
INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.jit.JITFunction)


def unsupported_reason(q, k, v, heads):
    """Why the fused kernel cannot run on inputs that passed check_inputs, or None. Cheap Python
    checks only, so torch.compile can evaluate it while tracing."""
    d = q.shape[2] // heads
    # meta tensors (shapes without data) reach the custom ops' fake implementations: a step can be
    # traced op by op without a GPU (benchmarks/step_trace.py)
    if q.device.type not in ("cuda", "meta") and not (q.device.type == "cpu" and INTERPRETED):
        return f"needs CUDA tensors, got {q.device.type} (on the CPU only with TRITON_INTERPRET=1 set before import)"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not one of fp32, bf16, fp16"
    if k.shape[1] > MAX_KEYS:
        return f"{k.shape[1]} keys > {MAX_KEYS}: the kernel keeps all keys of a head in one tile"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            return f"{name}'s last dimension has stride {t.stride(2)}, the kernel needs 1"
    return None


def _check(q, k, v, heads):
    check_inputs(q, k, v, heads)
    reason = unsupported_reason(q, k, v, heads)
    if reason is not None:
        raise BackendUnavailable(f"triton attention cannot run: {reason}")


def _check_out(name, out, shape, like):
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def _block_sizes(Lq, Lk, d):
    """(BLOCK_M, BLOCK_N, BLOCK_D). tl.dot needs every dimension >= 16, so short key sets and head
    dim 8 are padded in registers (masked loads read nothing for the padding). BLOCK_M and
    num_warps are untuned guesses (benchmarks/RESULTS.md, "Attention kernels", has what they give)."""
    BLOCK_N = max(16, triton.next_power_of_2(Lk))
    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_M = max(16, min(64, triton.next_power_of_2(Lq)))
    return BLOCK_M, BLOCK_N, BLOCK_D


def _on_device(t):
    # Triton launches on the current CUDA device; make it the tensors' one (no-op on the CPU).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_precision(dtype):
    # fp32 inputs get true fp32 products unless the user opted into TF32, as for torch matmuls.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def attention_forward(q, k, v, heads, out=None):
    """o = softmax(q k^T / sqrt(d)) v per head. q: (B, Lq, heads*d); k, v: (B, Lk, heads*d);
    any strides with the last one 1. Returns o (B, Lq, heads*d), contiguous (or fills `out`)."""
    _check(q, k, v, heads)
    B, Lq, C = q.shape
    Lk = k.shape[1]
    d = C // heads
    if out is None:
        out = torch.empty((B, Lq, C), dtype=q.dtype, device=q.device)
    _check_out("out", out, q.shape, q)
    if B * Lq == 0:
        return out
    BLOCK_M, BLOCK_N, BLOCK_D = _block_sizes(Lq, Lk, d)
    n_mblocks = triton.cdiv(Lq, BLOCK_M)
    with _on_device(q):
        _fwd_kernel[(B * heads * n_mblocks,)](
            q,
            k,
            v,
            out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            out.stride(1),
            heads,
            Lq,
            Lk,
            n_mblocks,
            d**-0.5 * LOG2E,
            HEAD_DIM=d,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            DOT_PRECISION=_dot_precision(q.dtype),
            DOT_IN_FP32=INTERPRETED and q.dtype == torch.bfloat16,
            num_warps=4,
        )
    return out


def attention_backward(do, q, k, v, heads, dq=None, dk=None, dv=None):
    """Gradients (dq, dk, dv) of attention_forward for the output gradient do (B, Lq, heads*d).
    Recomputes the softmax; deterministic. Returns contiguous tensors (or fills the given ones)."""
    _check(q, k, v, heads)
    if do.shape != q.shape or do.dtype != q.dtype or do.device != q.device:
        raise ValueError(f"output gradient: expected {q.dtype} {tuple(q.shape)}, got {do.dtype} {tuple(do.shape)}")
    if do.stride(2) != 1:  # e.g. the stride-0 gradient of a sum()
        do = do.contiguous()
    B, Lq, C = q.shape
    Lk = k.shape[1]
    d = C // heads
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_out(name, t, like.shape, like)
    if B == 0:
        return dq, dk, dv
    BLOCK_M, BLOCK_N, BLOCK_D = _block_sizes(Lq, Lk, d)
    with _on_device(q):
        _bwd_kernel[(B * heads,)](
            q,
            k,
            v,
            do,
            dq,
            dk,
            dv,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            do.stride(0),
            do.stride(1),
            dq.stride(0),
            dq.stride(1),
            dk.stride(0),
            dk.stride(1),
            dv.stride(0),
            dv.stride(1),
            heads,
            Lq,
            Lk,
            d**-0.5 * LOG2E,
            d**-0.5,
            HEAD_DIM=d,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            DOT_PRECISION=_dot_precision(q.dtype),
            DOT_IN_FP32=INTERPRETED and q.dtype == torch.bfloat16,
            num_warps=4,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile) and autograd


def _unit_last_stride(t):
    # Inductor may hand a custom op other strides than eager had: keep the op total.
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("kernels::short_kv_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    return attention_forward(*[_unit_last_stride(t) for t in (q, k, v)], heads)


@_fwd_op.register_fake
def _(q, k, v, heads):
    return q.new_empty(q.shape)


@torch.library.custom_op("kernels::short_kv_attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, *[_unit_last_stride(t) for t in (q, k, v)], heads)


@_bwd_op.register_fake
def _(do, q, k, v, heads):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class ShortKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, heads):
        ctx.save_for_backward(q, k, v)
        ctx.heads = heads
        return _fwd_op(q, k, v, heads)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do, q, k, v, ctx.heads)
        return dq, dk, dv, None


def short_kv_attention(q, k, v, heads):
    """The fused Triton attention with autograd. q: (B, Lq, heads*d), k, v: (B, Lk <= 64, heads*d)."""
    return ShortKVAttention.apply(q, k, v, heads)
