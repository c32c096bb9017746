"""BatchNorm whose batch statistics span the global batch (all ranks).

Why: the concept encoder's BatchNorm would otherwise normalise each rank's shard alone, so a run
on N GPUs would train a different model than one GPU with the same global batch. torch's
nn.SyncBatchNorm runs on CUDA only; this one runs on NCCL and gloo alike (CPU tests use gloo).
Outside a process group, or in eval mode, it is a plain BatchNorm2d.

Inside the captured update (encdiff/graphs.py) and under torch.compile: the forward and backward
each issue one all-reduce of a fixed-size tensor and nothing reads a value back on the host (the
momentum is a Python number), so the collectives are recorded like DDP's own; torch.compile traces
both without a graph break and computes what eager does (tests/test_sync_bn.py, 2 gloo ranks). The
recording itself needs two GPUs and has not run yet.
"""

import torch
import torch.distributed as dist
import torch.nn as nn


class SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) that gradients flow through: y = sum of every rank's x, so the gradient for
    this rank's x is the sum of every rank's gradient for y. (torch.distributed.nn.functional's
    all_reduce does the same but is deprecated from torch 2.13.)"""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        C = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() // C, dtype=torch.float32, device=x.device)
        # one all-reduce of [sum, sum of squares, count]; autograd-aware, so gradients flow across ranks
        stats = SumOverRanks.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C : 2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_to_global_bn(module):
    """Replace every BatchNorm2d in module (in place where possible) by GlobalBatchNorm2d."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        new = GlobalBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(iter(module.buffers()), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_bn(child))
    return module
