"""Evaluation of a trained EncDiff: load a checkpoint, encode a dataset, tabulate metrics, draw pictures.

    trained = load_trained("runs/synth3d", overrides=[("data.path", "/fast/synth3d.h5")])
    ds = open_eval_dataset(trained)
    keep = picture_indices(4, len(ds), seed=0)
    codes, kept = encode_dataset(trained.encoder, ds, 1024, trained.device, trained.amp, keep=keep)
    print(format_table(compute_all(codes, ds.factor_sizes), None, ds.name))
    save_pictures(trained, kept, codes, "out/", quick=True, seed=0)
    scores = score_codes(codes, ds, None, seed=0, quick=True)   # factor metrics, or TAD for CelebA
    fid = fid_of_samples(trained, ds, load_inception("pt_inception.pth"), 1000, steps=50, seed=0, batch_size=250)

evaluate.py is the command line around these; they are here so tests and notebooks can reuse them.
"""
import dataclasses
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from encdiff import config as config_lib
from encdiff.checkpoint import load_checkpoint, resolve_checkpoint, unprefixed
from encdiff.config import from_toml_text
from encdiff.data import open_dataset
from encdiff.data.formats import FACTORS
from encdiff.data.synth import GRIDS as SYNTH3D_GRIDS
from encdiff.errors import UserError
from encdiff.fid import fid_from_features, inception_features
from encdiff.images import grid, save_png, to_uint8, uint8_to_model
from encdiff.metrics import compute_all, tad
from encdiff.models.encdiff import build_diffusion, build_encoder, build_unet, build_vq
from encdiff.models.unet import record_cross_attention

IMAGE_SHAPE = (64, 64, 3)

# Paper Table 1, EncDiff row (DESIGN section 3): the FactorVAE score is disentanglement_lib's
# eval_accuracy, "DCI" its disentanglement.
PAPER_ENCDIFF = {
    "shapes3d": ("Shapes3D", {("factor_vae", "eval_accuracy"): 0.999, ("dci", "disentanglement"): 0.969}),
    "mpi3d": ("MPI3D", {("factor_vae", "eval_accuracy"): 0.872, ("dci", "disentanglement"): 0.685}),
    "cars3d": ("Cars3D", {("factor_vae", "eval_accuracy"): 0.773, ("dci", "disentanglement"): 0.279}),
    "celeba": ("CelebA", {("tad", "tad"): 0.638}),  # the paper's TAD table (NashAE's metric)
}
TAD_QUICK_SAMPLES = 5000  # --quick scores TAD on this many random rows


# ---------------------------------------------------------------------------------------------
# config, device, checkpoint


def layered_config(stored_text, files=(), overrides=(), where="stored config"):
    """The checkpoint's resolved config, then --config files, then --section.key=value overrides
    (build_config's layering, with the stored config in place of the defaults)."""
    cfg = from_toml_text(stored_text, where)
    sources = {}
    for f in files:
        config_lib.load_file(cfg, f, sources)
    for dotted, raw in overrides:
        if dotted.count(".") != 1:
            raise UserError(f"command line: override --{dotted} must look like --section.key=value")
        table, key = dotted.split(".")
        config_lib._apply(cfg, table, key, raw, "command line", from_cli=True, sources=sources)
    config_lib.validate(cfg, sources)
    return cfg


def pick_device(choice):
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but CUDA is not available here (use --run.device=cpu)")
    return torch.device("cuda")


def autocast_for(precision, device):
    """bf16 autocast on CUDA unless perf.precision says otherwise; fp32 on the CPU by default."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def with_ema_parameters(module, live, ema):
    """`live` state with every parameter that `ema` holds replaced by its EMA. Buffers (BatchNorm
    statistics) stay live: the trainer averages parameters only, as LDM's LitEma does."""
    state = dict(live)
    for name, _ in module.named_parameters():
        if name in ema:
            state[name] = ema[name]
    return state


def load_weights(module, state, what, path):
    if not state and module.state_dict():  # a parameter-free module (kind "pool") stores nothing
        raise UserError(f"{path}: not an EncDiff checkpoint (no {what}.* tensors)")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: the {what} weights do not fit the model of the stored config: {detail}") from None


def keep_stored_model_tables(cfg, stored):
    """The weights define the model: [vqvae] and [encdiff] always come from the stored config (a
    `--config config.toml` would otherwise turn a small run's model into the default one).
    Returns the keys whose other values were ignored."""
    ignored = []
    for table in ("vqvae", "encdiff"):
        now, then = getattr(cfg, table), getattr(stored, table)
        ignored += [f"{table}.{f.name}" for f in dataclasses.fields(now) if getattr(now, f.name) != getattr(then, f.name)]
        setattr(cfg, table, then)
    return ignored


@dataclass
class Trained:
    """A trained EncDiff ready for evaluation: every module in eval mode on `device`."""

    path: Path  # the checkpoint file
    step: int
    cfg: object  # Config used now (stored < files < overrides; the model tables stored)
    stored: object  # Config the checkpoint was trained with
    meta: dict
    ignored: list  # model keys that files or overrides tried to change
    vq: torch.nn.Module
    encoder: torch.nn.Module  # the trained concept encoder (EMA parameters when the run kept them)
    unet: torch.nn.Module  # the EMA U-Net, used for sampling only
    diffusion: torch.nn.Module
    scale: float  # latent z is multiplied by it before diffusion
    device: torch.device
    amp: object  # autocast context (reusable)

    @property
    def latent_shape(self):
        side = IMAGE_SHAPE[0] // self.vq.downsample
        return (self.cfg.vqvae.embed_dim, side, side)

    @property
    def channels_last(self):
        return self.cfg.perf.channels_last and self.device.type == "cuda"


def load_trained(path, files=(), overrides=()):
    """Checkpoint file or run directory -> Trained, built from the layered config."""
    ckpt_path = resolve_checkpoint(path, "encdiff")
    tensors, meta = load_checkpoint(ckpt_path)
    if meta["stage"] != "encdiff":
        raise UserError(f"{ckpt_path}: a {meta['stage']} checkpoint; evaluate needs an EncDiff (stage 2) checkpoint")
    where = f"{ckpt_path} (stored config)"
    stored = from_toml_text(meta["config"], where)
    cfg = layered_config(meta["config"], files, overrides, where)
    ignored = keep_stored_model_tables(cfg, stored)
    device = pick_device(cfg.run.device)
    if "scale_factor" not in tensors:
        raise UserError(f"{ckpt_path}: not an EncDiff checkpoint (no scale_factor tensor)")

    vq = build_vq(cfg.vqvae)
    load_weights(vq, unprefixed("vq", tensors), "vq", ckpt_path)
    encoder = build_encoder(cfg.encdiff)
    unet = build_unet(cfg.encdiff, latent_channels=cfg.vqvae.embed_dim, attn_backend=cfg.perf.attention)
    ema = unprefixed("ema", tensors)
    # With encdiff.ema_all the EMA is the whole EncDiff module's state (encoder.*, unet.*); otherwise
    # the U-Net's alone, whose own keys never start with "unet.".
    whole_module = any(k.startswith("unet.") for k in ema)
    ema_unet, ema_encoder = (unprefixed("unet", ema), unprefixed("encoder", ema)) if whole_module else (ema, {})
    live_encoder, live_unet = unprefixed("encoder", tensors), unprefixed("unet", tensors)
    load_weights(encoder, with_ema_parameters(encoder, live_encoder, ema_encoder) if live_encoder else {}, "encoder", ckpt_path)
    load_weights(unet, with_ema_parameters(unet, live_unet, ema_unet) if live_unet else {}, "unet", ckpt_path)

    vq, encoder, unet = (m.to(device).eval().requires_grad_(False) for m in (vq, encoder, unet))
    if cfg.perf.channels_last and device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    return Trained(path=ckpt_path, step=int(meta["step"]), cfg=cfg, stored=stored, meta=meta, ignored=ignored, vq=vq,
                   encoder=encoder, unet=unet, diffusion=build_diffusion(cfg.encdiff).to(device),
                   scale=float(tensors["scale_factor"]), device=device, amp=autocast_for(cfg.perf.precision, device))


def random_encoder(trained, seed, ds=None, calibration_images=1024):
    """A freshly initialised (untrained) concept encoder, seeded, in eval mode: the metrics' floor.

    Its BatchNorm statistics are first measured on `calibration_images` random images of ds (a
    train-mode pass without gradients). Without that, fresh running statistics (mean 0, var 1)
    squash every code below FactorVAE's 0.05 std threshold and the floor reads 0 by construction."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(trained.cfg.encdiff)
    encoder = encoder.to(trained.device).requires_grad_(False)
    if trained.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    if ds is not None:
        for m in encoder.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batches
        idx = np.sort(np.random.RandomState(seed).choice(len(ds), min(calibration_images, len(ds)), replace=False))
        encoder.train()
        with torch.no_grad():
            for chunk in np.array_split(idx, max(1, len(idx) // 256)):
                x = uint8_to_model(torch.from_numpy(np.asarray(ds.images[chunk])).to(trained.device), trained.channels_last)
                encoder(x)
    return encoder.eval()


# ---------------------------------------------------------------------------------------------
# data and codes


def trained_factor_sizes(stored, meta):
    """Factor sizes of the data the checkpoint was trained on, where they are known."""
    if "factor_sizes" in meta:  # recorded by the trainer, when it does
        return tuple(int(s) for s in json.loads(meta["factor_sizes"]))
    name = stored.data.name
    if name == "synth3d":
        return tuple(len(v) for v in SYNTH3D_GRIDS[stored.data.grid])
    if name in FACTORS and name != "cars3d":  # cars3d's object count is the number of files
        return tuple(size for _, size in FACTORS[name])
    return None


def same_data_kind(cfg, stored):
    """True when the config still names the data the model was trained on (only the path may differ)."""
    return cfg.data.name == stored.data.name and (cfg.data.name != "synth3d" or cfg.data.grid == stored.data.grid)


def open_eval_dataset(trained):
    """Open the dataset of the (layered) config and check that it can be evaluated.

    The path may point at another copy of the training data; its factor grid must then be the one
    the model was trained on. Naming another dataset (--data.name) is allowed: the metrics only
    need a complete factor grid in row-major order. Photo datasets (celeba, imagefolder) have no
    grid: see score_codes."""
    cfg, stored = trained.cfg, trained.stored
    ds = open_dataset(cfg.data.name, cfg.data.path)
    if tuple(ds.images.shape[1:]) != IMAGE_SHAPE:
        raise UserError(f"{cfg.data.path}: images are {'x'.join(map(str, ds.images.shape[1:]))}; the concept encoder needs 64x64x3")
    sizes = ds.factor_sizes
    if sizes is None:
        return ds
    if len(ds) != math.prod(sizes):  # GroundTruthDataset checks this too; the metrics depend on it
        raise UserError(f"{cfg.data.path}: {len(ds)} images for a factor grid of {math.prod(sizes)}")
    if len(sizes) < 2 or min(sizes) < 2:  # checked before encoding: the metrics would refuse it after
        raise UserError(f"{cfg.data.path}: factor sizes {sizes}: the metrics need at least 2 factors of at least 2 values")
    expected = trained_factor_sizes(stored, trained.meta)
    if same_data_kind(cfg, stored) and expected is not None and sizes != expected:
        hint = "--data.grid or --data.name" if cfg.data.name == "synth3d" else "--data.name"
        raise UserError(f"{cfg.data.path}: factor sizes {sizes} do not match the {stored.data.name} data the checkpoint "
                        f"was trained on {expected}; point --data.path at that dataset, or name another with {hint}")
    return ds


@torch.no_grad()
def encode_dataset(encoder, ds, batch_size, device, amp=nullcontext(), channels_last=False, keep=(), progress=True):
    """Every image's representation (the encoder's scalars), in index order, in one streamed pass.

    -> (codes (N, num_tokens) float32 numpy, the images at the indices `keep` (K, 64, 64, 3) uint8),
    so that pictures never need a second (random-access) read of a streamed dataset."""
    encoder.eval()
    keep = np.asarray(keep, dtype=np.int64)
    kept = np.zeros((len(keep), *IMAGE_SHAPE), np.uint8)
    codes = torch.empty((len(ds), encoder.num_tokens), dtype=torch.float32, device=device)
    start = 0
    with tqdm(total=len(ds), desc="encoding", unit="img", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        for chunk in ds.images.chunks(batch_size):
            n = len(chunk)
            here = (keep >= start) & (keep < start + n)
            kept[here] = chunk[keep[here] - start]
            # uint8 travels to the device (4x fewer bytes than float); conversion happens there
            x = uint8_to_model(torch.from_numpy(chunk).to(device), channels_last)  # (n, 3, 64, 64)
            with amp:
                codes[start:start + n] = encoder.encode(x).float()
            start += n
            bar.update(n)
    if start != len(ds):
        raise UserError(f"{ds.path}: read {start} images, expected {len(ds)}")
    return codes.cpu().numpy(), kept


def describe_data(ds):
    """One line: name, path, size, and the factor grid or the attributes."""
    if ds.factor_sizes is not None:
        labels = "factors " + ", ".join(f"{n} {s}" for n, s in zip(ds.factor_names, ds.factor_sizes))
    elif getattr(ds, "attributes", None) is not None:
        labels = f"no factor grid, {len(ds.attribute_names)} attributes"
    else:
        labels = "no factor grid, no attributes"
    return f"data: {ds.name} {ds.path}, {len(ds):,} images, {labels}"


def score_codes(codes, ds, metrics=None, seed=0, quick=False):
    """The scores a dataset supports: the factor metrics (encdiff.metrics.compute_all) on a factor
    grid; TAD on attribute labels (CelebA); nothing otherwise (imagefolder)."""
    if ds.factor_sizes is not None:
        return compute_all(codes, ds.factor_sizes, metrics, seed=seed, quick=quick)
    if getattr(ds, "attributes", None) is not None:
        return {"tad": tad(codes, ds.attributes, num_samples=TAD_QUICK_SAMPLES if quick else None, seed=seed)}
    return {}


@torch.no_grad()
def fid_of_samples(trained, ds, inception, num_samples, steps, seed, batch_size, progress=True):
    """FID between num_samples dataset images (a seeded random choice) and their DDIM
    reconstructions: each image's tokens condition a DDIM sample (eta 1) from fresh noise, which
    the stage-1 decoder turns into an image. -> {"fid", "num_samples", "ddim_steps"}."""
    rows = np.sort(np.random.RandomState(seed).choice(len(ds), min(num_samples, len(ds)), replace=False))
    g = torch.Generator(device=trained.device).manual_seed(seed)
    real, fake = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="FID", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        batch = torch.from_numpy(ds.images[rows[start:start + batch_size]])  # (b, 64, 64, 3) uint8
        x = uint8_to_model(batch.to(trained.device))  # (b, 3, 64, 64)
        with trained.amp:
            _, tokens = trained.encoder(x)
        sample = decode_tokens(trained, tokens, steps, eta=1.0, generator=g)
        real.append(inception_features(inception, x))
        fake.append(inception_features(inception, sample))
    return {"fid": fid_from_features(torch.cat(real).numpy(), torch.cat(fake).numpy()), "num_samples": len(rows),
            "ddim_steps": steps}


# ---------------------------------------------------------------------------------------------
# table


def _fmt(v):
    if v is None:
        return ""
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def format_table(results, baseline, dataset_name):
    """One row per score: ours, the random-encoder floor (when given) and the paper's EncDiff value
    (the paper's datasets; synth3d shows Shapes3D's, labelled as a reference only)."""
    paper_key = "shapes3d" if dataset_name == "synth3d" else dataset_name
    paper_name, paper = PAPER_ENCDIFF.get(paper_key, (None, {}))
    header = ["metric", "ours"]
    if baseline is not None:
        header.append("random enc.")
    if paper:
        header.append(f"paper EncDiff ({paper_name})" if paper_key == dataset_name
                      else f"paper EncDiff on {paper_name} (reference only)")
    rows = []
    for name, scores in results.items():
        for key, value in scores.items():
            row = [f"{name}.{key}", _fmt(value)]
            if baseline is not None:
                row.append(_fmt(baseline.get(name, {}).get(key)))
            if paper:
                row.append(_fmt(paper.get((name, key))))
            rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


# ---------------------------------------------------------------------------------------------
# pictures


def picture_settings(cfg_eval, quick):
    """(images per picture, values per traversal, DDIM steps): few of each for --quick."""
    if quick:
        return 4, 5, min(cfg_eval.ddim_steps, 10)
    return 8, 8, cfg_eval.ddim_steps


def picture_indices(n_images, num_images, seed):
    """Indices of the images shown (the first half) and of the swap partners (the second half)."""
    rs = np.random.RandomState(seed)
    n = max(1, min(n_images, num_images // 2))
    return rs.choice(num_images, size=2 * n, replace=False)


def fixed_noise(trained, n, seed):
    """One x_T shared by n samples (n, C, h, w): with deterministic DDIM (eta 0) samples then
    differ only by their tokens."""
    g = torch.Generator(device=trained.device).manual_seed(seed)
    x_T = torch.randn((1, *trained.latent_shape), generator=g, device=trained.device)
    return x_T.expand(n, *trained.latent_shape).contiguous()  # (1, C, h, w) -> (n, C, h, w)


@torch.no_grad()
def decode_tokens(trained, tokens, steps, eta=0.0, x_T=None, generator=None, model_fn=None):
    """DDIM with the EMA U-Net conditioned on tokens (B, N, D), then the VQ decoder -> (B, 3, 64, 64)."""
    shape = (tokens.shape[0], *trained.latent_shape)
    with trained.amp:
        z = trained.diffusion.ddim_sample(model_fn or trained.unet, shape, tokens, steps=steps, eta=eta,
                                          generator=generator, x_T=x_T)
    return trained.vq.decode(z.float() / trained.scale)  # fp32: the codebook lookup compares distances


def traversal_codes(code, low, high, n_values):
    """Code (N,) and per-scalar ranges (N,) -> (N * n_values, N) codes: block i sweeps scalar i from
    low[i] to high[i] while the other scalars keep the values of `code`."""
    N = code.shape[0]
    sweep = low[:, None] + (high - low)[:, None] * torch.linspace(0, 1, n_values, device=code.device)  # (N, n_values)
    codes = code.repeat(N, n_values, 1)  # (N, n_values, N)
    idx = torch.arange(N, device=code.device)
    codes[idx, :, idx] = sweep
    return codes.reshape(N * n_values, N)  # (N, n_values, N) -> (N * n_values, N)


def swap_codes(code_a, code_b):
    """(P, N) codes of image A and partner B -> (P, N + 1, N): A's own code, then A with scalar i
    taken from B, for each i."""
    P, N = code_a.shape
    swapped = code_a[:, None, :].repeat(1, N, 1)  # (P, N, N)
    idx = torch.arange(N, device=code_a.device)
    swapped[:, idx, idx] = code_b
    return torch.cat([code_a[:, None, :], swapped], dim=1)  # (P, N + 1, N)


@torch.no_grad()
def attention_maps(trained, tokens, steps, x_T):
    """Cross-attention of each token, averaged over heads, over the layers at the highest attended
    resolution and over the DDIM steps -> (B, N, h, w); per pixel it sums to 1 over the tokens."""
    total, count = None, 0
    with record_cross_attention(trained.unet) as maps:

        def model_fn(x, t, context):
            nonlocal total, count
            eps = trained.unet(x, t, context)
            top = max(m.shape[2] for m in maps)
            step_mean = torch.stack([m.mean(1) for m in maps if m.shape[2] == top]).mean(0)  # (B, HW, N)
            total = step_mean if total is None else total + step_mean
            count += 1
            maps.clear()  # keep one step's maps at a time
            return eps

        decode_tokens(trained, tokens, steps, eta=0.0, x_T=x_T, model_fn=model_fn)
    mean = total / count  # (B, HW, N)
    side = math.isqrt(mean.shape[1])
    return mean.transpose(1, 2).reshape(mean.shape[0], -1, side, side)  # (B, HW, N) -> (B, N, h, w)


def heat_overlay(image, heat):
    """Image (H, W, 3) uint8 in grey under a 'hot' colour map of heat (H, W) in [0, 1] -> uint8."""
    grey = image.astype(np.float32).mean(-1, keepdims=True)  # (H, W, 1)
    h = heat[..., None]  # (H, W, 1)
    hot = np.concatenate([np.clip(3 * h, 0, 1), np.clip(3 * h - 1, 0, 1), np.clip(3 * h - 2, 0, 1)], -1) * 255
    return (0.35 * grey + 0.65 * hot).round().astype(np.uint8)


def labelled_grid(images, ncol, row_labels=(), col_labels=(), pad=2):
    """(R * ncol, H, W, 3) uint8 -> the grid of images.grid with row labels on the left and column
    labels on top, as one uint8 array."""
    body = grid(images, ncol, pad)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max([probe.textlength(t, font=font) for t in row_labels] or [0])) + (6 if row_labels else 0)
    top = 14 if col_labels else 0
    canvas = Image.new("RGB", (left + body.shape[1], top + body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (left, top))
    draw = ImageDraw.Draw(canvas)
    h, w = images.shape[1:3]
    for r, text in enumerate(row_labels):
        draw.text((3, top + pad + r * (h + pad) + h // 2 - 6), text, fill="black", font=font)
    for c, text in enumerate(col_labels):
        draw.text((left + pad + c * (w + pad) + 2, 1), text, fill="black", font=font)
    return np.asarray(canvas)


def save_reconstructions(trained, x, path, steps, seed):
    """Rows: input | VQ reconstruction | DDIM sample (eta 1) conditioned on the image's tokens."""
    g = torch.Generator(device=trained.device).manual_seed(seed)
    with trained.amp:
        _, tokens = trained.encoder(x)
    recon = trained.vq.decode(trained.vq.encode(x))
    sample = decode_tokens(trained, tokens, steps, eta=1.0, generator=g)
    rows = to_uint8(torch.cat([x.float(), recon, sample]))
    save_png(labelled_grid(rows, x.shape[0], row_labels=["input", "VQ", "DDIM"]), path, scale=2)


def save_traversal(trained, x, codes, path, steps, n_values, seed):
    """Row i: scalar i of the image's code swept over its 1st..99th percentile in the dataset, the
    others fixed; one noise for every sample, deterministic DDIM, so rows differ only by the scalar."""
    low, high = (torch.from_numpy(np.percentile(codes, q, axis=0)).float().to(trained.device) for q in (1, 99))
    with trained.amp:
        code = trained.encoder.encode(x[:1]).float()[0]  # (N,)
    sweep = traversal_codes(code, low, high, n_values)  # (N * n_values, N)
    tokens = trained.encoder.mlps(sweep)
    images = decode_tokens(trained, tokens, steps, x_T=fixed_noise(trained, len(sweep), seed))
    labels = [f"s{i} [{lo:.2f}, {hi:.2f}]" for i, (lo, hi) in enumerate(zip(low.tolist(), high.tolist()))]
    save_png(labelled_grid(to_uint8(images), n_values, row_labels=labels), path)


def save_swaps(trained, xa, xb, path, steps, seed):
    """Per pair: A | B | sample from A's tokens | samples from A's tokens with token i taken from B."""
    with trained.amp:
        code_a, code_b = trained.encoder.encode(xa).float(), trained.encoder.encode(xb).float()
    codes = swap_codes(code_a, code_b)  # (P, N + 1, N)
    P, K, N = codes.shape
    tokens = trained.encoder.mlps(codes.reshape(P * K, N))  # (P * K, N, D)
    samples = decode_tokens(trained, tokens, steps, x_T=fixed_noise(trained, P * K, seed))
    samples = samples.reshape(P, K, *samples.shape[1:])  # (P * K, 3, H, W) -> (P, K, 3, H, W)
    rows = torch.cat([xa.float()[:, None], xb.float()[:, None], samples], dim=1)  # (P, K + 2, 3, H, W)
    images = to_uint8(rows.reshape(-1, *rows.shape[2:]))
    save_png(labelled_grid(images, K + 2, col_labels=["A", "B", "A (own)", *(f"s{i}<-B" for i in range(N))]), path)


def save_attention(trained, x, path, steps, seed):
    """Per image: the input | one map per token, the cross-attention at the highest attended
    resolution averaged over heads, layers and DDIM steps, over the image (the paper's Figure 1).
    Maps share one scale per image (its smallest to its largest value over all tokens), so a
    token's map shows where it is attended and how strongly compared with the other tokens."""
    with trained.amp:
        _, tokens = trained.encoder(x)
    maps = attention_maps(trained, tokens, steps, fixed_noise(trained, x.shape[0], seed))  # (B, N, h, w)
    maps = F.interpolate(maps.float(), size=IMAGE_SHAPE[:2], mode="bilinear", align_corners=False)  # (B, N, 64, 64)
    low, high = maps.amin(dim=(1, 2, 3), keepdim=True), maps.amax(dim=(1, 2, 3), keepdim=True)
    maps = ((maps - low) / (high - low).clamp_min(1e-12)).cpu().numpy()
    inputs = to_uint8(x.float())
    cells = []
    for b in range(x.shape[0]):
        cells.append(inputs[b])
        cells.extend(heat_overlay(inputs[b], m) for m in maps[b])
    ncol = maps.shape[1] + 1
    save_png(labelled_grid(np.stack(cells), ncol, col_labels=["input", *(f"s{i}" for i in range(maps.shape[1]))]), path)


@torch.no_grad()
def save_pictures(trained, images, codes, out_dir, quick, seed):
    """The four PNGs from `images` (2P, 64, 64, 3) uint8 (P shown, P swap partners) and the
    dataset's codes (for the traversal ranges). Returns the paths written."""
    n_images, n_values, steps = picture_settings(trained.cfg.eval, quick)
    x = uint8_to_model(torch.from_numpy(images).to(trained.device))  # (2P, 3, 64, 64)
    half = x.shape[0] // 2
    xa, xb = x[:half], x[half:2 * half]
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"{name}.png" for name in ("reconstructions", "traversal", "swap", "attention")}
    save_reconstructions(trained, xa, paths["reconstructions"], steps, seed)
    save_traversal(trained, xa, codes, paths["traversal"], steps, n_values, seed)
    save_swaps(trained, xa, xb, paths["swap"], steps, seed)
    save_attention(trained, xa, paths["attention"], steps, seed)
    return list(paths.values())
