"""Images between uint8 storage and the models, and PNG grids of them (pillow) for training logs and
evaluation pictures."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encdiff.errors import UserError

IMAGE_SHAPE = (64, 64, 3)  # what every model here takes: 64x64 RGB, uint8 in storage


def check_images(shape, where):
    """A dataset's images (N, 64, 64, 3), or one line naming `where` and what it holds."""
    if tuple(shape[1:]) != IMAGE_SHAPE:
        raise UserError(f"{where}: images are {'x'.join(map(str, shape[1:]))}; the models need 64x64x3")


def uint8_to_model(x_u8, channels_last=False):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]: what the models take."""
    x = x_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def to_uint8(x):
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 numpy."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)


def grid(images, nrow, pad=2, fill=255):
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) uint8 mosaic, row-major."""
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = images[i]
    return out


def save_png(array, path, scale=1):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
