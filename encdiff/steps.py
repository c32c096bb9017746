"""One home for each stage's training step: what a stage trains, and one update of it.

    step = EncDiffStep(cfg, d, images, vq)   # models, optimiser, EMA, batch order (stage 2)
    step.load(tensors)                       # resume: before prepare (encdiff/ckpt_contents.py reads the file)
    step.prepare(start)                      # latents, DDP, compile, CUDA graph
    loss, grad_norm, x = step(i)             # one update of global step i

`VQStep` is stage 1's. train.py and benchmarks/train_bench.py both train through these classes, so
the benchmark measures the step that trains.

Nothing in a step waits for the device: the batch indices are a slice of an epoch permutation that
lives beside the data, a non-finite update is skipped by the fused optimiser reading a flag on the
device (NonFiniteGuard), and the learning rate and the EMA decay are device tensors written before
each update. On CUDA the whole update (batch gather, forward, backward, optimiser, EMA, non-finite
bookkeeping) is recorded once in a CUDA graph and replayed (perf.cuda_graph); wherever that is not
possible the reason is printed and the same update runs eagerly.
"""

import copy
import inspect
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import kernels
from encdiff import dist, runtime
from encdiff.graphs import Graphed, Snapshot, capture_on_every_rank
from encdiff.images import uint8_to_model
from encdiff.low_precision import LowPrecisionWeights
from encdiff.models.encdiff import EncDiff, build_diffusion, build_encoder, build_unet, build_vq
from encdiff.models.encoder import ConceptEncoder
from encdiff.models.unet import ResBlock, SpatialTransformer
from encdiff.models.vqvae import AttnBlock, ResnetBlock
from encdiff.models.vq_loss import VQLoss
from encdiff.sync_bn import convert_to_global_bn

# Test hook for fault injection: ENCDIFF_INJECT_NAN="3,4" makes the loss of steps 3 and 4 NaN.
INJECT_NAN = frozenset(int(s) for s in os.environ.get("ENCDIFF_INJECT_NAN", "").split(",") if s.strip())
LATENT_BATCH = 1024  # images per forward of the frozen VQ encoder when stage 2 caches the latents
WARMUP_STEPS, WARMUP_STEPS_DDP = 3, 11  # eager steps before a capture (DDP settles its buckets in 11)


class BatchOrder:
    """Which images step i trains on: a seeded permutation of the dataset per epoch (the last short
    batch of an epoch is dropped, so shapes never change), kept on the data's device and made once
    per epoch; a step's indices are a slice of it, this rank's disjoint share of the global batch."""

    def __init__(self, n, global_batch, d, seed, device):
        assert 0 < global_batch <= n and global_batch % d.world_size == 0, (n, global_batch, d.world_size)
        self.n, self.global_batch, self.seed, self.device = n, global_batch, seed, device
        self.local = global_batch // d.world_size
        self.rank = d.rank
        self.per_epoch = n // global_batch
        self._epoch, self._perm = None, None

    def permutation(self, epoch):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            if self.device.type == "cuda":
                perm = perm.pin_memory()  # so the copy does not wait for the stream
            self._perm, self._epoch = perm.to(self.device, non_blocking=True), epoch
        return self._perm

    def global_indices(self, step):
        epoch, i = divmod(step, self.per_epoch)
        return self.permutation(epoch)[i * self.global_batch : (i + 1) * self.global_batch]

    def indices(self, step):
        return self.global_indices(step)[self.rank * self.local : (self.rank + 1) * self.local]


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


class Window:
    """The log's sums over the steps since the last log, kept on the device so that a step never
    syncs: mean loss and gradient norm of the finite steps, the skipped (non-finite) steps, and how
    many were skipped in a row (train.py stops after run.max_nonfinite)."""

    def __init__(self, device):
        self.device = device
        self.streak = torch.zeros((), device=device)  # non-finite steps in a row
        self.reset()

    def reset(self):
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.loss, self.grad_norm, self.good, self.skipped = z(), z(), z(), z()
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss, grad_norm, images):
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        self.loss += torch.where(bad, 0.0, loss.detach().float())
        self.grad_norm += torch.where(bad, 0.0, grad_norm.float())
        self.good += ~bad
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        self.steps += 1
        self.images += images


def attention_refusal(cfg, device):
    """Why perf.attention cannot run the U-Net's attention on this device, or None: asked with
    tensors of its widest attended level before any work ("triton" serves cross-attention only)."""
    e, backend = cfg.encdiff, cfg.perf.attention
    if backend == "auto":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        runtime.precision(cfg.perf.precision, device), torch.float32
    )
    width = e.model_channels * max(e.channel_mult[level] for level in [*e.attention_levels, len(e.channel_mult) - 1])
    keys = [e.num_tokens] if backend == "triton" else [e.num_tokens, 256]  # cross; self-attention at 16x16
    for n in keys:
        q = torch.zeros(1, 4, width, device=device, dtype=dtype)  # (B, Lq, C)
        k = torch.zeros(1, n, width, device=device, dtype=dtype)  # (B, Lk, C)
        reason = kernels.available_backends(q, k, k, e.num_heads)[backend]
        if reason is not None:
            return reason
    return None


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
COMPILE_BLOCKS = (ResBlock, SpatialTransformer, ConceptEncoder, ResnetBlock, AttnBlock)
BLOCK_SHAPES = 64  # compiled versions each block's code may keep (dynamo's default, 8, is too few)


def compile_model(model, mode, scope="model"):
    """model compiled by torch.compile in `mode` (perf.compile), as one graph (scope "model") or
    block by block in place (scope "blocks": the returned model is the given one)."""
    if mode == "off":
        return model
    mode = None if mode == "default" else mode
    if scope == "model":
        return torch.compile(model, mode=mode)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, BLOCK_SHAPES)
    for block in model.modules():
        if isinstance(block, COMPILE_BLOCKS):
            block.compile(mode=mode, dynamic=False)
    return model


def wrap_ddp(model, d, **kw):
    if not d.enabled:
        return model
    if d.device.type != "cuda":
        return DDP(model, **kw)
    # built on a side stream, as PyTorch asks of a DDP model whose backward a CUDA graph may capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ddp = DDP(model, device_ids=[d.device.index], **kw)
    torch.cuda.current_stream().wait_stream(side)
    return ddp


# BatchNorm statistics are global (GlobalBatchNorm2d), so DDP need not re-broadcast buffers each step.
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)


def graph_refusal(cfg, d, images, fused, extra=None):
    """Why this step cannot be captured, or None."""
    if not cfg.perf.cuda_graph:
        return "perf.cuda_graph = false"
    if images.device.type != "cuda":
        return "data.on_device = false: each batch is copied from host memory"
    if not fused:
        return "perf.fused_adam = false: the non-finite check of a non-fused optimiser reads the flag on the host"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register the noise generator with a CUDA graph"
    return extra


class Step:
    """What both stages share: the per-update inputs written outside the graph, the eager or
    replayed update, the warm-up and capture."""

    graph = None

    def __call__(self, step, batch=None):
        """One update at global step `step`. batch = (indices, images (b, 3, 64, 64)) from another
        feed (the benchmark's DataLoader baseline) replaces this step's own and is never captured."""
        self.set_inputs(step)
        if batch is not None:
            assert self.graph is None, "a CUDA-graphed step reads its own batch"
            self.idx = batch[0].to(self.images.device)
            return self.body(batch[1])
        if self.graph is not None:
            self.idx.copy_(self.order.indices(step))
            return self.graph.replay()
        self.idx = self.order.indices(step)
        return self.body()

    def capture(self, start, refusal, label):
        """On CUDA, record the update in a CUDA graph unless `refusal` says why not (printed)."""
        if self.d.device.type != "cuda":
            return
        if refusal is not None:
            dist.print0(f"{label}: no CUDA graph ({refusal}); the update runs eagerly")
            return
        self.idx = self.order.indices(start).clone()  # the static index buffer of the replays
        self.set_inputs(start)
        warmup = WARMUP_STEPS_DDP if self.d.enabled else WARMUP_STEPS
        snapshot = Snapshot(self.mutable_tensors, self.optimizers(), self.generators())
        graphed = Graphed(self.body, self.own_generators(), self.optimizers())
        reason = capture_on_every_rank(graphed, snapshot, warmup, self.d)
        if reason is not None:
            dist.print0(f"{label}: no CUDA graph (capture failed: {reason}); every rank runs the update eagerly")
            return
        self.graph = graphed
        dist.print0(f"{label}: the update is one CUDA graph ({warmup} warm-up steps, then replays)")

    def with_low_precision_weights(self, model):
        """model, or model with its layers' weights cast in one pass when the step runs in bf16/fp16."""
        dtype = runtime.LOW_DTYPES.get(self.prec)
        return model if dtype is None else LowPrecisionWeights(model, dtype)

    def backward_and_step(self, loss):
        """Backward of the loss and the guarded step of the model's optimiser -> (loss, grad norm)."""
        if INJECT_NAN:
            loss = loss * self.poison
        self.guard.start()
        self.opt.zero_grad(set_to_none=True)
        self.guard.backward(loss)
        return loss, self.guard.step(self.opt, self.params)

    def generators(self):
        """The generators an update draws from: the device's default one (dropout, the codebook's
        restarts) and own_generators()."""
        return [torch.cuda.default_generators[self.d.device.index or 0], *self.own_generators()]

    def own_generators(self):
        return []

    def mutable_tensors(self):
        """Every tensor an update changes besides the optimisers' state, for the capture's warm-up to
        put back."""
        return [*self.model.state_dict().values(), *self.guard.state().values(), self.guard.found_inf]


# ---------------------------------------------------------------------------------------------
# stage 1: VQ autoencoder


class VQStep(Step):
    """Stage 1: the autoencoder's reconstruction + codebook loss (+ PatchGAN when vqvae.use_gan),
    Adam, the non-finite skip. __call__ -> (loss, grad norm, x, reconstruction)."""

    def __init__(self, cfg, d, images):
        v, p = cfg.vqvae, cfg.perf
        self.cfg, self.d, self.images = cfg, d, images
        self.prec = runtime.precision(p.precision, d.device)
        self.amp = runtime.autocast(self.prec, d.device, cache_enabled=False)  # capturable
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank and in every run
        self.model = build_vq(v).to(d.device)
        if p.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = VQLoss(
            disc_weight=v.disc_weight, disc_start=v.disc_start, lpips_path=v.lpips_path or None, use_gan=v.use_gan
        ).to(d.device)
        self.fused = p.fused_adam
        self.opt = make_optimizer(torch.optim.Adam, self.model.parameters(), v.lr, v.betas, self.fused)
        self.disc = self.loss_fn.discriminator if v.use_gan else None
        self.opt_d = (
            make_optimizer(torch.optim.Adam, self.disc.parameters(), v.lr, v.betas, self.fused)
            if self.disc is not None
            else None
        )
        self.guard = NonFiniteGuard(self.prec, d.device, self.fused)
        self.order = BatchOrder(len(images), v.batch_size, d, cfg.run.seed, images.device)
        self.params = list(self.model.parameters())
        self.forward = self.model
        self.poison = torch.ones((), device=d.device)
        self.step_now = 0

    def optimizers(self):
        return [self.opt] + ([self.opt_d] if self.opt_d is not None else [])

    def prepare(self, start, stop=None, verbose=True):
        """DDP, compile, the CUDA graph (stop and verbose: as EncDiffStep.prepare's, nothing to poll)."""
        self.forward = compile_model(
            wrap_ddp(self.with_low_precision_weights(self.model), self.d), self.cfg.perf.compile
        )
        gan = "vqvae.use_gan: the GAN's loss changes with the step and its adaptive weight needs eager autograd"
        refusal = graph_refusal(self.cfg, self.d, self.images, self.fused, gan if self.disc is not None else None)
        self.capture(start, refusal, "vqvae")

    def set_inputs(self, step):
        self.step_now = step  # the GAN's start step (never captured)
        if INJECT_NAN:
            self.poison.fill_(math.nan if step in INJECT_NAN else 1.0)

    def body(self, x=None):
        if x is None:
            x = uint8_to_model(
                self.images.index_select(0, self.idx).to(self.d.device, non_blocking=True), self.cfg.perf.channels_last
            )
        with self.amp:
            xrec, qloss, _ = self.forward(x)
        loss, _ = self.loss_fn.generator_loss(
            x, xrec.float(), qloss.float(), self.step_now, self.model.last_layer_weight()
        )
        loss, grad_norm = self.backward_and_step(loss)
        if self.opt_d is not None:
            d_loss, _ = self.loss_fn.discriminator_loss(x, xrec.detach().float(), self.step_now)
            self.opt_d.zero_grad(set_to_none=True)
            self.guard.backward(d_loss)
            self.guard.step(self.opt_d, list(self.disc.parameters()))
        self.guard.update()
        return loss.detach(), grad_norm, x, xrec.detach()


# ---------------------------------------------------------------------------------------------
# stage 2: concept encoder + latent U-Net


@torch.no_grad()
def encode_latents(vq, images, d, amp, batch=LATENT_BATCH, stop=None, progress=True):
    """Pre-quantisation latents of the whole dataset, computed once: each rank encodes a slice,
    then all ranks gather the full (N, C, h, w) tensor. stop() is called between batches."""
    n = len(images)
    per_rank = math.ceil(n / d.world_size)
    lo, hi = d.rank * per_rank, min(n, (d.rank + 1) * per_rank)
    chunks = []
    for s in tqdm(range(lo, hi, batch), desc="latents", disable=not (d.is_main and progress), dynamic_ncols=True):
        if stop is not None:
            stop()
        x = uint8_to_model(images[s : min(hi, s + batch)].to(d.device, non_blocking=True))  # (b, 3, 64, 64)
        with amp:
            chunks.append(vq.encode(x).float())
    z = torch.cat(chunks) if chunks else torch.empty(0, device=d.device)
    if not d.enabled:
        return z
    pad = per_rank - z.shape[0]
    z = torch.cat([z, z.new_zeros(pad, *z.shape[1:])]) if pad else z
    gathered = [torch.empty_like(z) for _ in range(d.world_size)]
    torch.distributed.all_gather(gathered, z)
    return torch.cat(gathered)[:n]  # (N, C, h, w)


class EncDiffStep(Step):
    """Stage 2: the diffusion loss through the concept encoder and the U-Net, AdamW with linear
    warm-up, the non-finite skip, the EMA. t and the noise are drawn for the whole global batch from
    one generator seeded alike on every rank and sliced, so N ranks train as one.
    __call__ -> (loss, grad norm, x)."""

    def __init__(self, cfg, d, images, vq):
        e, p = cfg.encdiff, cfg.perf
        self.cfg, self.d, self.images, self.vq = cfg, d, images, vq
        self.prec = runtime.precision(p.precision, d.device)
        self.amp = runtime.autocast(self.prec, d.device, cache_enabled=False)  # capturable
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank and in every run
        model = EncDiff(build_encoder(e), build_unet(e, cfg.vqvae.embed_dim, p.attention), build_diffusion(e))
        model = model.to(d.device)
        if d.enabled:
            model.encoder = convert_to_global_bn(model.encoder)  # BN statistics over the global batch
        if p.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.lr = e.lr * e.batch_size / e.lr_ref_batch  # linear scaling with the global batch
        self.fused = p.fused_adam
        lr = torch.tensor(self.lr, device=d.device) if self.fused else self.lr
        self.opt = make_optimizer(
            torch.optim.AdamW, model.parameters(), lr, e.betas, self.fused, weight_decay=e.weight_decay
        )
        self.guard = NonFiniteGuard(self.prec, d.device, self.fused)
        self.ema_module = model if e.ema_all else model.unet
        self.ema = EMA(self.ema_module, e.ema_decay)
        self.noise_gen = torch.Generator(device=d.device).manual_seed(cfg.run.seed)
        self.order = BatchOrder(len(images), e.batch_size, d, cfg.run.seed, images.device)
        self.params = list(model.parameters())
        self.forward = model
        self.scale, self.latents = None, None
        self.poison = torch.ones((), device=d.device)

    def optimizers(self):
        return [self.opt]

    def own_generators(self):
        return [self.noise_gen]

    def mutable_tensors(self):
        return super().mutable_tensors() + self.ema.avg

    def prepare(self, start, stop=None, verbose=True):
        """Latents (cached: encoded once, stop() polled meanwhile), the latent scale (measured on
        the first global batch unless resumed), DDP, compile, the CUDA graph."""
        if self.cfg.perf.cache_latents:
            amp = runtime.scoring_autocast(self.cfg, self.d.device)
            self.latents = encode_latents(self.vq, self.images, self.d, amp, stop=stop, progress=verbose)
        if self.scale is None:
            # 1/std of the latent, measured once on the first global batch (as LDM does) and stored
            self.scale = 1.0 / self.latents_of(self.order.global_indices(0)).std()
            if verbose:
                dist.print0(f"encdiff: latent scale factor {self.scale.item():.4f}")
        model = self.with_low_precision_weights(self.model)
        ddp = wrap_ddp(model, self.d, static_graph=True, gradient_as_bucket_view=True, **NO_BUFFER_SYNC)
        self.forward = compile_model(ddp, self.cfg.perf.compile, self.cfg.perf.compile_scope)
        self.capture(start, graph_refusal(self.cfg, self.d, self.images, self.fused), "encdiff")

    def latents_of(self, idx, x=None):
        """(b, C, h, w) pre-quantisation latents of images idx (x: those images, when at hand)."""
        if self.latents is not None:
            return self.latents.index_select(0, idx)
        if x is None:
            x = uint8_to_model(self.images.index_select(0, idx).to(self.d.device, non_blocking=True))
        with torch.no_grad(), self.amp:
            return self.vq.encode(x).float()

    def set_inputs(self, step):
        e = self.cfg.encdiff
        factor = lr_factor(step, e.warmup_steps)
        for g in self.opt.param_groups:
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(self.lr * factor)
            else:
                g["lr"] = self.lr * factor
        self.ema.set_update(step + 1)
        if INJECT_NAN:
            self.poison.fill_(math.nan if step in INJECT_NAN else 1.0)

    def body(self, x=None):
        e, cl = self.cfg.encdiff, self.cfg.perf.channels_last
        if x is None:
            x = uint8_to_model(self.images.index_select(0, self.idx).to(self.d.device, non_blocking=True), cl)
        z0 = self.latents_of(self.idx, x) * self.scale
        lo, hi = self.d.rank * self.order.local, (self.d.rank + 1) * self.order.local
        t = self.model.diffusion.sample_timesteps(e.batch_size, self.noise_gen, self.d.device)[lo:hi]
        noise = torch.randn((e.batch_size, *z0.shape[1:]), device=self.d.device, generator=self.noise_gen)[lo:hi]
        if cl:
            z0, noise = (
                z0.contiguous(memory_format=torch.channels_last),
                noise.contiguous(memory_format=torch.channels_last),
            )
        with self.amp:
            loss = self.forward(x, z0, t, noise)
        loss, grad_norm = self.backward_and_step(loss)
        self.guard.update()
        self.ema.apply()
        return loss.detach(), grad_norm, x


def build_step(stage, cfg, d, images, vq=None):
    """`stage`'s step ("vqvae" or "encdiff"), not yet prepared. Stage 2's frozen VQ is `vq`, or one
    with random weights seeded by run.seed where only the cost matters (benchmarks, the CPU plan)."""
    if stage == "vqvae":
        return VQStep(cfg, d, images)
    if vq is None:
        torch.manual_seed(cfg.run.seed)
        vq = build_vq(cfg.vqvae).to(d.device).eval().requires_grad_(False)
    return EncDiffStep(cfg, d, images, vq)


PLAN_BATCH = 32  # the largest per-rank batch the plan times: the cost per image falls with the batch up to about here


def seconds_per_image(stage, cfg, d, steps=3):
    """How long `stage` takes per trained image under cfg on d's device: the fastest of `steps`
    eager updates on random images at the stage's per-rank batch (at most PLAN_BATCH), after one
    warm-up (compile and CUDA graph off: their first step is their own cost). For a plan before any
    long work, not a benchmark (RESULTS.md says how close it came)."""
    cfg = copy.deepcopy(cfg)
    cfg.perf.compile, cfg.perf.cuda_graph = "off", False
    section = getattr(cfg, stage)
    batch = min(section.batch_size // d.world_size, PLAN_BATCH)
    section.batch_size = batch * d.world_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (2 * section.batch_size, 64, 64, 3), dtype=torch.uint8, generator=g
    )  # (N, 64, 64, 3)
    with torch.random.fork_rng(devices=[]):
        st = build_step(stage, cfg, d, images)
        st.prepare(0, verbose=False)
        st(0)[0].item()
        fastest = math.inf
        for i in range(1, steps + 1):
            t0 = time.perf_counter()
            st(i)[0].item()  # the device has finished
            fastest = min(fastest, time.perf_counter() - t0)
    return fastest / batch
