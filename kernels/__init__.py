"""Attention for the EncDiff U-Net: one public entry point, several backends.

    kernels.attention(q, k, v, heads, *, backend="auto")   q (B, Lq, heads*d), k, v (B, Lk, heads*d)
    kernels.available_backends(q, k, v, heads)             {name: None or why it cannot run}

Invalid inputs raise ValueError; a forced backend that cannot run raises kernels.BackendUnavailable.
The package imports nothing from encdiff/: it is usable, and testable, on its own.

kernels/dispatch.py holds the backends and the `auto` rule; kernels/cross_attention.py the fused
Triton kernel for short key sequences; kernels/reference.py the plain definition.
"""

from kernels.dispatch import AUTO_RULE, BACKENDS, attention, available_backends, choose_backend  # noqa: F401
from kernels.reference import BackendUnavailable, reference_attention  # noqa: F401
