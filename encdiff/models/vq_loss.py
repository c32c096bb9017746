"""The stage-1 (VQ autoencoder) loss: L1 + optional LPIPS + codebook + optional hinge PatchGAN.

Follows the loss of taming-transformers / LDM (`VQLPIPSWithDiscriminator`) that the EncDiff
release trains its autoencoder with (the release's configs/autoencoder/). The default is L1 + codebook only, because
LPIPS needs ImageNet VGG weights that this project never downloads.

LPIPS weights file (one layout; safetensors, or a torch file readable with weights_only=True):
    vgg.features.{i}.weight / .bias   i in 0 2 5 7 10 12 14 17 19 21 24 26 28
                                      (torchvision VGG16 `features` conv indices, ImageNet weights)
    lin{k}.weight                     k in 0..4, shape (1, C_k, 1, 1), C = 64 128 256 512 512
                                      (the LPIPS v0.1 "vgg" linear heads)
Extra keys are ignored. Build it from torchvision's VGG16 file and the lpips package's vgg.pth:
    vgg = torch.load("vgg16-397923af.pth", weights_only=True)
    lin = torch.load("lpips/weights/v0.1/vgg.pth", weights_only=True)
    state = {f"vgg.{k}": v for k, v in vgg.items() if k.startswith("features.")}
    state |= {f"lin{k}.weight": lin[f"lin{k}.model.1.weight"] for k in range(5)}
    safetensors.torch.save_file(state, "lpips_vgg16.safetensors")

Notes for the trainer:
- The adaptive GAN weight uses torch.autograd.grad on the decoder's last layer inside the loss.
  That needs eager autograd (torch.compile graph-breaks there; it cannot be captured by CUDA
  graphs or compiled autograd), keeps the graph alive (retain_graph) until the real backward,
  and costs an extra partial backward through LPIPS and the discriminator.
- The weight is computed from this rank's local, un-reduced gradient of the current
  micro-batch: it bypasses DDP's reducer, so it is NOT the gradient of the global batch. A DDP
  `no_sync()` gradient-accumulation trick does not change that: each micro-batch and each rank
  gets its own weight (as in taming + Lightning). Parameters stay in sync because the final
  gradients are still all-reduced.
- The generator step's backward also fills the discriminator's .grad (and, in train mode,
  updates its BatchNorm running stats, as taming does). Do not all-reduce or step those: call
  the bare discriminator (not a DDP wrapper) in the generator step, and zero its grads before
  the discriminator step. Optimise `VQLoss.discriminator.parameters()` only; the LPIPS
  network is frozen (requires_grad False) and need not be checkpointed.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from encdiff.errors import UserError
from encdiff.weights import read_tensor_file

# --------------------------------------------------------------------------------------------
# PatchGAN discriminator


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: one real/fake logit per overlapping patch. 64x64 input -> (B, 1, 6, 6)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if in_channels < 1 or ndf < 1 or n_layers < 1:
            raise ValueError(
                f"discriminator needs in_channels, ndf and n_layers >= 1, got {in_channels}, {ndf}, {n_layers}"
            )
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            # BatchNorm follows, so a conv bias would be redundant
            layers += [
                nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, True),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_discriminator_weights(m: nn.Module):
    # the DCGAN init that pix2pix/taming use; conv biases keep PyTorch's default, as there
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


# --------------------------------------------------------------------------------------------
# LPIPS (VGG16)

# VGG16 `features` up to relu5_3: numbers are conv widths, "M" a 2x2 max-pool
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_LAYOUT_HINT = "expected layout: vgg.features.{i}.weight/bias + lin{k}.weight, see encdiff/models/vq_loss.py"


def _vgg16_features() -> nn.Sequential:
    layers, ch = [], 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
            ch = v
    return nn.Sequential(*layers)  # indices match torchvision's vgg16().features[:30]


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG16) distance between images in [-1, 1]; returns one value per image (B,).

    The constructor builds random weights (for tests); use LPIPS.from_file for real ones.
    The network is frozen and always in eval mode; gradients still flow to the inputs.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.vgg = nn.Module()
        self.vgg.features = _vgg16_features()
        for k, c in enumerate(_LPIPS_CHANNELS):
            setattr(self, f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never leave eval mode

    @classmethod
    def from_file(cls, path) -> "LPIPS":
        model = cls()
        state = _read_tensor_file(path)
        for key, ref in model.state_dict().items():
            if key not in state:
                raise UserError(f"LPIPS weights file {path} lacks key '{key}' ({_LAYOUT_HINT})")
            t = state[key]
            if tuple(t.shape) != tuple(ref.shape):
                raise UserError(
                    f"LPIPS weights file {path}: key '{key}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
                )
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise UserError(f"LPIPS weights file {path}: key '{key}' is not finite floating point")
        model.load_state_dict({k: state[k].float() for k in model.state_dict()})
        return model

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.vgg.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                taps.append(h)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # one VGG pass over both image sets: half the kernel launches
        feats = self.features(torch.cat([x, y]))  # each (2B, C_k, H_k, W_k)
        d = 0.0
        for k, f in enumerate(feats):
            fx, fy = _unit_channels(f).chunk(2)  # (B, C_k, H_k, W_k) each
            lin = getattr(self, f"lin{k}")
            d = d + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))  # (B,)
        return d


def _read_tensor_file(path) -> dict:
    return read_tensor_file(path, "vqvae.lpips_path", _LAYOUT_HINT)


# --------------------------------------------------------------------------------------------
# the combined loss


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming's balance: ||d nll / d last|| / (||d g / d last|| + 1e-4), clamped to [0, 1e4], detached.

    Outside autograd (no_grad / validation) there is no gradient to compare: the weight is 0.
    """
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


class VQLoss(nn.Module):
    """Stage-1 loss. Owns the (optional) LPIPS network and the (optional) discriminator."""

    def __init__(
        self,
        disc_start: int = 0,
        disc_weight: float = 0.75,
        codebook_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        lpips_path=None,
        use_gan: bool = False,
        disc_ndf: int = 64,
        disc_layers: int = 3,
    ):
        super().__init__()
        if not isinstance(disc_start, int) or disc_start < 0:
            raise ValueError(f"vq loss: disc_start must be an integer >= 0, got {disc_start!r}")
        for name, value in [
            ("disc_weight", disc_weight),
            ("codebook_weight", codebook_weight),
            ("perceptual_weight", perceptual_weight),
        ]:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"vq loss: {name} must be a finite number >= 0, got {value!r}")
        self.disc_start = disc_start
        self.disc_weight = float(disc_weight)
        self.codebook_weight = float(codebook_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.lpips = LPIPS.from_file(lpips_path) if lpips_path else None
        self.discriminator = NLayerDiscriminator(3, disc_ndf, disc_layers) if use_gan else None

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def generator_loss(self, x, xrec, codebook_loss, step: int, last_layer=None):
        """Autoencoder loss. x, xrec (B, 3, H, W) in [-1, 1]; last_layer = decoder's final conv weight
        (needed only once the GAN is active). Returns (loss, logs of detached scalars)."""
        zero = torch.zeros((), device=x.device)
        l1 = (x.float() - xrec.float()).abs().mean()
        perceptual = zero
        nll = l1
        if self.lpips is not None and self.perceptual_weight > 0:
            perceptual = self.lpips(x, xrec).float().mean()
            nll = nll + self.perceptual_weight * perceptual
        codebook = codebook_loss.float().mean()
        loss = nll + self.codebook_weight * codebook
        logs = {"l1": l1, "perceptual": perceptual, "nll": nll, "codebook": codebook}
        if self.discriminator is not None:
            g_loss, d_weight = zero, zero
            if self.gan_active(step):
                if last_layer is None:
                    raise ValueError("generator_loss needs last_layer once the GAN is active")
                g_loss = -self.discriminator(xrec.contiguous()).float().mean()
                d_weight = self.disc_weight * adaptive_gan_weight(nll, g_loss, last_layer)
                loss = loss + d_weight * g_loss
            logs |= {"g_loss": g_loss, "d_weight": d_weight, "disc_factor": zero + self.gan_active(step)}
        logs["loss"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, x, xrec, step: int):
        """Hinge loss of the discriminator on real x vs reconstructions (both detached).
        Before disc_start the loss is multiplied by 0 (skip the step with gan_active instead)."""
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss called with use_gan=False")
        # two passes, not one concatenated batch: BatchNorm statistics stay per set, as in taming
        logits_real = self.discriminator(x.detach().contiguous()).float()
        logits_fake = self.discriminator(xrec.detach().contiguous()).float()
        factor = 1.0 if self.gan_active(step) else 0.0
        loss = factor * hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach() for k, v in logs.items()}
