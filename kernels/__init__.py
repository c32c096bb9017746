"""The trainer's kernels: attention for the U-Net (several backends) and the VQ codebook search.

    kernels.attention(q, k, v, heads, *, backend="auto")   q (B, Lq, heads*d), k, v (B, Lk, heads*d)
    kernels.available_backends(q, k, v, heads)             {name: None or why it cannot run}
    kernels.nearest_code(z, codebook, *, backend="auto")   (N,) index of each row's nearest code

Invalid inputs raise ValueError; a forced backend that cannot run raises kernels.BackendUnavailable.
The package imports nothing from encdiff/: it is usable, and testable, on its own.

kernels/dispatch.py holds the backends and the `auto` rules; kernels/cross_attention.py the fused
Triton kernel for short key sequences; kernels/codebook_search.py the codebook search without the
distance matrix; kernels/reference.py the plain definitions.
"""

import importlib

# The attention backends by name. Here, not in dispatch.py, so that a config check can list them
# without importing torch or triton; dispatch.py asserts it implements exactly these.
BACKENDS = ("triton", "xformers", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "math")

_EXPORTS = {
    "AUTO_RULE": "kernels.dispatch",
    "attention": "kernels.dispatch",
    "available_backends": "kernels.dispatch",
    "choose_backend": "kernels.dispatch",
    "nearest_code": "kernels.dispatch",
    "BackendUnavailable": "kernels.reference",
    "nearest_code_reference": "kernels.reference",
    "reference_attention": "kernels.reference",
}


def __getattr__(name):
    """The package's functions, imported on first use (PEP 562): `import kernels` stays cheap."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


__all__ = ["BACKENDS", *_EXPORTS]
