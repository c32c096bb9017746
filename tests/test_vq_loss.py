import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from encdiff.errors import UserError
from encdiff.models.vq_loss import (
    LPIPS,
    NLayerDiscriminator,
    VQLoss,
    adaptive_gan_weight,
    hinge_d_loss,
)


def images(seed, b=2, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- discriminator


def patchgan_param_count(c_in, ndf, n_layers):
    # independent count: first conv with bias, hidden convs without bias + BN(2 per ch), head conv
    chans = [ndf] + [ndf * min(2**n, 8) for n in range(1, n_layers + 1)]
    count = c_in * ndf * 16 + ndf
    for a, b in zip(chans[:-1], chans[1:]):
        count += a * b * 16 + 2 * b
    return count + chans[-1] * 16 + 1


@pytest.mark.parametrize("ndf,n_layers", [(64, 3), (16, 2)])
def test_discriminator_shape_and_params(ndf, n_layers):
    d = NLayerDiscriminator(3, ndf, n_layers)
    assert sum(p.numel() for p in d.parameters()) == patchgan_param_count(3, ndf, n_layers)
    out = d(images(0))
    side = 64 // 2**n_layers - 2  # stride-2 levels, then two 4x4/pad-1 stride-1 convs lose 1 px each
    assert out.shape == (2, 1, side, side)


def test_discriminator_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    big = convs[3].weight  # 512x256x4x4: enough samples for tight moments
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 1e-3
    for bn in bns:
        assert abs(bn.weight.mean().item() - 1.0) < 0.01 and bn.weight.std().item() < 0.04
        assert torch.all(bn.bias == 0)
    assert all(c.bias is None for c in convs[1:-1])


def test_discriminator_bad_config():
    with pytest.raises(ValueError, match="n_layers"):
        NLayerDiscriminator(3, 64, 0)


# ---------------------------------------------------------------- hinge + adaptive weight


def test_hinge_d_loss_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # hinge terms 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # hinge terms 0, 1, 2
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)
    # a perfect discriminator (margin >= 1 on both sides) has zero loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -1.0)).item() == 0.0


def test_adaptive_weight_matches_formula():
    w = nn.Parameter(torch.randn(4, 3))
    nll = (3.0 * w).sum()  # grad 3 everywhere
    g = (0.5 * w).sum()  # grad 0.5 everywhere
    n = w.numel() ** 0.5
    weight = adaptive_gan_weight(nll, g, w)
    assert weight.item() == pytest.approx(3 * n / (0.5 * n + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    assert w.grad is None  # autograd.grad must not accumulate into .grad
    nll.backward()  # graph retained for the real backward
    assert torch.allclose(w.grad, torch.full_like(w, 3.0))


def test_adaptive_weight_clamped_and_off_without_grad():
    w = nn.Parameter(torch.ones(5))
    big = adaptive_gan_weight((w * 10.0).sum(), (w * 0.0).sum(), w)  # g grad 0 -> ratio 1e5 * ||.||
    assert big.item() == 1e4
    with torch.no_grad():
        assert adaptive_gan_weight(w.sum(), w.sum(), w).item() == 0.0


class IdentityLogits(nn.Module):
    """Stands in for the discriminator: logits = first channel of the input."""

    def forward(self, x):
        return x[:, :1]


def test_discriminator_loss_wiring():
    loss_fn = VQLoss(use_gan=True, disc_start=10)
    loss_fn.discriminator = IdentityLogits()
    x = torch.full((2, 3, 8, 8), 2.0)  # real logit 2 -> hinge 0
    xrec = torch.full((2, 3, 8, 8), -0.5)  # fake logit -0.5 -> hinge 0.5
    loss, logs = loss_fn.discriminator_loss(x, xrec, step=10)
    assert loss.item() == pytest.approx(0.5 * (0.0 + 0.5))
    assert logs["logits_real"].item() == 2.0 and logs["logits_fake"].item() == -0.5
    loss, _ = loss_fn.discriminator_loss(x, xrec, step=9)
    assert loss.item() == 0.0


# ---------------------------------------------------------------- VQLoss


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(z)


def test_gan_off_by_default():
    loss_fn = VQLoss()
    assert loss_fn.discriminator is None and loss_fn.lpips is None
    x, xrec = images(0), images(1).requires_grad_()
    codebook = torch.tensor(0.3)
    loss, logs = loss_fn.generator_loss(x, xrec, codebook, step=10**6)
    assert loss.item() == pytest.approx((x - xrec).abs().mean().item() + 0.3, rel=1e-6)
    assert set(logs) == {"l1", "perceptual", "nll", "codebook", "loss"}
    assert all(not v.requires_grad for v in logs.values())
    loss.backward()
    assert xrec.grad is not None
    with pytest.raises(RuntimeError, match="use_gan"):
        loss_fn.discriminator_loss(x, xrec, step=0)


def test_generator_loss_with_gan():
    torch.manual_seed(0)
    dec = TinyDecoder()
    loss_fn = VQLoss(use_gan=True, disc_start=5, disc_weight=0.75, codebook_weight=2.0, disc_ndf=8)
    x, z = images(0), images(1)
    codebook = torch.tensor(0.1, requires_grad=True)

    # before disc_start: no GAN term, and the discriminator is not even called
    real_disc = loss_fn.discriminator
    loss_fn.discriminator = None
    loss_off, _ = loss_fn.generator_loss(x, dec(z), codebook, step=4, last_layer=dec.conv_out.weight)
    loss_fn.discriminator = real_disc
    loss, logs = loss_fn.generator_loss(x, dec(z), codebook, step=4, last_layer=dec.conv_out.weight)
    assert logs["g_loss"].item() == 0.0 and logs["disc_factor"].item() == 0.0
    assert loss.item() == pytest.approx(loss_off.item())

    # active: loss = nll + d_weight * g + codebook_weight * codebook, with d_weight recomputed by hand
    xrec = dec(z)
    loss, logs = loss_fn.generator_loss(x, xrec, codebook, step=5, last_layer=dec.conv_out.weight)
    assert logs["disc_factor"].item() == 1.0
    nll = (x - xrec).abs().mean()
    g = -real_disc(xrec).mean()
    gn = torch.autograd.grad(nll, dec.conv_out.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, dec.conv_out.weight, retain_graph=True)[0].norm()
    expected_w = 0.75 * (gn / (gg + 1e-4)).clamp(0, 1e4)
    assert logs["d_weight"].item() == pytest.approx(expected_w.item(), rel=1e-4)
    assert logs["g_loss"].item() == pytest.approx(g.item(), rel=1e-5)
    expected = nll + expected_w * g + 2.0 * codebook
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert dec.conv_out.weight.grad is not None and codebook.grad.item() == pytest.approx(2.0)

    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, dec(z), codebook, step=5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"disc_weight": -1.0}, "disc_weight"),
        ({"disc_start": -3}, "disc_start"),
        ({"perceptual_weight": float("nan")}, "perceptual_weight"),
    ],
)
def test_vq_loss_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VQLoss(**kwargs)


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_state():
    torch.manual_seed(0)
    state = LPIPS().state_dict()
    for k in range(5):
        state[f"lin{k}.weight"] = state[f"lin{k}.weight"].abs()  # real LPIPS heads are non-negative
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def lpips_file(lpips_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.safetensors"
    save_file(lpips_state, str(path))
    return path


def test_lpips_layout():
    keys = set(LPIPS().state_dict())
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision VGG16 conv indices
    expected = {f"vgg.features.{i}.{p}" for i in convs for p in ("weight", "bias")}
    expected |= {f"lin{k}.weight" for k in range(5)}
    assert keys == expected


def test_lpips_loads_and_measures(lpips_file, lpips_state):
    model = LPIPS.from_file(lpips_file)
    for k, v in model.state_dict().items():
        assert torch.equal(v, lpips_state[k])
    assert all(not p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    x, y = images(0), images(1).requires_grad_()
    same = model(x, x)
    assert same.shape == (2,) and torch.allclose(same, torch.zeros(2), atol=1e-6)
    d = model(x, y)
    assert torch.all(d > 0)
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_torch_file(lpips_state, tmp_path):
    path = tmp_path / "lpips.pt"
    torch.save({**lpips_state, "vgg.classifier.0.weight": torch.zeros(2)}, path)  # extras ignored
    model = LPIPS.from_file(path)
    assert torch.equal(model.lin4.weight, lpips_state["lin4.weight"])


def test_vq_loss_with_lpips(lpips_file):
    loss_fn = VQLoss(lpips_path=lpips_file, perceptual_weight=0.5)
    x, xrec = images(0), images(1)
    loss, logs = loss_fn.generator_loss(x, xrec, torch.tensor(0.0), step=0)
    p = loss_fn.lpips(x, xrec).mean()
    assert logs["perceptual"].item() == pytest.approx(p.item(), rel=1e-5)
    assert loss.item() == pytest.approx((x - xrec).abs().mean().item() + 0.5 * p.item(), rel=1e-5)


def test_lpips_errors(lpips_state, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match="nope.safetensors.*does not exist"):
        LPIPS.from_file(missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read.*garbage.pt"):
        LPIPS.from_file(garbage)

    nested = tmp_path / "nested.pt"
    torch.save({"weights": dict(lpips_state)}, nested)  # a nested dict that is not a state_dict wrapper
    with pytest.raises(UserError, match="nested.pt.*flat"):
        LPIPS.from_file(nested)

    no_lin = tmp_path / "no_lin.safetensors"
    save_file({k: v for k, v in lpips_state.items() if k != "lin2.weight"}, str(no_lin))
    with pytest.raises(UserError, match="no_lin.safetensors lacks key 'lin2.weight'"):
        LPIPS.from_file(no_lin)

    bad_shape = tmp_path / "bad_shape.safetensors"
    save_file({**lpips_state, "vgg.features.5.weight": torch.zeros(128, 64, 1, 1)}, str(bad_shape))
    with pytest.raises(UserError, match=r"bad_shape.safetensors: key 'vgg.features.5.weight' has shape"):
        LPIPS.from_file(bad_shape)

    with pytest.raises(UserError, match="nope.safetensors"):
        VQLoss(lpips_path=missing)
