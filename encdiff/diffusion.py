"""Gaussian diffusion for stage 2: noise schedules, the prediction targets and loss, the DDIM sampler.

    diffusion = Diffusion(schedule="cosine", loss="l2").to(device)
    loss = diffusion.loss(lambda x, t: unet(x, t, tokens), z0)
    z = diffusion.ddim_sample(lambda x, t: unet(x, t, tokens), z0.shape, steps=200, eta=1.0)

The schedule lives in fp32 buffers on the module's device, so a step does no host work and no
Python float that changes between steps reaches a compiled function.
"""

import math

import torch
import torch.nn as nn
from tqdm import tqdm


SCHEDULES = ("linear", "cosine")
LOSSES = ("l1", "l2")
# What the U-Net predicts. "eps" is the paper's and the release's. "v" (Salimans & Ho, 2022,
# v = sqrt(ab) eps - sqrt(1 - ab) x0) weights an x0 error by SNR + 1 instead of eps's SNR: the
# low-SNR steps, where only the tokens can say where and what the object is, count for more.
# "x0" weights every step's x0 error by 1.
PREDICTIONS = ("eps", "v", "x0")


def linear_betas(T, start, end):
    """LDM's "linear" schedule: linear in sqrt(beta)."""
    return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T, s):
    """Nichol & Dhariwal: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at 0.999."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)


def gather(buffer, t, ndim):
    """buffer[t] shaped (B, 1, ..., 1) to broadcast over a (B, ...) tensor of `ndim` dims."""
    return buffer[t].view(-1, *([1] * (ndim - 1)))  # (B, 1, ..., 1)


class Diffusion(nn.Module):
    """Diffusion with T steps; model_fn(x_t, t) -> the prediction (noise, v or x0)."""

    def __init__(
        self,
        timesteps=1000,
        schedule="cosine",
        loss="l2",
        linear_start=0.0015,
        linear_end=0.0155,
        cosine_s=8e-3,
        prediction="eps",
        t_power=0.0,
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"diffusion.schedule={schedule!r} must be one of {SCHEDULES}")
        if loss not in LOSSES:
            raise ValueError(f"diffusion.loss={loss!r} must be one of {LOSSES}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction={prediction!r} must be one of {PREDICTIONS}")
        if timesteps < 1:
            raise ValueError(f"diffusion.timesteps={timesteps} must be >= 1")
        if not 0 <= t_power < math.inf:
            raise ValueError(f"diffusion.t_power={t_power} must be a number >= 0")
        if schedule == "linear" and not 0 < linear_start < linear_end < 1:
            raise ValueError(f"diffusion: need 0 < linear_start ({linear_start}) < linear_end ({linear_end}) < 1")
        self.timesteps, self.schedule, self.loss_type, self.prediction = timesteps, schedule, loss, prediction
        self.t_power = float(t_power)
        if schedule == "linear":
            betas = linear_betas(timesteps, linear_start, linear_end)
        else:
            betas = cosine_betas(timesteps, cosine_s)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        # computed in float64, stored in fp32; not in state_dict (a function of the config)
        for name, value in (
            ("betas", betas),
            ("alphas_cumprod", alphas_cumprod),
            ("sqrt_alphas_cumprod", alphas_cumprod.sqrt()),
            ("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt()),
        ):
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return (
            gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def target(self, x0, t, noise):
        """What model_fn should output at x_t = q_sample(x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return (
            gather(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
        )

    def to_x0_eps(self, x_t, a, out):
        """(x0, eps) implied by the prediction `out` at x_t, where alpha_bar = a (a scalar tensor)."""
        if self.prediction == "eps":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt(), out
        if self.prediction == "x0":
            return out, (x_t - a.sqrt() * out) / (1 - a).sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x_t

    def sample_timesteps(self, n, generator=None, device=None):
        """n training timesteps in [0, T): uniform when t_power is 0 (the paper), otherwise with density
        proportional to (t / T)^t_power, which spends more of the steps where the noise hides the
        latent and only the tokens can say what it held."""
        if self.t_power == 0:
            return torch.randint(0, self.timesteps, (n,), device=device, generator=generator)
        u = torch.rand(n, device=device, generator=generator)
        # inverse CDF of the density (p + 1) s^p on [0, 1)
        s = u.pow(1.0 / (self.t_power + 1.0))
        return (s * self.timesteps).long().clamp_(max=self.timesteps - 1)

    def loss(self, model_fn, x0, context=None, generator=None, t=None, noise=None):
        """Mean L1 or L2 between the target (noise, v or x0) and model_fn's prediction, t drawn by
        sample_timesteps.

        model_fn(x_t, t) or, when context is given, model_fn(x_t, t, context). t and noise may be
        passed in (e.g. drawn outside a compiled region); otherwise they are drawn here.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t) if context is None else model_fn(x_t, t, context)
        err = out.float() - self.target(x0, t, noise).float()
        return err.abs().mean() if self.loss_type == "l1" else err.square().mean()

    def ddim_timesteps(self, steps):
        """`steps` evenly spaced timesteps 0, T/steps, ...: the last step lands on a clean sample."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"ddim steps={steps} must be between 1 and timesteps={self.timesteps}")
        return torch.arange(steps, device=self.betas.device) * (self.timesteps // steps)

    def ddim_coefficients(self, steps, eta):
        """-> (timesteps, alpha_bar_t, alpha_bar_prev, sigma), each (steps,), for DDIM."""
        ts = self.ddim_timesteps(steps)
        a = self.alphas_cumprod[ts]
        a_prev = torch.cat([torch.ones_like(a[:1]), a[:-1]])
        # eta=1: sigma^2 = (1 - a_prev) / (1 - a) * beta_t, DDPM's posterior variance
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
        return ts, a, a_prev, sigma

    @torch.no_grad()
    def ddim_sample(self, model_fn, shape, context=None, steps=200, eta=1.0, generator=None, progress=False, x_T=None):
        """DDIM (Song et al.) from pure noise (or x_T); eta=1 has DDPM's posterior variance, eta=0
        is deterministic. The final step goes to alpha_bar = 1, so it returns the predicted x0."""
        device = self.betas.device
        ts, a, a_prev, sigma = self.ddim_coefficients(steps, eta)
        x = x_T.float() if x_T is not None else torch.randn(shape, device=device, generator=generator)
        for i in tqdm(reversed(range(steps)), total=steps, disable=not progress, desc="ddim"):
            t = ts[i].expand(shape[0])  # (B,)
            out = (model_fn(x, t) if context is None else model_fn(x, t, context)).float()
            x0, eps = self.to_x0_eps(x, a[i], out)
            x = a_prev[i].sqrt() * x0 + (1 - a_prev[i] - sigma[i] ** 2).clamp(min=0).sqrt() * eps
            if eta > 0 and i > 0:  # sigma is 0 at the last step anyway
                x = x + sigma[i] * torch.randn(shape, device=device, generator=generator)
        return x
