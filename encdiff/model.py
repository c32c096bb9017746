"""A trained EncDiff from Python: the codes of images, reconstructions from them, traversals.

    model = encdiff.load("runs/synth3d")           # a run directory or a checkpoint file
    codes = model.encode(images)                   # (N, num_tokens) float32, as evaluate.py scores
    recon = model.reconstruct(images[:8])          # (8, 64, 64, 3) uint8: DDIM from each image's codes
    row = model.traverse(images[0], code=3, values=np.linspace(-2, 2, 8))   # (8, 64, 64, 3) uint8

Images are (N, 64, 64, 3) uint8 (numpy or torch, a dataset's rows as they are stored) or float
(N, 3, 64, 64) tensors in [-1, 1] (what the models take); one image may come without its N axis.
Everything runs batched on the model's device; the loading is evaluate.py's (load_trained).
"""

import numpy as np
import torch

from encdiff.ckpt_contents import load_trained
from encdiff.evaluation import encode_dataset
from encdiff.images import IMAGE_SHAPE, to_uint8, uint8_to_model
from encdiff.pictures import decode_tokens, fixed_noise
from encdiff.runtime import scoring_autocast


def load(path, device=None):
    """A run directory (its newest good stage-2 checkpoint) or a checkpoint file -> Model.
    device: "cpu", "cuda" or None (the GPU when there is one)."""
    overrides = [("run.device", device)] if device is not None else []
    return Model(load_trained(path, overrides=overrides))


def as_uint8_batch(images):
    """uint8 images (N, 64, 64, 3) or one (64, 64, 3), numpy or torch -> a (N, 64, 64, 3) uint8 tensor,
    or None for float input."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images: expected a numpy array or a torch tensor, got {type(images).__name__}")
    if x.dtype != torch.uint8:
        return None
    if x.dim() == 3:
        x = x[None]  # (64, 64, 3) -> (1, 64, 64, 3)
    if tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"uint8 images must be (N, 64, 64, 3), got {tuple(x.shape)}")
    return x


class Model:
    """A trained EncDiff (encdiff.ckpt_contents.Trained underneath: .trained) in eval mode."""

    def __init__(self, trained):
        self.trained = trained
        self.device, self.step, self.path, self.cfg = trained.device, trained.step, trained.path, trained.cfg
        self.num_tokens = trained.encoder.num_tokens
        self.batch_size = trained.cfg.eval.batch_size

    def __repr__(self):
        return f"Model({self.path}, step {self.step}, {self.num_tokens} codes, {self.device})"

    def model_input(self, images):
        """Any accepted images -> (N, 3, 64, 64) float in [-1, 1] on the model's device."""
        x8 = as_uint8_batch(images)
        if x8 is not None:
            return uint8_to_model(x8.to(self.device))
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.dim() == 3:
            x = x[None]  # (3, 64, 64) -> (1, 3, 64, 64)
        if tuple(x.shape[1:]) != (3, *IMAGE_SHAPE[:2]):
            raise ValueError(f"float images must be (N, 3, 64, 64) in [-1, 1], got {tuple(x.shape)}")
        return x.to(self.device)

    @torch.no_grad()
    def encode(self, images, progress=False):
        """-> codes (N, num_tokens) float32 numpy: the representation evaluate.py scores (uint8 images
        take evaluate.py's own path, so the codes are the same numbers)."""
        t = self.trained
        amp = scoring_autocast(t.cfg, t.device)
        x8 = as_uint8_batch(images)
        if x8 is not None:
            return encode_dataset(t.encoder, x8, self.batch_size, t.device, amp, t.channels_last, progress=progress)[0]
        x = self.model_input(images)
        with amp:
            codes = [t.encoder.encode(x[s : s + self.batch_size]).float() for s in range(0, len(x), self.batch_size)]
        return torch.cat(codes).cpu().numpy()

    @torch.no_grad()
    def decode(self, codes, steps=50, seed=0):
        """Codes (N, num_tokens) -> images (N, 64, 64, 3) uint8: deterministic DDIM (eta 0) from one
        noise for all, so images differ only by their codes."""
        t = self.trained
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.float32, device=t.device)
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"codes must be (N, {self.num_tokens}), got {tuple(codes.shape)}")
        out = []
        for s in range(0, len(codes), self.batch_size):
            c = codes[s : s + self.batch_size]
            out.append(to_uint8(decode_tokens(t, t.encoder.mlps(c), steps, x_T=fixed_noise(t, len(c), seed))))
        return np.concatenate(out)

    def reconstruct(self, images, steps=50, seed=0):
        """Images -> what the diffusion decoder makes of their codes, (N, 64, 64, 3) uint8."""
        return self.decode(self.encode(images), steps=steps, seed=seed)

    def traverse(self, image, code, values, steps=50, seed=0):
        """One image, the index of one code, and the values to give it -> (len(values), 64, 64, 3)
        uint8: the image with that code swept, the others kept."""
        if not 0 <= code < self.num_tokens:
            raise ValueError(f"code must be in 0..{self.num_tokens - 1}, got {code}")
        base = self.encode(image)
        if len(base) != 1:
            raise ValueError(f"traverse takes one image, got {len(base)}")
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        sweep = np.repeat(base, len(values), axis=0)  # (1, N) -> (V, N)
        sweep[:, code] = values
        return self.decode(sweep, steps=steps, seed=seed)
