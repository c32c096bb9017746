"""The pictures of a trained EncDiff: what people would rather look at than read.

    save_pictures(trained, images, codes, out_dir, quick, seed)   # evaluate.py: the four PNGs below
    save_reconstructions(trained, x, path, steps, seed)          # input | VQ | DDIM sample, labelled
    save_vq_reconstructions(x, xrec, path)                       # stage 1's training grid

reconstructions.png (input, VQ reconstruction, DDIM sample from the image's tokens), traversal.png
(each scalar swept over its range), swap.png (one token taken from another image), attention.png
(each token's cross-attention over the image, with its colour scale). `trained` is an
encdiff.ckpt_contents.Trained: from a checkpoint (load_trained) or from a training step
(trained_from_step, for train.py's sample grids).
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from encdiff.images import IMAGE_SHAPE, grid, save_png, to_uint8, uint8_to_model
from encdiff.models.unet import record_cross_attention


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
def decode_tokens(trained, tokens, steps, eta=0.0, x_T=None, generator=None, model_fn=None, on_step=None):
    """DDIM with the EMA U-Net conditioned on tokens (B, N, D), then the VQ decoder -> (B, 3, 64, 64).
    on_step() is called after each DDIM step (a progress bar's update)."""
    shape = (tokens.shape[0], *trained.latent_shape)
    fn = model_fn or trained.unet
    if on_step is not None:
        inner = fn

        def fn(x, t, context):
            out = inner(x, t, context)
            on_step()
            return out

    with trained.amp:
        z = trained.diffusion.ddim_sample(fn, shape, tokens, steps=steps, eta=eta, generator=generator, x_T=x_T)
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
def attention_maps(trained, tokens, steps, x_T, on_step=None):
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

        decode_tokens(trained, tokens, steps, eta=0.0, x_T=x_T, model_fn=model_fn, on_step=on_step)
    mean = total / count  # (B, HW, N)
    side = math.isqrt(mean.shape[1])
    return mean.transpose(1, 2).reshape(mean.shape[0], -1, side, side)  # (B, HW, N) -> (B, N, h, w)


def hot(heat):
    """The 'hot' colour map: heat (...) in [0, 1] -> (..., 3) float in [0, 255]."""
    h = heat[..., None]
    return np.concatenate([np.clip(3 * h, 0, 1), np.clip(3 * h - 1, 0, 1), np.clip(3 * h - 2, 0, 1)], -1) * 255


def heat_overlay(image, heat):
    """Image (H, W, 3) uint8 in grey under a 'hot' colour map of heat (H, W) in [0, 1] -> uint8."""
    grey = image.astype(np.float32).mean(-1, keepdims=True)  # (H, W, 1)
    return (0.35 * grey + 0.65 * hot(heat)).round().astype(np.uint8)


def colour_scale(low, high, size=IMAGE_SHAPE[0]):
    """A (size, size, 3) uint8 cell: the overlay's colour bar (the same grey-blended 'hot' map as a
    mid-grey image gets) from `high` at the top to `low` at the bottom, both values written beside it."""
    ramp = np.linspace(1, 0, size, dtype=np.float32)[:, None].repeat(12, 1)  # (size, 12), top = high
    cell = Image.new("RGB", (size, size), "white")
    cell.paste(Image.fromarray((0.35 * 128 + 0.65 * hot(ramp)).round().astype(np.uint8)), (2, 0))
    draw, font = ImageDraw.Draw(cell), ImageFont.load_default()
    draw.text((17, 0), f"{high:.3f}", fill="black", font=font)
    draw.text((17, size - 12), f"{low:.3f}", fill="black", font=font)
    return np.asarray(cell)


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


FIRST_STAGE_LABELS = {"vq": "VQ", "kl": "KL", "pool": "pool"}  # vqvae.kind -> its row's label


@torch.no_grad()
def save_reconstructions(trained, x, path, steps, seed, on_step=None):
    """Rows: input | first-stage (VQ, KL or pool) reconstruction | DDIM sample (eta 1) conditioned
    on the image's tokens."""
    g = torch.Generator(device=trained.device).manual_seed(seed)
    with trained.amp:
        _, tokens = trained.encoder(x)
    recon = trained.vq.decode(trained.vq.encode(x))
    sample = decode_tokens(trained, tokens, steps, eta=1.0, generator=g, on_step=on_step)
    rows = to_uint8(torch.cat([x.float(), recon, sample]))
    stage1 = FIRST_STAGE_LABELS[trained.cfg.vqvae.kind]
    save_png(labelled_grid(rows, x.shape[0], row_labels=["input", stage1, "DDIM"]), path, scale=2)


@torch.no_grad()
def save_vq_reconstructions(x, xrec, path):
    """Stage 1's training grid: rows input | VQ reconstruction, x and xrec (B, 3, 64, 64) in [-1, 1]."""
    rows = to_uint8(torch.cat([x.float(), xrec.float()]))
    save_png(labelled_grid(rows, x.shape[0], row_labels=["input", "VQ"]), path, scale=2)


def save_traversal(trained, x, codes, path, steps, n_values, seed, on_step=None):
    """Row i: scalar i of the image's code swept over its 1st..99th percentile in the dataset, the
    others fixed; one noise for every sample, deterministic DDIM, so rows differ only by the scalar."""
    low, high = (torch.from_numpy(np.percentile(codes, q, axis=0)).float().to(trained.device) for q in (1, 99))
    with trained.amp:
        code = trained.encoder.encode(x[:1]).float()[0]  # (N,)
    sweep = traversal_codes(code, low, high, n_values)  # (N * n_values, N)
    tokens = trained.encoder.mlps(sweep)
    images = decode_tokens(trained, tokens, steps, x_T=fixed_noise(trained, len(sweep), seed), on_step=on_step)
    labels = [f"s{i} [{lo:.2f}, {hi:.2f}]" for i, (lo, hi) in enumerate(zip(low.tolist(), high.tolist()))]
    save_png(labelled_grid(to_uint8(images), n_values, row_labels=labels), path)


def save_swaps(trained, xa, xb, path, steps, seed, on_step=None):
    """Per pair: A | B | sample from A's tokens | samples from A's tokens with token i taken from B."""
    with trained.amp:
        code_a, code_b = trained.encoder.encode(xa).float(), trained.encoder.encode(xb).float()
    codes = swap_codes(code_a, code_b)  # (P, N + 1, N)
    P, K, N = codes.shape
    tokens = trained.encoder.mlps(codes.reshape(P * K, N))  # (P * K, N, D)
    samples = decode_tokens(trained, tokens, steps, x_T=fixed_noise(trained, P * K, seed), on_step=on_step)
    samples = samples.reshape(P, K, *samples.shape[1:])  # (P * K, 3, H, W) -> (P, K, 3, H, W)
    rows = torch.cat([xa.float()[:, None], xb.float()[:, None], samples], dim=1)  # (P, K + 2, 3, H, W)
    images = to_uint8(rows.reshape(-1, *rows.shape[2:]))
    save_png(labelled_grid(images, K + 2, col_labels=["A", "B", "A (own)", *(f"s{i}<-B" for i in range(N))]), path)


def save_attention(trained, x, path, steps, seed, on_step=None):
    """Per image: the input | one map per token, the cross-attention at the highest attended
    resolution averaged over heads, layers and DDIM steps, over the image (the paper's Figure 1).
    Maps share one scale per image (its smallest to its largest value over all tokens, drawn in the
    last column), so a token's map shows where it is attended and how strongly compared with the
    other tokens; a weight of 1/N everywhere would be no preference at all."""
    with trained.amp:
        _, tokens = trained.encoder(x)
    maps = attention_maps(trained, tokens, steps, fixed_noise(trained, x.shape[0], seed), on_step)  # (B, N, h, w)
    maps = F.interpolate(maps.float(), size=IMAGE_SHAPE[:2], mode="bilinear", align_corners=False)  # (B, N, 64, 64)
    low, high = maps.amin(dim=(1, 2, 3), keepdim=True), maps.amax(dim=(1, 2, 3), keepdim=True)
    maps = ((maps - low) / (high - low).clamp_min(1e-12)).cpu().numpy()
    inputs = to_uint8(x.float())
    cells = []
    for b in range(x.shape[0]):
        cells.append(inputs[b])
        cells.extend(heat_overlay(inputs[b], m) for m in maps[b])
        cells.append(colour_scale(float(low[b]), float(high[b])))
    labels = ["input", *(f"s{i}" for i in range(maps.shape[1])), "scale"]
    save_png(labelled_grid(np.stack(cells), len(labels), col_labels=labels), path)


@torch.no_grad()
def save_pictures(trained, images, codes, out_dir, quick, seed, progress=False):
    """The four PNGs from `images` (2P, 64, 64, 3) uint8 (P shown, P swap partners) and the
    dataset's codes (for the traversal ranges), with a bar over their DDIM steps. Returns the paths
    written."""
    n_images, n_values, steps = picture_settings(trained.cfg.eval, quick)
    x = uint8_to_model(torch.from_numpy(images).to(trained.device))  # (2P, 3, 64, 64)
    half = x.shape[0] // 2
    xa, xb = x[:half], x[half : 2 * half]
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"{name}.png" for name in ("reconstructions", "traversal", "swap", "attention")}
    with tqdm(total=4 * steps, desc="pictures: DDIM steps", disable=not progress, dynamic_ncols=True) as bar:
        step = bar.update
        save_reconstructions(trained, xa, paths["reconstructions"], steps, seed, step)
        save_traversal(trained, xa, codes, paths["traversal"], steps, n_values, seed, step)
        save_swaps(trained, xa, xb, paths["swap"], steps, seed, step)
        save_attention(trained, xa, paths["attention"], steps, seed, step)
    return list(paths.values())
