"""The weights' low-precision copies for a bf16/fp16 step, made in one multi-tensor pass.

Under autocast every convolution and linear layer casts its fp32 weight and bias to bf16 when it
runs, and the backward casts each bf16 gradient back: two small kernels per weight per update, a
thousand of a stage-2 step's 3,700 (benchmarks/step_trace.py; RESULTS.md, "The step's budget").
`LowPrecisionWeights(model, dtype)` hands those layers their weights already cast, all of them in
one `_foreach_copy_`, and returns their gradients to the fp32 weights in one more. The fp32
weights, their gradients, the optimiser, the EMA, DDP's buckets and the checkpoints do not change,
and the values are autocast's own (the same rounding of the same fp32 numbers; the same gradients
cast back), so a step is bitwise the autocast step.
"""

import torch
import torch.nn as nn
from torch.func import functional_call

from encdiff.models.layers import GroupNorm, LayerNorm

# the layers whose weights autocast casts to the low precision (its matmul/convolution lists), and
# the norms that run in their input's precision (encdiff/models/layers.py)
CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, GroupNorm, LayerNorm)


class CastAll(torch.autograd.Function):
    """(dtype, *tensors) -> the tensors in dtype, one multi-tensor kernel each way."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.set_materialize_grads(False)
        ctx.dtypes = [t.dtype for t in tensors]
        out = [torch.empty_like(t, dtype=dtype) for t in tensors]  # same strides (channels-last too)
        torch._foreach_copy_(out, list(tensors))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        back = [None if g is None else torch.empty_like(g, dtype=dt) for g, dt in zip(grads, ctx.dtypes)]
        pairs = [(b, g) for b, g in zip(back, grads) if g is not None]
        if pairs:
            torch._foreach_copy_([b for b, _ in pairs], [g for _, g in pairs])
        return (None, *back)


class LowPrecisionWeights(nn.Module):
    """model(*args) with the weights of its CAST_LAYERS in `dtype`, cast in one pass per call. Its
    parameters are model's (so DDP, compile and the optimiser see the fp32 weights); run it under
    autocast, which still casts the activations and keeps norms and losses in fp32."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.names = [
            f"{path}.{name}" if path else name
            for path, layer in model.named_modules()
            if isinstance(layer, CAST_LAYERS)
            for name, p in layer.named_parameters(recurse=False)
            if p.is_floating_point()
        ]

    def forward(self, *args, **kwargs):
        params = dict(self.model.named_parameters())
        low = CastAll.apply(self.dtype, *[params[n] for n in self.names])
        return functional_call(self.model, dict(zip(self.names, low)), args, kwargs)
