"""Train EncDiff: stage 1 the VQ autoencoder, stage 2 the concept encoder with the latent U-Net.

    python train.py --config config.toml                                  # one process
    torchrun --nproc_per_node=8 train.py --config config.toml             # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train.py --config config.toml          # two nodes
    python train.py --config config.toml --config configs/cpu.toml --encdiff.steps=2000

Stages run in order in one command; a finished stage is skipped; `run.resume = "auto"` continues
from the newest good checkpoint in `run.out_dir/<stage>/`.
"""
import inspect
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from encdiff import checkpoint as ckpt
from encdiff import dist
from encdiff.config import parse_args, to_toml, from_toml_text
from encdiff.data import ensure_synth3d, load_all, open_dataset
from encdiff.errors import UserError, exit_on_user_error
from encdiff.images import save_grid
from encdiff.models.encdiff import EncDiff, build_diffusion, build_encoder, build_unet, build_vq, count_params, uint8_to_model
from encdiff.models.vq_loss import VQLoss
from encdiff.sync_bn import convert_to_global_bn

# BatchNorm statistics are global (GlobalBatchNorm2d), so DDP need not re-broadcast buffers each step.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})

# Keys that define a model's shape: a checkpoint made with other values cannot be loaded.
MODEL_KEYS = {
    "vqvae": ("kind", "ch", "ch_mult", "enc_res_blocks", "dec_res_blocks", "z_channels", "embed_dim", "n_embed"),
    "encdiff": ("num_tokens", "token_dim", "encoder_ch", "model_channels", "channel_mult", "num_res_blocks",
                "attention_levels", "num_heads", "timesteps", "schedule"),
}


# ---------------------------------------------------------------------------------------------
# setup helpers


def check_output_dir(out_dir):
    """Fail before any long work if the run directory cannot be written."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(out_dir) / f".write_test_{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run.out_dir: cannot write to {out_dir} ({e.strerror})") from None


def open_data(cfg, d):
    """Open (generating the bundled set on first use) and load the dataset as a uint8 tensor."""
    if cfg.data.name == "synth3d" and not Path(cfg.data.path).exists():
        if d.local_rank == 0:  # once per node (the write is atomic, so a shared disk is fine too)
            ensure_synth3d(cfg.data.path, cfg.data.grid)
        dist.barrier()
    ds = open_dataset(cfg.data.name, cfg.data.path)
    h, w, c = ds.images.shape[1:]
    if (h, w, c) != (64, 64, 3):
        raise UserError(f"{cfg.data.path}: images are {h}x{w}x{c}; EncDiff's encoder needs 64x64x3")
    images = torch.from_numpy(load_all(ds, progress=d.is_main))  # (N, 64, 64, 3) uint8
    if d.device.type == "cuda" and cfg.data.on_device:
        images = images.to(d.device)  # resident: no data loader in the step
    return ds, images


def batch_indices(step, n, global_batch, d, seed, _cache={}):
    """This rank's disjoint shard of the global batch for `step`, from a seeded per-epoch
    permutation (the last short batch of an epoch is dropped so shapes never change)."""
    per_epoch = n // global_batch
    epoch, i = divmod(step, per_epoch)
    key = (n, seed, epoch)
    if key not in _cache:
        _cache.clear()
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        _cache[key] = torch.randperm(n, generator=g)
    local = global_batch // d.world_size
    start = i * global_batch + d.rank * local
    return _cache[key][start : start + local]


def fetch(images, idx, device, channels_last):
    idx = idx.to(images.device)
    x = images.index_select(0, idx).to(device, non_blocking=True)  # (b, 64, 64, 3) uint8
    return uint8_to_model(x, channels_last)


def autocast(cfg, device):
    prec = cfg.perf.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    if prec == "fp32":
        return nullcontext(), prec
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), prec


def compile_model(model, mode):
    if mode == "off":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def make_optimizer(cls, params, lr, betas, device, fused, **kw):
    fused = bool(fused and device.type == "cuda")
    return cls(params, lr=lr, betas=tuple(betas), fused=fused, **kw)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def check_compatible(meta, cfg, stage, path):
    """A checkpoint whose model shape differs from the config is one clear error."""
    stored = getattr(from_toml_text(meta["config"], f"{path} (stored config)"), stage)
    current = getattr(cfg, stage)
    for key in MODEL_KEYS[stage]:
        if getattr(stored, key) != getattr(current, key):
            raise UserError(f"{path}: checkpoint from an incompatible model config: {stage}.{key} is "
                            f"{getattr(stored, key)} there, {getattr(current, key)} here")


def load_state(module, tensors, prefix, path):
    try:
        module.load_state_dict(ckpt.unprefixed(prefix, tensors))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "state does not match"
        raise UserError(f"{path}: cannot load '{prefix}' weights ({first})") from None


def find_resume(stage_dir, cfg, stage, d):
    if cfg.run.resume == "never":
        if ckpt.list_checkpoints(stage_dir):
            raise UserError(f"{stage_dir} already holds checkpoints and run.resume = 'never': use a new run.out_dir")
        return None
    found = ckpt.latest_good_checkpoint(stage_dir)
    if found is not None:
        check_compatible(found[2], cfg, stage, found[0])
    # every rank must resume from the same step: on several nodes run.out_dir must be a shared disk
    mine = int(found[2]["step"]) if found is not None else 0
    first = dist.broadcast_object(mine)
    if mine != first:
        raise UserError(f"rank {d.rank} would resume {stage} from step {mine} but rank 0 from step {first}: "
                        f"run.out_dir must be on a disk shared by every node")
    return found


def load_vq_for_stage2(cfg, out_dir, device):
    """The frozen VQ autoencoder: from vqvae.ckpt if given, else the newest of stage 1."""
    path = Path(cfg.vqvae.ckpt) if cfg.vqvae.ckpt else None
    if path is None:
        found = ckpt.latest_good_checkpoint(out_dir / "vqvae")
        if found is None:
            raise UserError(f"no VQ checkpoint in {out_dir / 'vqvae'}: run the vqvae stage first or set vqvae.ckpt")
        path, tensors, meta = found
    else:
        tensors, meta = ckpt.load_checkpoint(path)
    check_compatible(meta, cfg, "vqvae", path)
    vq = build_vq(cfg.vqvae)
    load_state(vq, tensors, "model", path)
    return vq.to(device).eval().requires_grad_(False), path


def lr_factor(step, warmup):
    """Linear warm-up then constant (LDM's LambdaLinearScheduler with f_start 1e-6)."""
    if warmup <= 0 or step >= warmup:
        return 1.0
    return 1e-6 + (1.0 - 1e-6) * step / warmup


def reseed(seed, rank, step):
    # the global RNG (dropout) is reseeded at each stage start so a resumed run is reproducible
    torch.manual_seed(seed * 1_000_003 + rank * 7919 + step)


class Halt(Exception):
    """Training cannot go on (non-finite losses, a checkpoint that cannot be written)."""


class StopSignal:
    """SIGTERM/SIGINT (and any configured signal) ask the run to finish its step, write a
    checkpoint and exit 0, so a preempted job resumes where it stopped. A second signal interrupts."""

    def __init__(self, names):
        self.received = None
        for name in names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name


def agree_to_stop(stop, d):
    """True on every rank if any rank received a stop signal (all stop at the same step)."""
    if not d.enabled:
        return stop.received is not None
    flag = torch.tensor([int(stop.received is not None)], device=d.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def make_scaler(prec, device):
    """fp16: dynamic loss scaling. bf16/fp32: a fixed scale of 1 whose job is to skip an update
    with non-finite gradients (without a host sync where the optimiser is fused)."""
    if prec == "fp16":
        return torch.amp.GradScaler(device.type, init_scale=2.0**16)
    # GradScaler insists on growth > 1 and backoff < 1: make both negligible, and growth never happen
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_factor=1 + 2**-20, backoff_factor=1 - 2**-20,
                                growth_interval=2**30)


# Test hook for fault injection: ENCDIFF_INJECT_NAN="3,4" makes the loss of steps 3 and 4 NaN.
INJECT_NAN = {int(s) for s in os.environ.get("ENCDIFF_INJECT_NAN", "").split(",") if s.strip()}


def scaled_backward(scaler, loss, step):
    if step in INJECT_NAN:
        loss = loss * float("nan")
    scaler.scale(loss).backward()
    return loss


class Window:
    """Sums over the steps since the last log, kept on the device: the step never syncs."""

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


def end_of_step(done, total, r, d, win, opt, stage_dir, bar, stop, save):
    """Log, checkpoint and stop checks after a step. Returns True when the run must stop now."""
    bar.update(1)
    log_now = done % r.log_every == 0 or done == total
    if log_now:
        sums = dist.all_reduce_mean(torch.stack([win.loss, win.grad_norm, win.good, win.skipped])).tolist()
        good = max(sums[2], 1.0)
        rec = {"step": done, "loss": sums[0] / good, "lr": opt.param_groups[0]["lr"], "grad_norm": sums[1] / good,
               "skipped_nonfinite": int(round(sums[3])), "images_per_s": win.images / (time.perf_counter() - win.t0),
               "peak_mem_mb": peak_memory_mb(d.device)}
        if d.is_main:
            append_jsonl(stage_dir / "log.jsonl", rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
        streak = int(win.streak.item())
        win.reset()
        if streak >= r.max_nonfinite:
            save(done, final=True)
            bar.close()
            raise Halt(f"{streak} steps in a row had a non-finite loss or gradient (each was skipped); stopped at "
                       f"step {done} with the last good weights saved in {stage_dir}. Lower the learning rate or "
                       f"use perf.precision = 'fp32', then rerun to resume.")
    stopping = (log_now or done % r.stop_check_every == 0 or not d.enabled) and agree_to_stop(stop, d)
    if stopping or done % r.ckpt_every == 0 or done == total:
        save(done, final=stopping or done == total)
    if stopping:
        bar.close()
        dist.print0(f"\nstopped by {stop.received or 'a signal on another rank'} at step {done}; checkpoint saved. "
                    f"Run the same command to resume.")
    return stopping


def guarded_save(write, step, final, stage_dir, keep_last):
    """Write a checkpoint; a failed write (full disk) warns and leaves the previous one intact,
    except the last one of a stage, which must succeed."""
    try:
        write(step)
        ckpt.prune_checkpoints(stage_dir, keep_last)
    except OSError as e:
        if final:
            raise Halt(f"cannot write the checkpoint of step {step} in {stage_dir}: {e.strerror or e}") from None
        import warnings

        warnings.warn(f"checkpoint of step {step} not written ({e.strerror or e}); the previous one is intact", stacklevel=2)


def check_disk_space(stage_dir, modules, copies):
    """Fail early if a checkpoint (weights, optimiser moments, EMA: `copies` fp32 copies) cannot fit."""
    need = copies * sum(p.numel() * 4 for m in modules for p in m.parameters()) * 2  # x2: old + new file
    free = shutil.disk_usage(stage_dir).free
    if free < need:
        raise UserError(f"run.out_dir: {stage_dir} has {free / 2**20:.0f} MiB free; checkpoints need about {need / 2**20:.0f} MiB")


# ---------------------------------------------------------------------------------------------
# stage 1: VQ autoencoder


def vqvae_update(x, step, forward, model, loss_fn, opt, opt_d, scaler, params, amp):
    """One stage-1 update on batch x: generator loss, scaled backward, the grad scaler's non-finite
    skip, then the discriminator's step when the GAN is on. -> (loss, grad norm, reconstruction)."""
    with amp:
        xrec, qloss, _ = forward(x)
    loss, _ = loss_fn.generator_loss(x, xrec.float(), qloss.float(), step, model.last_layer_weight())
    opt.zero_grad(set_to_none=True)
    loss = scaled_backward(scaler, loss, step)
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    scaler.step(opt)  # skipped when the gradients are not finite
    if opt_d is not None:
        d_loss, _ = loss_fn.discriminator_loss(x, xrec.detach().float(), step)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(d_loss).backward()
        scaler.step(opt_d)
    scaler.update()
    return loss, grad_norm, xrec


def encdiff_update(batch, step, forward, opt, scaler, params, ema_params, src_params, ema_decay, amp):
    """One stage-2 update on batch = (x, z0, t, noise): diffusion loss, scaled backward, the grad
    scaler's non-finite skip, EMA with warm-up. -> (loss, grad norm)."""
    with amp:
        loss = forward(*batch)
    opt.zero_grad(set_to_none=True)
    loss = scaled_backward(scaler, loss, step)
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # for the log and the non-finite check
    scaler.step(opt)  # skipped when the gradients are not finite
    scaler.update()
    decay = min(ema_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, [p.detach().float() for p in src_params], 1 - decay)
    return loss, grad_norm


def train_vqvae(cfg, d, images, out_dir, stop):
    v, r = cfg.vqvae, cfg.run
    stage_dir = out_dir / "vqvae"
    stage_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(r.seed)  # the same initial weights on every rank and in every run
    model = build_vq(v).to(d.device)
    if v.kind == "pool":  # fixed: nothing to learn, one checkpoint so that stage 2 finds it as usual
        if d.is_main and ckpt.latest_good_checkpoint(stage_dir) is None:
            (stage_dir / "config.toml").write_text(to_toml(cfg))
            ckpt.save_checkpoint(stage_dir / ckpt.checkpoint_name(v.steps), {}, step=v.steps, stage="vqvae",
                                 config_toml=to_toml(cfg))
        dist.print0(f"vqvae: kind 'pool' ({model.downsample}x{model.downsample} average pooling) has nothing to train")
        dist.barrier()
        return False

    loss_fn = VQLoss(disc_weight=v.disc_weight, disc_start=v.disc_start, lpips_path=v.lpips_path or None, use_gan=v.use_gan).to(d.device)
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(torch.optim.Adam, model.parameters(), v.lr, v.betas, d.device, cfg.perf.fused_adam)
    disc = getattr(loss_fn, "discriminator", None) if v.use_gan else None
    opt_d = make_optimizer(torch.optim.Adam, disc.parameters(), v.lr, v.betas, d.device, cfg.perf.fused_adam) if disc is not None else None

    start = 0
    found = find_resume(stage_dir, cfg, "vqvae", d)
    if found is not None:
        path, tensors, meta = found
        start = int(meta["step"])
        load_state(model, tensors, "model", path)
        ckpt.optimizer_from_tensors(opt, "opt", tensors, meta["opt_groups"])
        if disc is not None and "disc_opt_groups" in meta:
            load_state(disc, tensors, "disc", path)
            ckpt.optimizer_from_tensors(opt_d, "opt_disc", tensors, meta["disc_opt_groups"])
    amp, prec = autocast(cfg, d.device)
    scaler = make_scaler(prec, d.device)
    if found is not None and "scaler" in found[2]:
        scaler.load_state_dict(json.loads(found[2]["scaler"]))
    if start >= v.steps:
        dist.print0(f"vqvae: finished already (step {start}), skipped")
        return False
    dist.print0(f"vqvae: {count_params(model):,} parameters, steps {start} -> {v.steps}, global batch {v.batch_size}")
    if d.is_main:
        check_disk_space(stage_dir, [model] + ([disc] if disc is not None else []), copies=3)
        (stage_dir / "config.toml").write_text(to_toml(cfg))

    ddp = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.enabled else model
    forward = compile_model(ddp, cfg.perf.compile)
    reseed(r.seed, d.rank, start)

    def write(step):
        tensors = ckpt.prefixed("model", model.state_dict())
        opt_t, groups = ckpt.optimizer_to_tensors(opt, "opt")
        tensors.update(opt_t)
        extra = {"opt_groups": groups}
        if disc is not None:
            tensors.update(ckpt.prefixed("disc", disc.state_dict()))
            od_t, od_groups = ckpt.optimizer_to_tensors(opt_d, "opt_disc")
            tensors.update(od_t)
            extra["disc_opt_groups"] = od_groups
        extra["scaler"] = scaler.state_dict()
        ckpt.save_checkpoint(stage_dir / ckpt.checkpoint_name(step), tensors, step=step, stage="vqvae",
                             config_toml=to_toml(cfg), extra=extra)

    def save(step, final=False):
        if d.is_main:
            guarded_save(write, step, final, stage_dir, r.keep_last)

    params = list(model.parameters())
    bar = tqdm(total=v.steps, initial=start, desc="vqvae", disable=not d.is_main, dynamic_ncols=True)
    win = Window(d.device)
    for step in range(start, v.steps):
        x = fetch(images, batch_indices(step, len(images), v.batch_size, d, r.seed), d.device, cfg.perf.channels_last)
        loss, grad_norm, xrec = vqvae_update(x, step, forward, model, loss_fn, opt, opt_d, scaler, params, amp)
        win.add(loss, grad_norm, v.batch_size)
        done = step + 1
        if d.is_main and (done % r.image_every == 0 or (done == v.steps and r.image_every <= v.steps)):
            with torch.no_grad():
                save_grid(torch.cat([x[:8], xrec[:8].float()]), stage_dir / f"recon_{done:08d}.png", nrow=8, scale=2)
        if end_of_step(done, v.steps, r, d, win, opt, stage_dir, bar, stop, save):
            return True
    bar.close()
    dist.barrier()
    return False


# ---------------------------------------------------------------------------------------------
# stage 2: concept encoder + latent U-Net


@torch.no_grad()
def encode_latents(vq, images, d, batch, amp):
    """Pre-quantisation latents of the whole dataset, computed once: each rank encodes a slice,
    then all ranks gather the full (N, C, h, w) tensor."""
    n = len(images)
    per_rank = math.ceil(n / d.world_size)
    lo, hi = d.rank * per_rank, min(n, (d.rank + 1) * per_rank)
    chunks = []
    for s in tqdm(range(lo, hi, batch), desc="latents", disable=not d.is_main, dynamic_ncols=True):
        idx = torch.arange(s, min(hi, s + batch))
        with amp:
            chunks.append(vq.encode(fetch(images, idx, d.device, False)).float())
    z = torch.cat(chunks) if chunks else torch.empty(0)
    if not d.enabled:
        return z
    pad = per_rank - z.shape[0]
    z = torch.cat([z, z.new_zeros(pad, *z.shape[1:])]) if pad else z
    gathered = [torch.empty_like(z) for _ in range(d.world_size)]
    torch.distributed.all_gather(gathered, z)
    return torch.cat(gathered)[:n]  # (N, C, h, w)


def train_encdiff(cfg, d, images, out_dir, stop, factor_sizes=None):
    e, r = cfg.encdiff, cfg.run
    stage_dir = out_dir / "encdiff"
    stage_dir.mkdir(parents=True, exist_ok=True)
    amp, prec = autocast(cfg, d.device)
    scaler = make_scaler(prec, d.device)
    vq, vq_path = load_vq_for_stage2(cfg, out_dir, d.device)

    torch.manual_seed(r.seed)  # the same initial weights on every rank and in every run
    encoder = build_encoder(e)
    unet = build_unet(e, cfg.vqvae.embed_dim, cfg.perf.attention)
    model = EncDiff(encoder, unet, build_diffusion(e), e.loss).to(d.device)
    if d.enabled:
        model.encoder = convert_to_global_bn(model.encoder)  # BN statistics over the global batch
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = e.lr * e.batch_size / e.lr_ref_batch  # linear scaling with the global batch
    opt = make_optimizer(torch.optim.AdamW, model.parameters(), lr, e.betas, d.device, cfg.perf.fused_adam, weight_decay=e.weight_decay)
    ema_src = model if e.ema_all else model.unet
    ema = {k: v.detach().clone().float() for k, v in ema_src.state_dict().items()}
    noise_gen = torch.Generator(device=d.device).manual_seed(r.seed)  # same on every rank: draws for the global batch

    start, scale = 0, None
    found = find_resume(stage_dir, cfg, "encdiff", d)
    if found is not None:
        path, tensors, meta = found
        start = int(meta["step"])
        load_state(model.encoder, tensors, "encoder", path)
        load_state(model.unet, tensors, "unet", path)
        ckpt.optimizer_from_tensors(opt, "opt", tensors, meta["opt_groups"])
        ema = {k: t.to(d.device) for k, t in ckpt.unprefixed("ema", tensors).items()}
        noise_gen.set_state(tensors["rng.noise"].cpu())
        scale = tensors["scale_factor"].to(d.device)
        if "scaler" in meta:
            scaler.load_state_dict(json.loads(meta["scaler"]))
    if start >= e.steps:
        dist.print0(f"encdiff: finished already (step {start}), skipped")
        return False
    dist.print0(f"encdiff: encoder {count_params(model.encoder):,} + U-Net {count_params(model.unet):,} parameters, "
                f"steps {start} -> {e.steps}, global batch {e.batch_size}, lr {lr:.3g}, VQ from {vq_path}")
    if d.is_main:
        check_disk_space(stage_dir, [model, vq], copies=4)
        (stage_dir / "config.toml").write_text(to_toml(cfg))

    latents = encode_latents(vq, images, d, cfg.eval.batch_size, amp) if cfg.perf.cache_latents else None

    def latents_of(idx, x):
        if latents is not None:
            return latents.index_select(0, idx.to(latents.device)).to(d.device)
        with torch.no_grad(), amp:
            return vq.encode(x).float()

    if scale is None:
        # 1/std of the latent, measured once on the first global batch (as LDM does) and stored
        first = torch.cat([batch_indices(0, len(images), e.batch_size, dist.Dist(k, 0, d.world_size, d.device), r.seed)
                           for k in range(d.world_size)])
        z_first = latents_of(first, fetch(images, first, d.device, False))
        scale = 1.0 / z_first.float().std()
        dist.print0(f"encdiff: latent scale factor {scale.item():.4f}")

    ddp = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, static_graph=True,
              gradient_as_bucket_view=True, **NO_BUFFER_SYNC) if d.enabled else model
    forward = compile_model(ddp, cfg.perf.compile)
    reseed(r.seed, d.rank, start)
    params = [p for p in model.parameters()]
    ema_params = [ema[k] for k, _ in ema_src.named_parameters()]
    src_params = [p for _, p in ema_src.named_parameters()]

    def write(step):
        tensors = {**ckpt.prefixed("encoder", model.encoder.state_dict()), **ckpt.prefixed("unet", model.unet.state_dict()),
                   **ckpt.prefixed("ema", ema), **ckpt.prefixed("vq", vq.state_dict())}
        opt_t, groups = ckpt.optimizer_to_tensors(opt, "opt")
        tensors.update(opt_t)
        tensors["rng.noise"] = noise_gen.get_state().clone()
        tensors["scale_factor"] = scale.detach().float().cpu().reshape(())
        ckpt.save_checkpoint(stage_dir / ckpt.checkpoint_name(step), tensors, step=step, stage="encdiff",
                             config_toml=to_toml(cfg), extra={"opt_groups": groups, "vq_source": str(vq_path),
                                                              "scaler": scaler.state_dict(),
                                                              **({"factor_sizes": list(factor_sizes)} if factor_sizes else {})})

    def save(step, final=False):
        if d.is_main:
            guarded_save(write, step, final, stage_dir, r.keep_last)

    bar = tqdm(total=e.steps, initial=start, desc="encdiff", disable=not d.is_main, dynamic_ncols=True)
    win = Window(d.device)
    local = e.batch_size // d.world_size
    for step in range(start, e.steps):
        idx = batch_indices(step, len(images), e.batch_size, d, r.seed)
        x = fetch(images, idx, d.device, cfg.perf.channels_last)
        z0 = latents_of(idx, x) * scale
        # t and noise are drawn for the whole global batch and sliced, so N ranks = 1 rank
        t = model.diffusion.sample_timesteps(e.batch_size, noise_gen, d.device)[d.rank * local:(d.rank + 1) * local]
        noise = torch.randn((e.batch_size, *z0.shape[1:]), device=d.device, generator=noise_gen)[d.rank * local:(d.rank + 1) * local]
        if cfg.perf.channels_last:
            z0, noise = z0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, e.warmup_steps)
        loss, grad_norm = encdiff_update((x, z0, t, noise), step, forward, opt, scaler, params, ema_params, src_params,
                                         e.ema_decay, amp)
        win.add(loss, grad_norm, e.batch_size)
        done = step + 1
        if d.is_main and (done % r.image_every == 0 or (done == e.steps and r.image_every <= e.steps)):
            save_samples(model, vq, ema, ema_src, x[:8], scale, cfg, stage_dir / f"samples_{done:08d}.png", amp)
        if end_of_step(done, e.steps, r, d, win, opt, stage_dir, bar, stop, save):
            return True
    bar.close()
    dist.barrier()
    return False


@torch.no_grad()
def save_samples(model, vq, ema, ema_src, x, scale, cfg, path, amp):
    """input | VQ reconstruction | DDIM sample from the EMA U-Net conditioned on the image's tokens."""
    import copy

    was_training = model.training
    model.eval()
    sampler = copy.deepcopy(model)
    (sampler if ema_src is model else sampler.unet).load_state_dict(ema, strict=False)
    z = vq.encode(x.float())
    with amp:
        _, tokens = sampler.encoder(x)
        z_s = sampler.diffusion.ddim_sample(sampler.unet, z.shape, tokens, steps=min(50, cfg.eval.ddim_steps), eta=1.0)
    sample = vq.decode(z_s.float() / scale)
    save_grid(torch.cat([x, vq.decode(z), sample]).float(), path, nrow=x.shape[0], scale=2)
    model.train(was_training)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)  # every config mistake stops here
    d = dist.setup(cfg.run.device, cfg.run.init_timeout)
    for name in ("vqvae", "encdiff"):
        if getattr(cfg, name).batch_size % d.world_size:
            raise UserError(f"{name}.batch_size = {getattr(cfg, name).batch_size} is not divisible by the world size {d.world_size}")
    if d.device.type == "cuda":  # set both ways: cuDNN allows TF32 unless told otherwise
        torch.backends.cuda.matmul.allow_tf32 = cfg.perf.tf32
        torch.backends.cudnn.allow_tf32 = cfg.perf.tf32
    out_dir = Path(cfg.run.out_dir)
    if d.is_main:
        check_output_dir(out_dir)
        (out_dir / "config.toml").write_text(to_toml(cfg))
    if cfg.vqvae.ckpt and not Path(cfg.vqvae.ckpt).is_file():
        raise UserError(f"vqvae.ckpt: file not found: {cfg.vqvae.ckpt}")
    ds, images = open_data(cfg, d)
    dist.print0(f"data: {cfg.data.name} {cfg.data.path}, {len(images):,} images, world size {d.world_size}, device {d.device}")
    for name in ("vqvae", "encdiff"):
        if len(images) < getattr(cfg, name).batch_size:
            raise UserError(f"{name}.batch_size = {getattr(cfg, name).batch_size} is larger than the dataset ({len(images)} images)")

    stop = StopSignal(cfg.run.stop_signals)
    stopped = False
    if "vqvae" in cfg.run.stages and not cfg.vqvae.ckpt:
        stopped = train_vqvae(cfg, d, images, out_dir, stop)
    if "encdiff" in cfg.run.stages and not stopped:
        stopped = train_encdiff(cfg, d, images, out_dir, stop, getattr(ds, "factor_sizes", None))
    dist.print0(f"{'stopped' if stopped else 'done'}: {out_dir}")
    dist.cleanup()


def run():
    try:
        exit_on_user_error(main)
    except Halt as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
