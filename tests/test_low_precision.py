"""encdiff/low_precision.py and encdiff/models/layers.py: the bf16 step without per-weight casts.
Under CPU autocast, a model whose weights are cast in one pass trains bitwise as the same model
cast op by op; in fp32 the norms are torch's."""

import pytest
import torch
import torch.nn as nn

from encdiff.low_precision import CastAll, LowPrecisionWeights
from encdiff.models.encdiff import EncDiff, build_diffusion, build_encoder, build_unet, build_vq
from encdiff.models.layers import GroupNorm, LayerNorm
from encdiff.config import build_config
from conftest import SMOKE, perturb


def smoke_models():
    cfg = build_config(SMOKE)
    torch.manual_seed(0)
    e = cfg.encdiff
    model = EncDiff(build_encoder(e), build_unet(e, cfg.vqvae.embed_dim), build_diffusion(e))
    return perturb(model).to(memory_format=torch.channels_last), perturb(build_vq(cfg.vqvae))


def grads_of(loss_fn, model):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["encdiff", "vqvae"])
def test_one_pass_cast_is_the_autocast_step_bitwise(which):
    encdiff, vq = smoke_models()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    if which == "encdiff":
        model = encdiff
        z0, noise = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
        t = torch.tensor([3, 50, 70, 99])
        args = (x.contiguous(memory_format=torch.channels_last), z0, t, noise)

        def loss(m):
            return m(*args)
    else:
        model = vq.train()

        def loss(m):
            xrec, qloss, _ = m(x)
            return (xrec.float() - x).abs().mean() + qloss

    wrapped = LowPrecisionWeights(model, torch.bfloat16)
    assert len(wrapped.names) > 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = grads_of(lambda: loss(model), model)
        low_loss, low = grads_of(lambda: loss(wrapped), model)
    assert torch.equal(ref_loss, low_loss)
    assert ref.keys() == low.keys() and len(ref) == len(list(model.parameters()))
    for name in ref:
        assert low[name].dtype == torch.float32, name
        assert torch.equal(ref[name], low[name]), name


def test_cast_all_keeps_strides_and_passes_no_gradient_for_an_unused_tensor():
    a = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(7, requires_grad=True)
    la, lb = CastAll.apply(torch.bfloat16, a, b)
    assert la.dtype == torch.bfloat16 and la.stride() == a.stride() and torch.equal(la, a.bfloat16())
    (la.float() * 3).sum().backward()
    assert b.grad is None and a.grad.dtype == torch.float32
    assert torch.equal(a.grad, torch.full_like(a, 3.0))


def test_norms_in_fp32_are_torchs():
    x = torch.randn(2, 64, 5, 5)
    gn, ref = GroupNorm(32, 64), nn.GroupNorm(32, 64)
    ln, ref_ln = LayerNorm(64), nn.LayerNorm(64)
    for mine, theirs in ((gn, ref), (ln, ref_ln)):
        perturb(mine), theirs.load_state_dict(mine.state_dict())
    assert torch.equal(gn(x), ref(x))
    h = x.flatten(2).transpose(1, 2)  # (B, L, C)
    assert torch.equal(ln(h), ref_ln(h))


def test_norms_keep_a_bf16_input_in_bf16_under_autocast():
    x = torch.randn(2, 64, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GroupNorm(32, 64)(x), LayerNorm(64)(x.flatten(2).transpose(1, 2))
    assert all(o.dtype == torch.bfloat16 for o in out)
