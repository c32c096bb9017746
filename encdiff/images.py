"""PNG grids of images (pillow), for training logs and evaluation pictures."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image


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


def save_grid(x, path, nrow, scale=1):
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid."""
    save_png(grid(to_uint8(x), nrow), path, scale)
