"""The trainer's kernels: attention for the U-Net (several backends) and the VQ codebook search.

    kernels.attention(q, k, v, heads, *, backend="auto")   q (B, Lq, heads*d), k, v (B, Lk, heads*d)
    kernels.available_backends(q, k, v, heads)             {name: None or why it cannot run}
    kernels.nearest_code(z, codebook, *, backend="auto")   (N,) index of each row's nearest code

Invalid inputs raise ValueError; a forced backend that cannot run raises kernels.BackendUnavailable.
The package imports nothing from encdiff/: it is usable, and testable, on its own.

kernels/dispatch.py holds the backends and the `auto` rules; kernels/cross_attention.py the fused
Triton kernel for short key sequences; kernels/nearest_code.py the codebook search without the
distance matrix; kernels/reference.py the plain definitions.
"""

from kernels.dispatch import (  # noqa: F401
    AUTO_RULE,
    BACKENDS,
    attention,
    available_backends,
    choose_backend,
    nearest_code,
)
from kernels.reference import BackendUnavailable, nearest_code_reference, reference_attention  # noqa: F401
