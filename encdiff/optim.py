"""What each update does besides its forward and backward: the optimiser, its learning-rate warm-up,
the skip of a non-finite update, and the EMA of the weights. All of it reads and writes device
tensors only, so a captured update (encdiff/graphs.py) replays it as it is.

    opt = make_optimizer(torch.optim.AdamW, params, lr_tensor, betas, fused=True, weight_decay=0.01)
    guard = NonFiniteGuard("bf16", device, fused=True)   # guard.backward(loss); guard.step(opt, params)
    ema = EMA(module, 0.9999)                            # ema.set_update(n); ema.apply()
    lr = base_lr * lr_factor(step, warmup_steps)
"""

import math

import torch


def scaled_lr(section):
    """The learning rate a stage trains with: its lr, set for lr_ref_batch images, scaled with its
    global batch by lr_scaling (linear, the square root, or not at all; stage 1 always linearly)."""
    ratio = section.batch_size / section.lr_ref_batch
    rule = getattr(section, "lr_scaling", "linear")
    return section.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def warmup_steps(e):
    """Stage 2's warm-up in steps: encdiff.warmup_images / batch when given (the same images at any
    batch), else encdiff.warmup_steps."""
    return math.ceil(e.warmup_images / e.batch_size) if e.warmup_images else e.warmup_steps


def lr_factor(step, warmup):
    """Linear warm-up then constant (LDM's LambdaLinearScheduler with f_start 1e-6)."""
    if warmup <= 0 or step >= warmup:
        return 1.0
    return 1e-6 + (1.0 - 1e-6) * step / warmup


def make_optimizer(cls, params, lr, betas, fused, **kw):
    # lr as a tensor lets a captured update read the current learning rate (fused optimisers only)
    return cls(params, lr=lr, betas=tuple(betas), fused=fused, **kw)


# What perf.compile_scope = "blocks" compiles: the blocks the models repeat. Each is compiled once
# per distinct shape and reused by every block of that shape (RESULTS.md, "The step's budget", has
# the compile times of both scopes).


class NonFiniteGuard:
    """Skips an update whose gradients are not all finite, without a host sync.

    The gradient norm (which the log reports anyway) is the check: a NaN or inf anywhere makes it
    non-finite. The fused optimisers read the flag on the device and then leave parameters, moments
    and step counts untouched. fp16 also scales the loss dynamically (GradScaler's rule: halve on a
    non-finite step, double after 2,000 finite ones, in torch's own kernel); bf16 and fp32 need no
    scale, so no pass over the gradients multiplies them by 1. A non-fused optimiser cannot read the
    flag: there the check costs one host sync per update (perf.fused_adam = false, the release's)."""

    def __init__(self, prec, device, fused):
        self.fp16, self.fused = prec == "fp16", fused
        self.scale = torch.full((), 2.0**16 if self.fp16 else 1.0, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), device=device)  # of this update: 1.0 when it was skipped

    def backward(self, loss):
        (loss * self.scale if self.fp16 else loss).backward()

    def step(self, opt, params):
        """opt.step() unless a gradient is not finite; -> the gradient norm (unscaled)."""
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.fp16:
            norm = norm / self.scale
        found = (~torch.isfinite(norm)).float()
        self.found_inf.copy_(torch.maximum(self.found_inf, found))
        if self.fused:
            opt.grad_scale, opt.found_inf = (self.scale if self.fp16 else None), found
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
        elif not found.item():
            if self.fp16:
                torch._foreach_div_(grads, self.scale)
            opt.step()
        return norm

    def start(self):
        """Before an update's first step(): no skip recorded yet."""
        self.found_inf.zero_()

    def update(self):
        """After an update's last step(): fp16's dynamic scale follows whether it was skipped."""
        if self.fp16:
            torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)

    def state(self):
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}


class EMA:
    """Exponential moving average of a module's parameters, with LDM's warm-up: update n (1, 2, ...)
    uses decay min(decay, (1 + n) / (10 + n)) and moves the average by (1 - decay) * (avg - param),
    as LDM's LitEma does. The decay lives in a device tensor written before each update, so a
    captured update reads the current one."""

    def __init__(self, module, decay):
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.avg = [p.detach().clone().float() for p in self.params]  # the parameters' strides
        self.max_decay = decay
        self.step_size = torch.zeros((), device=self.params[0].device)  # -(1 - decay)

    @property
    def one_minus_decay(self):
        return -self.step_size

    def set_update(self, n):
        """The decay of the n-th update (n >= 1)."""
        self.step_size.fill_(min(self.max_decay, (1 + n) / (10 + n)) - 1.0)

    @torch.no_grad()
    def apply(self):
        # avg -= (1 - decay) * (avg - param) in one multi-tensor pass: a plain SGD step on the average
        # whose gradient is the parameters, with weight decay -1 (the gradient becomes param - avg) and
        # step size -(1 - decay). Without grad_scale the fused SGD writes only the average.
        torch._fused_sgd_(
            self.avg,
            self.params,
            [],
            weight_decay=-1.0,
            momentum=0.0,
            lr=self.step_size,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,
        )

    def state_dict(self):
        return dict(zip(self.names, self.avg))

    def load_state_dict(self, state):
        missing = [n for n in self.names if n not in state]
        assert not missing, f"EMA state lacks {missing[:3]}"
        for name, avg in zip(self.names, self.avg):
            avg.copy_(state[name])
