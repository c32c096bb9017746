"""What a stage's checkpoint holds, written and read in one place.

    save_vq(path, step, vq_step, cfg)                 # stage 1, during training
    load_vq_training(vq_step, tensors, meta)          # resume stage 1
    vq, path = frozen_vq(cfg, out_dir, device)         # stage 2's frozen first stage
    save_encdiff(path, step, enc_step, cfg, vq_source, factor_sizes)
    load_encdiff_training(enc_step, tensors, meta)    # resume stage 2

The files themselves (safetensors, checksum, atomic writes, keep-last-K) are encdiff/checkpoint.py's.
Layout of a stage-1 file: `model.*` (the autoencoder), `opt.*` (Adam), `disc.*` and `opt_disc.*`
(with vqvae.use_gan), `guard.*` (the non-finite guard's loss scale). A stage-2 file: `encoder.*`,
`unet.*` (live weights), `ema.*` (the EMA of the U-Net's parameters, or of every EncDiff parameter
with encdiff.ema_all, named as in that module), `vq.*` (the frozen first stage, so the file is
self-contained), `opt.*`, `guard.*`, `rng.noise` (the t/noise generator) and `scale_factor`. The
metadata of both: step, stage, the resolved config (which builds the models back), the optimisers'
param groups, and for stage 2 `vq_source` and `factor_sizes`.
"""
from pathlib import Path

from encdiff import checkpoint as ckpt
from encdiff import config as config_lib
from encdiff.errors import UserError
from encdiff.models.encdiff import build_vq


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


def save_vq(path, step, st, cfg):
    """The stage-1 checkpoint of VQStep `st` after `step` updates."""
    tensors = ckpt.prefixed("model", st.model.state_dict())
    opt_t, groups = ckpt.optimizer_to_tensors(st.opt, "opt")
    tensors.update(opt_t)
    tensors.update(_guard_tensors(st.guard))
    extra = {"opt_groups": groups}
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


def frozen_vq(cfg, out_dir, device):
    """Stage 2's first stage, frozen: from vqvae.ckpt if given, else the newest of out_dir/vqvae.
    -> (vq in eval mode without gradients, its path)."""
    if cfg.vqvae.ckpt:
        path = Path(cfg.vqvae.ckpt)
        tensors, meta = ckpt.load_checkpoint(path)
    else:
        found = ckpt.latest_good_checkpoint(Path(out_dir) / "vqvae")
        if found is None:
            raise UserError(f"no VQ checkpoint in {Path(out_dir) / 'vqvae'}: run the vqvae stage first or set vqvae.ckpt")
        path, tensors, meta = found
    if meta["stage"] != "vqvae":
        raise UserError(f"{path}: a {meta['stage']} (stage 2) checkpoint; vqvae.ckpt needs a stage-1 (vqvae) "
                        f"checkpoint, ckpt_*.safetensors in a run's vqvae/ folder")
    config_lib.check_same_vq(_stored_config(meta, path), cfg, path)
    vq = build_vq(cfg.vqvae)
    load_weights(vq, ckpt.unprefixed("model", tensors), "model", path)
    return vq.to(device).eval().requires_grad_(False), path


# ---------------------------------------------------------------------------------------------
# stage 2


def save_encdiff(path, step, st, cfg, vq_source, factor_sizes=None):
    """The stage-2 checkpoint of EncDiffStep `st` after `step` updates."""
    model = st.model
    tensors = {**ckpt.prefixed("encoder", model.encoder.state_dict()), **ckpt.prefixed("unet", model.unet.state_dict()),
               **ckpt.prefixed("ema", st.ema.state_dict()), **ckpt.prefixed("vq", st.vq.state_dict()),
               **_guard_tensors(st.guard)}
    opt_t, groups = ckpt.optimizer_to_tensors(st.opt, "opt")
    tensors.update(opt_t)
    tensors["rng.noise"] = st.noise_gen.get_state().clone()
    tensors["scale_factor"] = st.scale.detach().float().cpu().reshape(())
    extra = {"opt_groups": groups, "vq_source": str(vq_source)}
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
