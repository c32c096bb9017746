"""Checkpoint contents: what a stage's checkpoint holds, written and read in one place (the files
themselves are encdiff/ckpt_files.py's).

    save_vq(path, step, vq_step, cfg)                 # stage 1, during training
    load_vq_training(vq_step, tensors, meta)          # resume stage 1
    vq, path = frozen_vq(cfg, out_dir, device)         # stage 2's frozen first stage
    save_encdiff(path, step, enc_step, cfg, vq_source, factor_sizes)
    load_encdiff_training(enc_step, tensors, meta)    # resume stage 2
    save_training / load_training(step, found)        # either stage; found = find_resume(...)
    trained = load_trained(path_or_run_dir, files, overrides)   # evaluation: the EMA models
    trained = trained_from_step(enc_step)             # the same, from a training step (pictures)

Layout of a stage-1 file: `model.*` (the autoencoder), `opt.*` (Adam), `disc.*` and `opt_disc.*`
(with vqvae.use_gan), `guard.*` (the non-finite guard's loss scale). A stage-2 file: `encoder.*`,
`unet.*` (live weights), `ema.*` (the EMA of the U-Net's parameters, or of every EncDiff parameter
with encdiff.ema_all, named as in that module), `vq.*` (the frozen first stage, so the file is
self-contained), `opt.*`, `guard.*`, `rng.noise` (the t/noise generator) and `scale_factor`. The
metadata of both: step, stage, the resolved config (which builds the models back), the optimisers'
param groups, `wall_s` (seconds of training so far), and for stage 2 `vq_source` and `factor_sizes`.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from encdiff import ckpt_files as ckpt
from encdiff import config as config_lib
from encdiff import dist, runtime
from encdiff.errors import UserError
from encdiff.images import IMAGE_SHAPE
from encdiff.models.encdiff import build_diffusion, build_encoder, build_unet, build_vq


def load_weights(module, state, what, path):
    """module.load_state_dict(state), a mismatch being one line that names the file."""
    if not state and module.state_dict():  # a parameter-free module (kind "pool") stores nothing
        raise UserError(f"{path}: no {what}.* tensors (not a checkpoint of this stage)")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: the {what} weights do not fit the model of the stored config: {detail}") from None


def _stored_config(meta, path):
    return config_lib.from_toml_text(meta["config"], f"{path} (stored config)")


def _guard_tensors(guard):
    return ckpt.prefixed("guard", guard.state())


def _load_guard(guard, tensors):
    for name, t in ckpt.unprefixed("guard", tensors).items():
        guard.state()[name].copy_(t)


# ---------------------------------------------------------------------------------------------
# stage 1


def save_vq(path, step, st, cfg, wall_s=0.0):
    """The stage-1 checkpoint of VQStep `st` after `step` updates, `wall_s` seconds of training."""
    tensors = ckpt.prefixed("model", st.model.state_dict())
    opt_t, groups = ckpt.optimizer_to_tensors(st.opt, "opt")
    tensors.update(opt_t)
    tensors.update(_guard_tensors(st.guard))
    extra = {"opt_groups": groups, "wall_s": round(wall_s, 2)}
    if st.disc is not None:
        tensors.update(ckpt.prefixed("disc", st.disc.state_dict()))
        od_t, od_groups = ckpt.optimizer_to_tensors(st.opt_d, "opt_disc")
        tensors.update(od_t)
        extra["disc_opt_groups"] = od_groups
    ckpt.save_checkpoint(path, tensors, step=step, stage="vqvae", config_toml=config_lib.to_toml(cfg), extra=extra)


def save_fixed_vq(path, step, cfg):
    """vqvae.kind = 'pool' has nothing to train: one empty checkpoint, so that stage 2 finds it as usual."""
    ckpt.save_checkpoint(path, {}, step=step, stage="vqvae", config_toml=config_lib.to_toml(cfg))


def load_vq_training(st, tensors, meta, path):
    """Resume VQStep `st` from a stage-1 checkpoint; -> its step."""
    load_weights(st.model, ckpt.unprefixed("model", tensors), "model", path)
    ckpt.optimizer_from_tensors(st.opt, "opt", tensors, meta["opt_groups"])
    if st.disc is not None and "disc_opt_groups" in meta:
        load_weights(st.disc, ckpt.unprefixed("disc", tensors), "disc", path)
        ckpt.optimizer_from_tensors(st.opt_d, "opt_disc", tensors, meta["disc_opt_groups"])
    _load_guard(st.guard, tensors)
    return int(meta["step"])


def check_given_vq(cfg):
    """vqvae.ckpt, from its metadata alone (before any long work): a stage-1 checkpoint of this VQ."""
    path = Path(cfg.vqvae.ckpt)
    if not path.is_file():
        raise UserError(f"vqvae.ckpt: file not found: {path}")
    _check_vq_meta(path, ckpt.checkpoint_metadata(path), cfg)


def _check_vq_meta(path, meta, cfg):
    if meta["stage"] != "vqvae":
        raise UserError(
            f"{path}: a stage-2 ({meta['stage']}) checkpoint; vqvae.ckpt needs a stage-1 (vqvae) "
            f"checkpoint, ckpt_*.safetensors in a run's vqvae/ folder"
        )
    config_lib.check_same_vq(_stored_config(meta, path), cfg, path)


def frozen_vq(cfg, out_dir, device):
    """Stage 2's first stage, frozen: from vqvae.ckpt if given, else the newest of out_dir/vqvae.
    -> (vq in eval mode without gradients, its path)."""
    if cfg.vqvae.ckpt:
        path = Path(cfg.vqvae.ckpt)
        tensors, meta = ckpt.load_checkpoint(path)
    else:
        found = ckpt.latest_good_checkpoint(Path(out_dir) / "vqvae")
        if found is None:
            raise UserError(
                f"no VQ checkpoint in {Path(out_dir) / 'vqvae'}: run the vqvae stage first or set vqvae.ckpt"
            )
        path, tensors, meta = found
    _check_vq_meta(path, meta, cfg)
    vq = build_vq(cfg.vqvae)
    load_weights(vq, ckpt.unprefixed("model", tensors), "model", path)
    return vq.to(device).eval().requires_grad_(False), path


# ---------------------------------------------------------------------------------------------
# stage 2


def save_encdiff(path, step, st, cfg, vq_source, factor_sizes=None, wall_s=0.0):
    """The stage-2 checkpoint of EncDiffStep `st` after `step` updates, `wall_s` seconds of training."""
    model = st.model
    tensors = {
        **ckpt.prefixed("encoder", model.encoder.state_dict()),
        **ckpt.prefixed("unet", model.unet.state_dict()),
        **ckpt.prefixed("ema", st.ema.state_dict()),
        **ckpt.prefixed("vq", st.vq.state_dict()),
        **_guard_tensors(st.guard),
    }
    opt_t, groups = ckpt.optimizer_to_tensors(st.opt, "opt")
    tensors.update(opt_t)
    tensors["rng.noise"] = st.noise_gen.get_state().clone()
    tensors["scale_factor"] = st.scale.detach().float().cpu().reshape(())
    extra = {"opt_groups": groups, "vq_source": str(vq_source), "wall_s": round(wall_s, 2)}
    if factor_sizes:
        extra["factor_sizes"] = [int(s) for s in factor_sizes]
    ckpt.save_checkpoint(path, tensors, step=step, stage="encdiff", config_toml=config_lib.to_toml(cfg), extra=extra)


def load_encdiff_training(st, tensors, meta, path):
    """Resume EncDiffStep `st` from a stage-2 checkpoint (before st.prepare); -> its step."""
    load_weights(st.model.encoder, ckpt.unprefixed("encoder", tensors), "encoder", path)
    load_weights(st.model.unet, ckpt.unprefixed("unet", tensors), "unet", path)
    ckpt.optimizer_from_tensors(st.opt, "opt", tensors, meta["opt_groups"])
    st.ema.load_state_dict({k: t.to(st.d.device) for k, t in ckpt.unprefixed("ema", tensors).items()})
    st.noise_gen.set_state(tensors["rng.noise"].cpu())
    st.scale = tensors["scale_factor"].to(st.d.device)
    _load_guard(st.guard, tensors)
    return int(meta["step"])


# ---------------------------------------------------------------------------------------------
# either stage


def save_training(path, step, st, cfg, wall_s=0.0):
    """The checkpoint of a stage's step (VQStep or EncDiffStep) after `step` updates."""
    if st.stage == "vqvae":
        save_vq(path, step, st, cfg, wall_s)
    else:
        save_encdiff(path, step, st, cfg, st.vq_source, st.factor_sizes, wall_s)


def load_training(st, found):
    """Resume a stage's step from find_resume's (path, tensors, meta); -> its step."""
    path, tensors, meta = found
    load = load_vq_training if st.stage == "vqvae" else load_encdiff_training
    return load(st, tensors, meta, path)


def checkpoint_bytes(st):
    """About the size of a stage's checkpoint: its fp32 weights, the optimiser's two moments, and in
    stage 2 the EMA and the frozen first stage too."""
    if st.stage == "vqvae":
        modules, copies = [st.model] + ([st.disc] if st.disc is not None else []), 3
    else:
        modules, copies = [st.model, st.vq], 4
    return copies * sum(p.numel() * 4 for m in modules for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# a trained EncDiff, for evaluation and pictures


@dataclass
class Trained:
    """A trained EncDiff ready to encode and sample: every module in eval mode on `device`."""

    cfg: object  # Config used now (stored < files < overrides; the model tables stored)
    vq: torch.nn.Module
    encoder: torch.nn.Module  # the trained concept encoder (EMA parameters when the run kept them)
    unet: torch.nn.Module  # the EMA U-Net, used for sampling only
    diffusion: torch.nn.Module
    scale: float  # latent z is multiplied by it before diffusion
    device: torch.device
    amp: object  # autocast context (reusable)
    path: Path = None  # the checkpoint file
    step: int = 0
    stored: object = None  # Config the checkpoint was trained with
    meta: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)  # model keys that files or overrides tried to change

    @property
    def latent_shape(self):
        side = IMAGE_SHAPE[0] // self.vq.downsample
        return (self.cfg.vqvae.embed_dim, side, side)

    @property
    def channels_last(self):
        return self.cfg.perf.channels_last and self.device.type == "cuda"


def with_ema_parameters(module, live, ema):
    """`live` state with every parameter that `ema` holds replaced by its EMA. Buffers (BatchNorm
    statistics) stay live: the trainer averages parameters only, as LDM's LitEma does."""
    state = dict(live)
    for name, _ in module.named_parameters():
        if name in ema:
            state[name] = ema[name]
    return state


def load_trained(path, files=(), overrides=()):
    """Checkpoint file or run directory (its newest good stage-2 checkpoint) -> Trained, built from
    the stored config, then files, then overrides; [vqvae] and [encdiff] always the stored ones."""
    ckpt_path, tensors, meta = ckpt.load_stage_checkpoint(path, "encdiff")
    if meta["stage"] != "encdiff":
        raise UserError(f"{ckpt_path}: a {meta['stage']} checkpoint; evaluate needs an EncDiff (stage 2) checkpoint")
    if "scale_factor" not in tensors:
        raise UserError(f"{ckpt_path}: not an EncDiff checkpoint (no scale_factor tensor)")
    stored = _stored_config(meta, ckpt_path)
    cfg = config_lib.build_config(files, overrides, base=stored)
    ignored = config_lib.keep_model_tables(cfg, stored)
    device = runtime.pick_device(cfg.run.device)

    vq = build_vq(cfg.vqvae)
    load_weights(vq, ckpt.unprefixed("vq", tensors), "vq", ckpt_path)
    encoder = build_encoder(cfg.encdiff)
    unet = build_unet(cfg.encdiff, latent_channels=cfg.vqvae.embed_dim, attn_backend=cfg.perf.attention)
    ema = ckpt.unprefixed("ema", tensors)
    # with encdiff.ema_all the EMA is the whole EncDiff module's (encoder.*, unet.*); else the U-Net's
    ema_unet, ema_encoder = (
        (ckpt.unprefixed("unet", ema), ckpt.unprefixed("encoder", ema)) if stored.encdiff.ema_all else (ema, {})
    )
    live_encoder, live_unet = ckpt.unprefixed("encoder", tensors), ckpt.unprefixed("unet", tensors)
    load_weights(
        encoder, with_ema_parameters(encoder, live_encoder, ema_encoder) if live_encoder else {}, "encoder", ckpt_path
    )
    load_weights(unet, with_ema_parameters(unet, live_unet, ema_unet) if live_unet else {}, "unet", ckpt_path)

    vq, encoder, unet = (m.to(device).eval().requires_grad_(False) for m in (vq, encoder, unet))
    if cfg.perf.channels_last and device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    return Trained(
        cfg=cfg,
        vq=vq,
        encoder=encoder,
        unet=unet,
        diffusion=build_diffusion(cfg.encdiff).to(device),
        scale=float(tensors["scale_factor"]),
        device=device,
        amp=runtime.autocast(runtime.precision(cfg.perf.precision, device), device),
        path=ckpt_path,
        step=int(meta["step"]),
        stored=stored,
        meta=meta,
        ignored=ignored,
    )


def trained_from_step(st):
    """What load_trained would give from EncDiffStep `st`'s checkpoint now (copies in eval mode)."""
    model = copy.deepcopy(st.model).eval().requires_grad_(False)
    ema_module = model if st.ema_module is st.model else model.unet
    ema_module.load_state_dict({**ema_module.state_dict(), **st.ema.state_dict()})
    return Trained(
        cfg=st.cfg,
        vq=st.vq,
        encoder=model.encoder,
        unet=model.unet,
        diffusion=model.diffusion,
        scale=float(st.scale),
        device=st.d.device,
        amp=st.amp,
    )


def find_resume(stage_dir, cfg, stage, d):
    """The checkpoint a stage resumes from: (path, tensors, meta) of the newest good one, or None;
    run.resume = "never" with checkpoints there, a changed key the stage fixes, or ranks that would
    resume from different steps (a run directory not shared by every node) is one clear error."""
    if cfg.run.resume == "never":
        if ckpt.list_checkpoints(stage_dir):
            raise UserError(f"{stage_dir} already holds checkpoints and run.resume = 'never': use a new run.out_dir")
        return None
    found = ckpt.latest_good_checkpoint(stage_dir)
    if found is not None:
        path, _, meta = found
        config_lib.check_resumable(_stored_config(meta, path), cfg, stage, path)
    # every rank must resume from the same step: on several nodes run.out_dir must be a shared disk
    mine = int(found[2]["step"]) if found is not None else 0
    first = dist.broadcast_object(mine)
    if mine != first:
        raise UserError(
            f"rank {d.rank} would resume {stage} from step {mine} but rank 0 from step {first}: "
            f"run.out_dir must be on a disk shared by every node"
        )
    return found
