import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import kernels
from conftest import perturb
from encdiff.models.encoder import ConceptEncoder, EncResBlock
from encdiff.models.unet import Attention, SpatialTransformer, UNet, record_cross_attention
from encdiff.models.vqvae import VectorQuantizer, VQModel


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def tiny_unet(**kw):
    args = dict(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,), num_heads=4, context_dim=8
    )
    return UNet(**{**args, **kw})


def tiny_inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.tensor([3, 700, 10, 999][:B]), torch.randn(B, 5, 8, generator=g)


# ---------------------------------------------------------------- parameter counts (the release)


def test_released_parameter_counts():
    assert n_params(VQModel()) == 3_478_078
    assert n_params(ConceptEncoder()) == 1_374_292
    unet = UNet()
    assert n_params(unet) == 37_469_635
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert len(transformers) == 16
    assert sorted({m.proj_in.in_channels for m in transformers}) == [64, 128, 256]


# ---------------------------------------------------------------- VQ autoencoder


def test_vq_shapes_and_decode_quantizes():
    vq = VQModel().eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = vq.encode(x)
    assert z.shape == (1, 3, 16, 16)
    xrec, loss, idx = vq(x)
    assert xrec.shape == x.shape and loss.ndim == 0 and idx.shape == (1, 16, 16)
    assert 0 <= idx.min() and idx.max() < 2048
    torch.testing.assert_close(vq.decode(z), xrec)  # decode snaps z to the codebook first
    assert vq.last_layer_weight() is vq.decoder.conv_out.weight


@pytest.mark.parametrize("legacy", [False, True])
def test_quantizer_nearest_code_loss_and_straight_through(legacy):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 3, beta=0.25, legacy_beta=legacy)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    zq, loss, idx = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)  # (40, 3)
    assert torch.equal(idx.flatten(), torch.cdist(flat, q.codebook.weight.detach()).argmin(1))
    torch.testing.assert_close(zq.detach(), q.codebook.weight.detach()[idx].permute(0, 3, 1, 2))
    # both terms equal ||z - e||^2 in value; they differ in where the gradient goes
    mse = F.mse_loss(z.detach(), zq.detach())
    torch.testing.assert_close(loss.detach(), 1.25 * mse)
    loss.backward(retain_graph=True)
    commit_weight = 1.0 if legacy else 0.25
    torch.testing.assert_close(z.grad, commit_weight * 2 * (z - zq).detach() / z.numel())
    z.grad = None
    w = torch.randn_like(zq)
    (zq * w).sum().backward()  # straight-through: d zq / d z = identity
    torch.testing.assert_close(z.grad, w)


def test_vq_gradients_reach_encoder_and_codebook():
    vq = VQModel(ch_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1, n_embed=64)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    xrec, cb_loss, _ = vq(x)
    ((xrec - x).abs().mean() + cb_loss).backward()
    for p in (vq.encoder.conv_in.weight, vq.quantizer.codebook.weight, vq.decoder.conv_out.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def two_clusters(n, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0]])
    pick = torch.randint(0, 2, (n,), generator=g)
    points = centres[pick] + 0.1 * torch.randn(n, 2, generator=g)
    return points.T.reshape(1, 2, n, 1)  # (1, C=2, H=n, W=1)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_ema_codebook_follows_data_and_restarts_dead_codes(threshold):
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, ema=True, ema_decay=0.8, dead_threshold=threshold).train()
    assert not q.codebook.weight.requires_grad
    for step in range(30):
        q(two_clusters(64, step))
    codes = q.codebook.weight
    dist_to_data = torch.cdist(codes, torch.tensor([[5.0, 5.0], [-5.0, 5.0]])).min(1).values
    if threshold:  # every code was moved onto the data
        assert dist_to_data.max() < 1.0
    else:  # without restarts the unused codes stay near the origin; the used ones follow the data
        assert dist_to_data.min() < 0.5 and dist_to_data.max() > 4.0
    before = codes.clone()
    q.eval()(two_clusters(64, 99))
    assert torch.equal(before, q.codebook.weight)  # eval mode leaves the codebook alone
    with torch.no_grad():
        q.train()(two_clusters(64, 98))
    assert torch.equal(before, q.codebook.weight)  # so does a no-grad re-run (the GAN step's)


def _ema_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial codebook (DDP broadcasts rank 0's)
    q = VectorQuantizer(8, 2, ema=True, ema_decay=0.8, dead_threshold=1.0).train()
    torch.manual_seed(rank)  # each rank draws different restart candidates and data
    for step in range(5):
        q(two_clusters(32, 100 * rank + step))
    torch.save(q.codebook.weight.detach().clone(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ema_codebook_identical_on_all_ranks(tmp_path):
    mp.spawn(_ema_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(a, b)


def test_vq_bad_config():
    with pytest.raises(ValueError):
        VQModel(ema_codebook=True, ema_decay=1.5)
    with pytest.raises(ValueError):
        VQModel(ch_mult=())


# ---------------------------------------------------------------- concept encoder


def test_concept_encoder_layout_is_the_released_one():
    enc = ConceptEncoder()
    kinds = [type(m) for m in enc.features]
    C, B, R = nn.Conv2d, nn.BatchNorm2d, nn.ReLU
    assert kinds == [C, B, R, C, B, R, C, B, C, B, R, EncResBlock, B, R, EncResBlock]  # no ReLU after conv 3
    assert all(m.kernel_size == (4, 4) and m.stride == (2, 2) for m in enc.features if isinstance(m, C))


def test_concept_encoder_shapes_and_eval_is_per_image():
    torch.manual_seed(0)
    enc = ConceptEncoder()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    s, tokens = enc(x)  # training mode: batch statistics, also updates running statistics
    assert s.shape == (4, 20) and tokens.shape == (4, 20, 16)
    enc.eval()
    torch.testing.assert_close(enc.encode(x[1:2]), enc.encode(x)[1:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc(x)[0], enc.encode(x))


def test_concept_encoder_channels_last_flattens_like_nchw():
    torch.manual_seed(0)
    enc = ConceptEncoder().eval()
    x = torch.rand(2, 3, 64, 64)
    ref = enc.encode(x)
    enc = enc.to(memory_format=torch.channels_last)
    torch.testing.assert_close(enc.encode(x.to(memory_format=torch.channels_last)), ref, atol=1e-5, rtol=1e-4)


def test_each_scalar_has_its_own_mlp():
    torch.manual_seed(0)
    mlps = ConceptEncoder().mlps
    s = torch.randn(3, 20)
    tokens = mlps(s)
    # the batched computation equals N separate nn.Linear-style MLPs with the same weights
    for n in (0, 7, 19):
        h = s[:, n : n + 1]
        for i, (w, b) in enumerate(zip(mlps.weights, mlps.biases)):
            h = F.linear(F.elu(h) if i else h, w[n].T, b[n])
        torch.testing.assert_close(tokens[:, n], h)
    s2 = s.clone()
    s2[:, 3] += 1.0
    changed = (mlps(s2) - tokens).abs().amax(dim=(0, 2)) > 0  # (20,)
    assert changed.tolist() == [n == 3 for n in range(20)]


def test_concept_encoder_bad_input():
    with pytest.raises(ValueError):
        ConceptEncoder().encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError):
        ConceptEncoder(image_size=40)


# ---------------------------------------------------------------- U-Net


def test_unet_output_starts_at_zero_and_has_input_shape():
    unet = UNet()
    out = unet(torch.randn(1, 3, 16, 16), torch.tensor([500]), torch.randn(1, 20, 16))
    assert out.shape == (1, 3, 16, 16) and torch.equal(out, torch.zeros_like(out))


def test_every_attention_goes_through_kernels(monkeypatch):
    calls = []

    def spy(q, k, v, heads, *, backend="auto"):
        calls.append((k.shape[1], heads, backend))
        return kernels_attention(q, k, v, heads, backend="math")

    kernels_attention = kernels.attention
    monkeypatch.setattr(kernels, "attention", spy)
    unet = tiny_unet(attn_backend="sdpa")
    x, t, c = tiny_inputs()
    unet(x, t, c)
    n = sum(isinstance(m, SpatialTransformer) for m in unet.modules())
    assert n == 4 and len(calls) == 2 * n  # self + cross per transformer
    assert sorted(lk for lk, _, _ in calls).count(5) == n  # cross-attention keys = the 5 tokens
    assert {(h, b) for _, h, b in calls} == {(4, "sdpa")}


def test_unet_uses_context_per_sample_and_backends_agree():
    unet = perturb(tiny_unet(attn_backend="math")).eval()
    x, t, c = tiny_inputs()
    ref = unet(x, t, c)
    c2 = c.clone()
    c2[1] += 1.0
    out = unet(x, t, c2)
    assert torch.equal(out[0], ref[0]) or torch.allclose(out[0], ref[0], atol=1e-6)
    assert not torch.allclose(out[1], ref[1], atol=1e-4)
    unet.set_attn_backend("sdpa")
    torch.testing.assert_close(unet(x, t, c), ref, atol=1e-5, rtol=1e-4)


def test_record_cross_attention_maps():
    unet = perturb(tiny_unet()).eval()
    x, t, c = tiny_inputs()
    ref = unet(x, t, c)
    with record_cross_attention(unet) as maps:
        out = unet(x, t, c)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # down 8x8, middle 4x4, up 8x8 twice (attention_levels=(0,), channel_mult=(1, 2))
    assert [tuple(m.shape) for m in maps] == [(2, 4, 64, 5), (2, 4, 16, 5), (2, 4, 64, 5), (2, 4, 64, 5)]
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
    unet(x, t, c)
    assert len(maps) == 4  # recording stopped on exit


def test_grad_checkpoint_gives_same_gradients():
    x, t, c = tiny_inputs()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        unet = perturb(tiny_unet(grad_checkpoint=ckpt))
        unet(x, t, c).square().mean().backward()
        grads.append([p.grad for p in unet.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_unet_bf16_autocast_channels_last_forward_backward():
    unet = perturb(tiny_unet())
    x, t, c = tiny_inputs()
    ref = unet(x, t, c).detach()
    unet = unet.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x.to(memory_format=torch.channels_last), t, c)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters())
    assert sum(p.grad.abs().sum() > 0 for p in unet.parameters()) == len(list(unet.parameters()))
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def compile_matches_eager(backend):
    unet = perturb(tiny_unet(channel_mult=(1, 2), attention_levels=())).to(memory_format=torch.channels_last)
    x, t, c = tiny_inputs()
    x = x.to(memory_format=torch.channels_last)
    ref = unet(x, t, c)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    out = torch.compile(unet, fullgraph=True, backend=backend)(x, t, c)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for p, g in zip(unet.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


def test_unet_traces_as_one_graph():
    # dynamo alone: no graph break, no recompilation trap; inductor's C++ build is the slow test below
    compile_matches_eager("eager")


@pytest.mark.slow
def test_unet_inductor_matches_eager():
    compile_matches_eager("inductor")


@pytest.mark.parametrize("kw", [dict(num_heads=5), dict(attention_levels=(2,))])
def test_unet_bad_config(kw):
    with pytest.raises(ValueError):  # a programming error: the config check reaches users first
        tiny_unet(**kw)


def test_unet_triton_backend_is_for_cross_attention_only():
    """Built with "triton" or switched to it: the same per-layer backends (self-attention has up
    to 256 keys, past the short-key kernel)."""

    def backends(unet):
        return [(m.is_cross, m.backend) for m in unet.modules() if isinstance(m, Attention)]

    built = backends(tiny_unet(attn_backend="triton"))
    switched = tiny_unet()
    switched.set_attn_backend("triton")
    assert built == backends(switched)
    assert set(built) == {(True, "triton"), (False, "auto")}


@pytest.mark.gpu
def test_unet_cuda_bf16_channels_last_compiled_matches_math_eager():
    # Two levels of the released widths (head dim 8 at 16x16, 16 at 8x8): the default U-Net's
    # attention sites, at a compile time of seconds rather than the full model's three minutes.
    torch.manual_seed(0)
    unet = UNet(
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_heads=8,
        context_dim=16,
        attn_backend="math",
    )
    unet = perturb(unet).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    t, c = torch.randint(0, 1000, (8,), device="cuda"), torch.randn(8, 20, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = unet(x, t, c).float()
        unet.set_attn_backend("auto")
        out = torch.compile(unet)(x, t, c).float()
        out.square().mean().backward()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters())


def test_the_release_places_dropout_in_the_resblocks_only():
    from encdiff.config import build_config
    from encdiff.models.encdiff import build_unet

    e = build_config([], [("encdiff.dropout", "0.1")]).encdiff
    unet = build_unet(e, 3)
    rates = [(name, m.p) for name, m in unet.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and all((p == 0.1) == (".block." not in name) for name, p in rates)
    assert any(p == 0.1 for _, p in rates) and any(".block." in name for name, _ in rates)


def test_vqvae_legacy_beta_is_the_releases_weighting_by_default():
    from encdiff.config import build_config
    from encdiff.models.encdiff import build_vq

    assert build_vq(build_config().vqvae).quantizer.legacy_beta is True
    assert build_vq(build_config([], [("vqvae.legacy_beta", "false")]).vqvae).quantizer.legacy_beta is False


def test_token_mlp_gradients_have_their_weights_strides():
    """DDP's buckets take each gradient as is only when its strides are its parameter's (else it
    warns 'Grad strides do not match bucket view strides' and copies)."""
    from encdiff.models.encoder import TokenMLPs

    mlps = TokenMLPs(5, 8, (16, 32))
    mlps(torch.randn(3, 5)).square().sum().backward()
    for p in mlps.parameters():
        assert p.grad.stride() == p.stride(), (tuple(p.shape), p.stride(), p.grad.stride())
