"""Which attention backend runs a call: every backend says why it cannot run, `auto` picks by rule.

Backends (all take q (B, Lq, heads*d), k, v (B, Lk, heads*d) and return (B, Lq, heads*d)):
  triton          the fused short-KV kernel (kernels/cross_attention.py), Lk <= 64
  xformers        xformers.ops.memory_efficient_attention on a (B, L, heads, d) view
  sdpa            torch scaled_dot_product_attention, letting torch pick its kernel
  sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math
                  the same with its kernel pinned
  math            plain PyTorch (kernels/reference.py), the definition the others are tested against
"""

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels.reference import BackendUnavailable, check_inputs, nearest_code_reference, reference_attention

try:
    from kernels import codebook_search, cross_attention

    _TRITON_IMPORT_ERROR = None
except ImportError as e:  # e.g. no triton wheel for this platform: the other backends still work
    codebook_search = cross_attention = None
    _TRITON_IMPORT_ERROR = f"triton is not importable ({e})"

SDPA_PINS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
BACKENDS = ("triton", "xformers", "sdpa", *SDPA_PINS, "math")
assert BACKENDS == kernels.BACKENDS, "kernels/__init__.py lists the backends dispatch.py implements"

# The rule `auto` follows, from benchmarks/attn_bench.py on CUDA (the measurements are in
# benchmarks/RESULTS.md, "Attention kernels"): the fused kernel only where it won forward+backward,
# short keys with many queries (the 16x16 cross-attention); sdpa everywhere else on CUDA, including
# the short query sets where the fused backward loses. On the CPU the Triton interpreter is for
# tests only, so it is never picked.
# Each row: (device type or None for any, max Lk or None, min Lq or None, backends in order of
# preference). The first row matching the call is used, and the first of its backends that can run.
AUTO_RULE = (
    ("cuda", 64, 256, ("triton", "sdpa")),
    ("cuda", None, None, ("sdpa",)),
    (None, None, None, ("sdpa", "math")),
)


def auto_candidates(device_type, num_keys, num_queries):
    """The backends `auto` tries, in order, for a call on device_type with these sequence lengths."""
    for device, max_keys, min_queries, backends in AUTO_RULE:
        if (
            (device is None or device == device_type)
            and (max_keys is None or num_keys <= max_keys)
            and (min_queries is None or num_queries >= min_queries)
        ):
            return backends
    return ("math",)


# ----------------------------------------------------------------------------------------------
# why a backend cannot run (None: it can)


def _triton_reason(q, k, v, heads):
    if _TRITON_IMPORT_ERROR is not None:
        return _TRITON_IMPORT_ERROR
    return cross_attention.unsupported_reason(q, k, v, heads)


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_xformers_state = {}  # "import": module or error text; device -> None or error text of a probe call


def _xformers_ops():
    if "import" not in _xformers_state:
        try:
            import xformers.ops

            _xformers_state["import"] = xformers.ops
        except Exception as e:  # ImportError, or a wheel built for another CUDA failing to load
            _xformers_state["import"] = f"xformers is not importable ({_first_line(e)})"
    return _xformers_state["import"]


def _xformers_reason(q, k, v, heads):
    xops = _xformers_ops()
    if isinstance(xops, str):
        return xops
    if q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device.type}"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not one of fp32, bf16, fp16"
    if q.device not in _xformers_state:
        # The wheel may import yet fail on its first kernel (a CUDA 12 build on a CUDA 13 machine):
        # one tiny call per device finds out.
        try:
            x = torch.zeros(1, 16, 1, 8, device=q.device, dtype=torch.float16)  # (B, L, H, d)
            xops.memory_efficient_attention(x, x, x)
            _xformers_state[q.device] = None
        except Exception as e:
            _xformers_state[q.device] = f"xformers fails on {q.device} ({_first_line(e)})"
    return _xformers_state[q.device]


def _sdpa_pinned_reason(name):
    def reason(q, k, v, heads):
        if name == "sdpa_math":
            return None
        if q.device.type != "cuda":
            return f"needs CUDA tensors, got {q.device.type}"
        return _torch_sdpa_refusal(name, q, k, v, heads)

    return reason


def _torch_sdpa_refusal(name, q, k, v, heads):
    """Ask torch's own checks whether the pinned kernel takes these inputs; its debug warnings are
    the reasons. None when it does, or when this torch has no such check (the call then tells)."""
    check = getattr(torch.backends.cuda, f"can_use_{name.removeprefix('sdpa_')}_attention", None)
    if check is None:
        return None
    qh, kh, vh = [_heads_first(t, heads) for t in (q, k, v)]
    try:
        params = torch.backends.cuda.SDPAParams(qh, kh, vh, None, 0.0, False, False)
    except TypeError:  # torch < 2.5 has no enable_gqa argument
        params = torch.backends.cuda.SDPAParams(qh, kh, vh, None, 0.0, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = check(params, True)
    if ok:
        return None
    said = "; ".join(str(w.message).splitlines()[0] for w in caught)
    return f"torch refuses these inputs ({said or 'no reason given'})"


REASONS = {
    "triton": _triton_reason,
    "xformers": _xformers_reason,
    "sdpa": lambda q, k, v, heads: None,
    **{name: _sdpa_pinned_reason(name) for name in SDPA_PINS},
    "math": lambda q, k, v, heads: None,
}


# ----------------------------------------------------------------------------------------------
# the backends


def _heads_first(x, heads):
    B, L, C = x.shape
    return x.view(B, L, heads, C // heads).transpose(1, 2)  # (B, H, L, d), a view: no copy


def _triton(q, k, v, heads):
    return cross_attention.short_kv_attention(q, k, v, heads)


def _xformers(q, k, v, heads):
    B, Lq, C = q.shape
    Lk = k.shape[1]
    d = C // heads
    o = _xformers_ops().memory_efficient_attention(
        q.view(B, Lq, heads, d), k.view(B, Lk, heads, d), v.view(B, Lk, heads, d)
    )  # (B, Lq, H, d)
    return o.reshape(B, Lq, C)  # (B, Lq, heads*d)


def _sdpa(q, k, v, heads, pin=None):
    B, Lq, C = q.shape
    qh, kh, vh = [_heads_first(t, heads) for t in (q, k, v)]
    if pin is None:
        o = F.scaled_dot_product_attention(qh, kh, vh)  # (B, H, Lq, d)
    else:
        with sdpa_kernel(pin):
            o = F.scaled_dot_product_attention(qh, kh, vh)  # (B, H, Lq, d)
    return o.transpose(1, 2).reshape(B, Lq, C)  # (B, Lq, heads*d)


RUNS = {
    "triton": _triton,
    "xformers": _xformers,
    "sdpa": _sdpa,
    **{name: (lambda q, k, v, heads, pin=pin: _sdpa(q, k, v, heads, pin)) for name, pin in SDPA_PINS.items()},
    "math": reference_attention,
}


# ----------------------------------------------------------------------------------------------
# public


def available_backends(q, k, v, heads):
    """{backend name: None if it can run on these inputs, else the reason it cannot}."""
    check_inputs(q, k, v, heads)
    return {name: REASONS[name](q, k, v, heads) for name in BACKENDS}


def choose_backend(q, k, v, heads):
    """The backend `auto` runs for these inputs (see AUTO_RULE)."""
    for name in auto_candidates(q.device.type, k.shape[1], q.shape[1]):
        if REASONS[name](q, k, v, heads) is None:
            return name
    return "math"


def attention(q, k, v, heads, *, backend="auto"):
    """Multi-head attention without mask, scale d**-0.5. q: (B, Lq, heads*d); k, v: (B, Lk,
    heads*d), any strides (the last one 1 for the fused kernels) -> (B, Lq, heads*d).
    backend: "auto" or one of BACKENDS. Invalid inputs or an unknown backend name raise ValueError;
    a forced backend that cannot run on these inputs here raises BackendUnavailable."""
    check_inputs(q, k, v, heads)
    if backend == "auto":
        backend = choose_backend(q, k, v, heads)
    elif backend not in RUNS:
        raise ValueError(f"unknown attention backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    else:
        reason = REASONS[backend](q, k, v, heads)
        if reason is not None:
            raise BackendUnavailable(f"attention backend {backend!r} cannot run: {reason}")
    return RUNS[backend](q, k, v, heads)


# ----------------------------------------------------------------------------------------------
# the nearest codebook entry


def nearest_code(z, codebook, *, backend="auto"):
    """argmin_k ||z_n - codebook_k||^2 for each row of z (N, C), codebook (K, C) -> (N,) int64, the
    first index among equal distances. backend: "auto" (the Triton kernel on CUDA and meta tensors,
    the reference elsewhere), "triton" or "torch" (kernels/reference.py). Invalid inputs raise
    ValueError; a forced "triton" that cannot run here raises BackendUnavailable."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"nearest_code: backend {backend!r} is not auto, triton or torch")
    reason = _TRITON_IMPORT_ERROR
    if codebook_search is not None:
        codebook_search.check_codes(z, codebook)
        reason = codebook_search.unsupported_reason(z, codebook)
    if backend == "auto":
        backend = "triton" if reason is None and z.device.type in ("cuda", "meta") else "torch"
    if backend == "torch":
        return nearest_code_reference(z, codebook)
    if reason is not None:
        raise BackendUnavailable(f"nearest_code's kernel cannot run: {reason}")
    return torch.ops.kernels.nearest_code(z, codebook)
