"""Where and in what precision the work runs: one rule for train.py, evaluate.py and the benchmarks.

device = pick_device(cfg.run.device)          # evaluate.py, benchmarks (train.py: dist.setup)
prec = precision(cfg.perf.precision, device)  # "bf16" | "fp16" | "fp32"
with autocast(prec, device): ...              # LOW_DTYPES.get(prec): its dtype, None for fp32
set_cuda_flags(device, cfg.perf.tf32)  # TF32, cuDNN autotuner
versions()                                    # encdiff, python, torch, triton, xformers, commit
"""

import functools
import platform
import subprocess
from contextlib import nullcontext
from pathlib import Path

import torch

from encdiff import __version__
from encdiff.errors import UserError


def pick_device(choice):
    """ "auto" -> cuda when present, else cpu; "cuda" without CUDA is a one-line error."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but CUDA is not available here (use --run.device=cpu)")
    return torch.device("cuda", torch.cuda.current_device())


def precision(choice, device):
    """perf.precision resolved: "auto" is bf16 autocast on CUDA and fp32 on the CPU."""
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return choice


LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # what autocast computes in; fp32: none


def autocast(prec, device, cache_enabled=True):
    """The autocast context of a resolved precision (reusable: it can be entered many times).
    cache_enabled=False for code a CUDA graph may capture, as PyTorch asks: the cache of cast
    weights would outlive the capture."""
    if prec == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=LOW_DTYPES[prec], cache_enabled=cache_enabled)


def scoring_autocast(cfg, device):
    """The precision of what is scored or cached (eval.precision): the evaluated codes and stage 2's
    cached latents; fp32 by default, as the release computes them, whatever training uses."""
    return autocast(precision(cfg.eval.precision, device), device)


def set_cuda_flags(device, tf32):
    """On CUDA: TF32 for matmuls and convolutions, set both ways (cuDNN allows TF32 unless told
    otherwise), and cuDNN's autotuner: shapes never change in a run, so each convolution is timed
    once, during the first (warm-up) steps, before a CUDA graph is captured."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


@functools.cache
def versions():
    """{encdiff, python, torch, triton, xformers, commit}: what a benchmark figure must name and a
    checkpoint records (None where missing). The same for the whole process."""
    info = {"encdiff": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "xformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # not installed, or a wheel for another CUDA failing to load
            info[mod] = None
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except OSError:
        info["commit"] = None
    return info
