"""Before any long work: what this command will train, about how long it takes on a CPU (from a few
timed steps), and whether the attention backend asked for can run here.

    announce_plan(cfg, d)              # prints the plan; on a CPU refuses a run over run.max_hours
    attention_refusal(cfg, device)     # why perf.attention cannot run here, or None
"""

import copy
import math
import time
from pathlib import Path

import torch

import kernels
from encdiff import ckpt_files as ckpt
from encdiff import dist, runtime
from encdiff.errors import UserError
from encdiff.models.encdiff import latent_side
from encdiff.models.unet import attention_sites, layer_backend
from encdiff.steps import build_step


def attention_refusal(cfg, device):
    """Why perf.attention cannot run the U-Net's attention on this device, or None: asked, before any
    work, with tensors of each attention call the U-Net makes (layer_backend says which layers a
    backend serves)."""
    e, backend = cfg.encdiff, cfg.perf.attention
    dtype = runtime.LOW_DTYPES.get(runtime.precision(cfg.perf.precision, device), torch.float32)
    side = latent_side(cfg.vqvae)
    for queries, keys, width, is_cross in attention_sites(
        e.model_channels, e.channel_mult, e.attention_levels, e.num_tokens, side
    ):
        layer = layer_backend(backend, is_cross)
        if layer == "auto":
            continue
        q = torch.zeros(1, queries, width, device=device, dtype=dtype)  # (B, Lq, C)
        k = torch.zeros(1, keys, width, device=device, dtype=dtype)  # (B, Lk, C)
        reason = kernels.available_backends(q, k, k, e.num_heads)[layer]
        if reason is not None:
            return reason
    return None


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


PLAN_MIN_STEPS = 1000  # shorter runs start at once: timing them would cost more than it tells


def stages_to_train(cfg):
    """{stage: steps left} of the stages this command trains: a stage whose newest checkpoint (by its
    name) is at its last step has none left and is not listed."""
    todo = {}
    for s in cfg.run.stages:
        if s == "vqvae" and (cfg.vqvae.ckpt or cfg.vqvae.kind == "pool"):
            continue
        steps, done = getattr(cfg, s).steps, ckpt.newest_step(Path(cfg.run.out_dir) / s)
        if done < steps:
            todo[s] = steps - done
    return todo


def announce_plan(cfg, d):
    """Say what the run will do and, on a CPU, about how long from a few timed steps (before any long
    work); a run that would take longer than run.max_hours there stops with the reason."""
    todo = stages_to_train(cfg)
    if not todo:
        dist.print0(f"plan: every stage of {cfg.run.out_dir} has finished; nothing to train")
        return
    what = ", ".join(
        f"{s} {left:,}{'' if left == getattr(cfg, s).steps else f' of {getattr(cfg, s).steps:,}'} steps "
        f"at batch {getattr(cfg, s).batch_size}"
        for s, left in todo.items()
    )
    dist.print0(f"plan: {what} on {d.world_size} x {d.device.type}")
    if d.device.type != "cpu" or sum(todo.values()) < PLAN_MIN_STEPS:
        return
    dist.print0("plan: timing a few steps of each stage on this CPU ...")
    hours = sum(seconds_per_image(s, cfg, d) * n * getattr(cfg, s).batch_size / d.world_size for s, n in todo.items())
    hours /= 3600
    threads = torch.get_num_threads()
    how_long = f"{hours * 60:.0f} minutes" if hours < 2 else f"{hours:,.1f} hours"
    dist.print0(f"plan: about {how_long} on this CPU ({threads} thread{'s' if threads > 1 else ''}; from timed steps)")
    if cfg.run.max_hours and hours > cfg.run.max_hours:
        raise UserError(
            f"this run would take about {hours:,.0f} hours on this CPU (run.max_hours = "
            f"{cfg.run.max_hours:g}); config.toml is the GPU recipe: for a CPU add --config configs/cpu.toml "
            f"(about 20 minutes), or raise run.max_hours to run it anyway"
        )
