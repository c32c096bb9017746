"""FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to Inception-v3 pool
features (2048-d) of real and generated images, from Inception weights the user supplies.

Nothing is downloaded. Set eval.inception_path to one of these files (fetched on a machine with
internet access):
- pytorch-fid's port of the TensorFlow FID Inception, pt_inception-2015-12-05-6726825d.pth
  (github.com/mseitzer/pytorch-fid/releases): the network published FIDs use. Its `fc` has 1008
  outputs, which selects the TensorFlow block variant below.
- torchvision's inception_v3 ImageNet weights (inception_v3_google-0cc3c7bd.pth, `fc` with 1000
  outputs): torchvision's block variant. Fine for comparing your own runs, not with papers.

Key layout: torchvision's Inception3 state-dict names, which both files use:
`Conv2d_1a_3x3.conv.weight`, `Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}`, ...,
`Mixed_5b.branch1x1.conv.weight`, ..., `Mixed_7c.branch_pool.bn.running_var`. Every key up to
Mixed_7c is required; `fc.*` and `AuxLogits.*` are not used (fc.weight's row count only picks the
variant; a file without it gets the TensorFlow variant); `*.num_batches_tracked` is optional. The
file is a .safetensors, or a torch.save'd dict read with torch.load(weights_only=True) (a dict
holding a "state_dict" dict is unwrapped).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from encdiff.errors import UserError
from encdiff.weights import read_tensor_file

FEATURES = 2048
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
HOW_TO_PROVIDE = (
    "FID skipped: it needs Inception weights, which are never downloaded here. On a machine with internet "
    f"access fetch {FID_WEIGHTS} from https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    f"{FID_WEIGHTS}, copy it here and pass --eval.inception_path=/path/to/{FID_WEIGHTS} (key layout: encdiff/fid.py)"
)


# ---------------------------------------------------------------------------------------------
# Inception-v3 up to the pool features (torchvision's module names, so state dicts load as they are)


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1)


def avg_pool_tf(x):
    # TensorFlow's average pool leaves the zero padding out of the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def max_pool(x):
    # the FID Inception's last block max-pools here (a quirk of that graph, kept for its numbers)
    return F.max_pool2d(x, 3, stride=1, padding=1)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(self.pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    def __init__(self, cin, c7, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(self.pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d3),
                self.branch3x3dbl_3b(d3),
                self.branch_pool(self.pool(x)),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> pool features (B, 2048) float32. variant "tf": the
    TensorFlow FID graph (pytorch-fid's FIDInception blocks); "torchvision": torchvision's blocks.
    Random weights until loaded (load_inception)."""

    def __init__(self, variant="tf"):
        super().__init__()
        if variant not in ("tf", "torchvision"):
            raise ValueError(f"variant must be 'tf' or 'torchvision', got {variant!r}")
        self.variant = variant
        tf = variant == "tf"
        pool, last_pool = (avg_pool_tf, max_pool) if tf else (avg_pool, avg_pool)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, pool)
        self.Mixed_5c = InceptionA(256, 64, pool)
        self.Mixed_5d = InceptionA(288, 64, pool)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, pool)
        self.Mixed_6c = InceptionC(768, 160, pool)
        self.Mixed_6d = InceptionC(768, 160, pool)
        self.Mixed_6e = InceptionC(768, 192, pool)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool)
        self.Mixed_7c = InceptionE(2048, last_pool)

    def forward(self, x, resize=True):
        if resize:  # as pytorch-fid: bilinear to the 299 x 299 the network was trained at
            x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # (B, 2048, h, w) -> (B, 2048)


# ---------------------------------------------------------------------------------------------
# loading the user's weights


def read_weights(path):
    """A flat name -> tensor dict from a .safetensors or torch.save file."""
    return read_tensor_file(path, "eval.inception_path", "encdiff/fid.py")


def load_inception(path, device="cpu"):
    """The frozen InceptionV3 (eval mode, on device) with the weights of the file at path; the
    variant follows fc.weight's rows (1000: torchvision; 1008 or absent: TensorFlow FID)."""
    state = read_weights(path)
    fc = state.get("fc.weight")
    model = InceptionV3("torchvision" if fc is not None and fc.shape[0] == 1000 else "tf")
    own = model.state_dict()
    for key, ref in own.items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, ref)  # unused in eval mode; older files lack it
            continue
        if key not in state:
            raise UserError(
                f"eval.inception_path: {path} lacks '{key}' (expected torchvision's Inception3 "
                "key layout, see encdiff/fid.py)"
            )
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise UserError(
                f"eval.inception_path: {path}: '{key}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise UserError(f"eval.inception_path: {path}: '{key}' is not finite floating point")
    model.load_state_dict({k: state[k].to(ref.dtype) for k, ref in own.items()})
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# the distance


def feature_statistics(features):
    """(N, D) features -> (mean (D,), covariance (D, D), ddof 1), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) of N(mu1, S1) and N(mu2, S2).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric positive semi-definite: no complex matrix square root (scipy's sqrtm) and
    no imaginary residue to discard, even for the singular covariances of few samples."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^(1/2)
    inner = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((inner + inner.T) / 2)  # symmetrised against round-off
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def fid_from_features(real, fake):
    """FID of two (N, D) feature sets.

    With no more samples than dimensions (quick runs, tests) the same number comes from the samples
    directly: with X the centred features, S = X^T X / (n - 1), the nonzero eigenvalues of S1 S2
    are the squared singular values of X2 X1^T / sqrt((n1 - 1)(n2 - 1)), an n2 x n1 matrix, so
    two 2048 x 2048 eigendecompositions (seconds on a CPU core) become one small SVD."""
    a, b = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if max(len(a), len(b)) > a.shape[-1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features must be (N, D) with the same D and N >= 2, got {a.shape} and {b.shape}")
    ac, bc = a - a.mean(0), b - b.mean(0)
    norm = np.sqrt((len(a) - 1) * (len(b) - 1))
    cross = np.linalg.svd(bc @ ac.T, compute_uv=False).sum() / norm  # tr((S1 S2)^(1/2))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ac * ac).sum() / (len(a) - 1) + (bc * bc).sum() / (len(b) - 1) - 2 * cross)


@torch.no_grad()
def inception_features(model, x, batch_size=200):
    """Images (B, 3, H, W) in [-1, 1] -> (B, 2048) float64 on the CPU; fp32, outside any autocast,
    in chunks (at 299 x 299 a 1024-image batch would hold ~15 GB of activations)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.cat([model(chunk.float().clamp(-1, 1)).double().cpu() for chunk in x.split(batch_size)])
