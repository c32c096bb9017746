"""The KL autoencoder (vqvae.kind = "kl"): VQModel's interface and encoder/decoder shape, the
Gaussian latent and its KL term, and train.py + evaluate.py end to end on a tiny image folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import evaluate
from conftest import ROOT, SMOKE, train_here
from encdiff.config import build_config
from encdiff.errors import UserError
from encdiff.images import uint8_to_model
from encdiff.models.encdiff import build_vq
from encdiff.models.klvae import KLModel
from encdiff.models.vqvae import Decoder, Encoder, VQModel


def vq_config(**overrides):
    return build_config(SMOKE, [(f"vqvae.{k}", str(v)) for k, v in overrides.items()]).vqvae


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g) * 2 - 1


def test_build_vq_dispatches_on_kind():
    assert type(build_vq(vq_config(kind="vq"))) is VQModel
    kl = build_vq(vq_config(kind="kl", kl_weight=0.5))
    assert type(kl) is KLModel and kl.kl_weight == 0.5
    assert type(kl.encoder) is Encoder and type(kl.decoder) is Decoder  # the VQ model's own classes


def test_same_encoder_and_decoder_as_the_vq_model():
    """Release shapes: only the doubled encoder output (mean and log-variance) and the codebook differ."""
    cfg = build_config([ROOT / "config.toml"]).vqvae
    vq, kl = VQModel(), KLModel()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    c, z, e = 4 * cfg.ch, cfg.z_channels, cfg.embed_dim  # encoder width at the bottom: ch * ch_mult[-1]
    vq_only = cfg.n_embed * e + (c * z * 9 + z) + (z * e + e)  # codebook, encoder conv_out, quant_conv
    kl_only = (c * 2 * z * 9 + 2 * z) + (2 * z * 2 * e + 2 * e)
    assert n(kl) - kl_only == n(vq) - vq_only
    assert n(kl.decoder) == n(vq.decoder) and kl.downsample == vq.downsample == 4


def test_encode_is_the_mean_and_training_samples():
    torch.manual_seed(0)
    model = KLModel(ch=8, ch_mult=(1, 1, 2), enc_res_blocks=1, dec_res_blocks=1)
    x = images()
    mean, logvar = model.posterior(x)
    z = model.encode(x)
    assert z.shape == (4, 3, 16, 16) and torch.equal(z, mean) and logvar.shape == z.shape
    model.eval()
    rec, kl, third = model(x)
    assert third is None and rec.shape == x.shape and torch.allclose(rec, model.decode(z))
    assert torch.equal(model(x)[0], rec)  # the mean: deterministic
    model.train()
    a, b = model(x)[0], model(x)[0]
    assert not torch.allclose(a, b)  # a fresh sample each call
    assert model.last_layer_weight() is model.decoder.conv_out.weight


def test_kl_term_is_the_weighted_gaussian_kl_per_image_value():
    torch.manual_seed(0)
    model = KLModel(ch=8, ch_mult=(1, 1, 2), enc_res_blocks=1, dec_res_blocks=1, kl_weight=0.25).eval()
    x = images()
    mean, logvar = model.posterior(x)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).mean()
    assert torch.allclose(model(x)[1], 0.25 * kl / (3 * 64 * 64), rtol=1e-5)

    with torch.no_grad():  # an enormous log-variance is clamped as LDM does (no inf in the loss)
        model.quant_conv.bias[3:] = 1e4
    _, logvar = model.posterior(x)
    assert torch.all(logvar == 20.0) and torch.isfinite(model(x)[1])


def test_kl_and_reconstruction_gradients_reach_the_encoder():
    torch.manual_seed(0)
    model = KLModel(ch=8, ch_mult=(1, 1, 2), enc_res_blocks=1, dec_res_blocks=1, kl_weight=1.0)
    x = images(2)
    rec, kl, _ = model(x)
    kl.backward(retain_graph=True)
    logvar_grad = model.quant_conv.weight.grad[3:].abs().sum()
    assert logvar_grad > 0 and model.decoder.conv_out.weight.grad is None  # the KL does not touch the decoder
    model.zero_grad()
    (rec - x).abs().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the sampled latent


# ---------------------------------------------------------------------------------------------
# train.py and evaluate.py on a tiny image folder


def write_photos(folder, n=16):
    """Blocky random colour images of assorted sizes (non-square ones get centre-cropped), and one
    unreadable file."""
    folder.mkdir(parents=True)
    rs = np.random.RandomState(0)
    for i in range(n):
        small = rs.randint(0, 256, size=(8, 8, 3)).astype(np.uint8)
        Image.fromarray(small.repeat(10, axis=0).repeat(12 if i % 2 else 10, axis=1)).save(folder / f"{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def write_celeba(root, n=24, num_attributes=5):
    """Aligned-CelebA layout; attribute 0 turns the face red, attribute 1 green."""
    (root / "img_align_celeba").mkdir(parents=True)
    attrs = np.random.RandomState(1).randint(0, 2, size=(n, num_attributes))
    lines = [str(n), " ".join(f"attr_{k}" for k in range(num_attributes))]
    for i, a in enumerate(attrs):
        face = np.full((218, 178, 3), (40 + 180 * a[0], 40 + 180 * a[1], 90), np.uint8)
        Image.fromarray(face).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg")
        lines.append(f"{i + 1:06d}.jpg" + "".join(f" {v:2d}" for v in 2 * a - 1))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return root


def random_inception_file(path):
    """Random Inception weights in the documented layout, He-initialised so that the features do
    not vanish through 90 layers (PyTorch's default init shrinks them to ~0: FID would be 0)."""
    from encdiff.fid import InceptionV3

    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in InceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            v = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        state[k] = v.contiguous()
    state["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid's FID weights have 1008 classes
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kl")
    photos = write_photos(root / "photos")
    out = root / "run"
    r = train_here(
        [
            "--config",
            SMOKE[0],
            "--config",
            SMOKE[1],
            "--data.name=imagefolder",
            f"--data.path={photos}",
            "--vqvae.kind=kl",
            "--vqvae.steps=2",
            "--encdiff.steps=2",
            f"--run.out_dir={out}",
            "--run.log_every=1",
            "--run.ckpt_every=2",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "photos": photos, "out": out, "stderr": r.stderr}


def test_train_py_trains_stage_2_on_the_kl_mean_latent(kl_run):
    out = kl_run["out"]
    assert "skipped 1 of 17 images" in kl_run["stderr"] and "broken.jpg" in kl_run["stderr"]
    for stage in ("vqvae", "encdiff"):
        log = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    ck = load_file(str(out / "encdiff" / "ckpt_00000002.safetensors"))
    assert ck["vq.quant_conv.weight"].shape == (6, 6, 1, 1) and not any("codebook" in k for k in ck)

    # the scale factor is 1 / std of the KL *mean* latent of the first global batch
    from encdiff.data import load_all, open_dataset
    from encdiff.dist import Dist
    from encdiff.steps import BatchOrder

    cfg = build_config(SMOKE, [("vqvae.kind", "kl")])
    vq = build_vq(cfg.vqvae)
    vq.load_state_dict({k[3:]: v for k, v in ck.items() if k.startswith("vq.")})
    with pytest.warns(UserWarning, match="broken.jpg"):  # listed again at every open
        pixels = torch.from_numpy(load_all(open_dataset("imagefolder", kl_run["photos"])))
    cpu = torch.device("cpu")
    first = BatchOrder(len(pixels), cfg.encdiff.batch_size, Dist(0, 0, 1, cpu), cfg.run.seed, cpu).global_indices(0)
    with torch.no_grad():
        z = vq.eval().encode(uint8_to_model(pixels[first]))
    assert torch.allclose(ck["scale_factor"], 1.0 / z.std(), rtol=1e-4)


def test_evaluate_scores_tad_on_celeba_and_fid_from_the_users_weights(kl_run, capsys):
    celeba = write_celeba(kl_run["root"] / "celeba")
    out = kl_run["root"] / "eval"
    common = [
        str(kl_run["out"]),
        "--quick",
        "--out",
        str(out),
        "--data.name=celeba",
        f"--data.path={celeba}",
        "--eval.pictures=false",
    ]
    evaluate.main(common)
    printed = capsys.readouterr().out
    record = json.loads((out / "metrics.json").read_text())
    assert set(record["tad"]) == {"tad", "num_captured"} and "fid" not in record
    assert record["data"]["factor_sizes"] is None and record["data"]["num_images"] == 24
    assert "paper EncDiff (CelebA)" in printed and "0.638" in printed and "tad.num_captured" in printed
    assert "FID skipped" in printed and "--eval.inception_path" in printed and "factor_vae" not in printed

    weights = random_inception_file(kl_run["root"] / "inception.safetensors")
    with pytest.raises(UserError, match="earlier evaluation"):  # never over an earlier result unasked
        evaluate.main([*common, f"--eval.inception_path={weights}", "--fid-samples", "2"])
    evaluate.main([*common, f"--eval.inception_path={weights}", "--fid-samples", "2", "--overwrite"])
    record = json.loads((out / "metrics.json").read_text())
    assert record["fid"]["num_samples"] == 2 and record["fid"]["fid"] > 0 and np.isfinite(record["fid"]["fid"])
    assert "fid.fid" in capsys.readouterr().out
