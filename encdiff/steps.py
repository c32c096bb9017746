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

import inspect
import math
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from encdiff import dist, runtime
from encdiff.graphs import Graphed, Snapshot, capture_on_every_rank
from encdiff.images import uint8_to_model
from encdiff.low_precision import LowPrecisionWeights
from encdiff.models.encdiff import EncDiff, build_diffusion, build_encoder, build_unet, build_vq, count_params
from encdiff.models.encoder import ConceptEncoder
from encdiff.models.unet import ResBlock, SpatialTransformer
from encdiff.models.vqvae import AttnBlock, ResnetBlock
from encdiff.models.vq_loss import VQLoss
from encdiff.optim import EMA, NonFiniteGuard, lr_factor, make_optimizer, scaled_lr, warmup_steps
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


def graph_refusal(cfg, images, fused, extra=None):
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

    stage = "vqvae"

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
        self.lr = scaled_lr(v)
        self.opt = make_optimizer(torch.optim.Adam, self.model.parameters(), self.lr, v.betas, self.fused)
        self.disc = self.loss_fn.discriminator if v.use_gan else None
        self.opt_d = (
            make_optimizer(torch.optim.Adam, self.disc.parameters(), self.lr, v.betas, self.fused)
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

    def lr_at(self, step):
        """The learning rate of global step `step` (constant in stage 1)."""
        return self.lr

    def summary(self, start):
        v = self.cfg.vqvae
        params = count_params(self.model)
        return f"vqvae: {params:,} parameters, steps {start} -> {v.steps}, global batch {v.batch_size}"

    def prepare(self, start, stop=None, verbose=True):
        """DDP, compile, the CUDA graph (stop and verbose: as EncDiffStep.prepare's, nothing to poll)."""
        self.forward = compile_model(
            wrap_ddp(self.with_low_precision_weights(self.model), self.d), self.cfg.perf.compile
        )
        gan = "vqvae.use_gan: the GAN's loss changes with the step and its adaptive weight needs eager autograd"
        refusal = graph_refusal(self.cfg, self.images, self.fused, gan if self.disc is not None else None)
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
            # The release's order (Lightning's two-optimiser loop): the autoencoder runs again after
            # its update and the discriminator learns from that new reconstruction.
            with torch.no_grad(), self.amp:
                xrec_after, _, _ = self.forward(x)
            d_loss, _ = self.loss_fn.discriminator_loss(x, xrec_after.float(), self.step_now)
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
    __call__ -> (loss, grad norm, x). vq_source and factor_sizes go into its checkpoints."""

    stage = "encdiff"

    def __init__(self, cfg, d, images, vq, vq_source=None, factor_sizes=None):
        e, p = cfg.encdiff, cfg.perf
        self.cfg, self.d, self.images, self.vq = cfg, d, images, vq
        self.vq_source, self.factor_sizes = vq_source, factor_sizes
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
        self.lr = scaled_lr(e)
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

    def lr_at(self, step):
        """The learning rate of global step `step`: linear warm-up, then constant."""
        return self.lr * lr_factor(step, warmup_steps(self.cfg.encdiff))

    def summary(self, start):
        e, m = self.cfg.encdiff, self.model
        return (
            f"encdiff: encoder {count_params(m.encoder):,} + U-Net {count_params(m.unet):,} parameters, "
            f"steps {start} -> {e.steps}, global batch {e.batch_size}, lr {self.lr:.3g}, VQ from {self.vq_source}"
        )

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
        self.capture(start, graph_refusal(self.cfg, self.images, self.fused), "encdiff")

    def latents_of(self, idx, x=None):
        """(b, C, h, w) pre-quantisation latents of images idx (x: those images, when at hand)."""
        if self.latents is not None:
            return self.latents.index_select(0, idx)
        if x is None:
            x = uint8_to_model(self.images.index_select(0, idx).to(self.d.device, non_blocking=True))
        with torch.no_grad(), self.amp:
            return self.vq.encode(x).float()

    def set_inputs(self, step):
        lr = self.lr_at(step)
        for g in self.opt.param_groups:
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
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
