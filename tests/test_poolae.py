"""The fixed stage 1 (vqvae.kind = "pool"): the latent is the image at 1/f resolution, nothing is
trained, and train.py + evaluate.py run end to end on it."""

import json

import pytest
import torch
from safetensors.torch import load_file

import evaluate
from encdiff.config import build_config
from encdiff.errors import UserError
from encdiff.models.encdiff import build_vq
from encdiff.models.poolae import PoolModel
from conftest import SMOKE, load_script, run_train, train_args, train_in_process


def test_build_vq_gives_a_parameter_free_pool_model():
    v = build_config(SMOKE, [("vqvae.kind", "pool"), ("vqvae.pool_size", "8")]).vqvae
    model = build_vq(v)
    assert type(model) is PoolModel and model.downsample == 8  # its own key, not the VQ's ch_mult
    assert not list(model.parameters()) and not model.state_dict()
    with pytest.raises(UserError, match="vqvae.pool_size"):
        build_config(SMOKE, [("vqvae.kind", "pool"), ("vqvae.pool_size", "5")])


def test_encode_averages_blocks_and_decode_upsamples():
    model = PoolModel(pool_size=4)
    blocks = torch.randn(2, 3, 16, 16)
    x = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # constant 4x4 blocks
    assert torch.allclose(model.encode(x), blocks, atol=1e-6)
    rec, extra, _ = model(x)
    assert rec.shape == x.shape and float(extra) == 0.0
    flat = torch.full((1, 3, 64, 64), 0.25)
    assert torch.allclose(model.decode(model.encode(flat)), flat)


def test_the_latent_must_have_the_images_channels():
    with pytest.raises(ValueError, match="embed_dim"):
        PoolModel(embed_dim=4)
    with pytest.raises(UserError, match="embed_dim"):
        build_config(SMOKE, [("vqvae.kind", "pool"), ("vqvae.embed_dim", "4")])


def test_train_and_evaluate_with_the_pool_stage(tmp_path, tiny_data, capsys):
    """The CPU preset's combination: pool stage + x0 prediction, through train and evaluate."""
    from encdiff.ckpt_contents import load_trained

    out = tmp_path / "run"
    run_train(out, tiny_data, "--vqvae.kind=pool", "--encdiff.prediction=x0")
    vq_files = sorted((out / "vqvae").glob("ckpt_*.safetensors"))
    assert len(vq_files) == 1 and load_file(str(vq_files[0])) == {}  # nothing trained, nothing stored
    assert not (out / "vqvae" / "log.jsonl").exists()
    # a rerun finds both stages done
    assert train_in_process(*train_args(out, tiny_data, "--vqvae.kind=pool", "--encdiff.prediction=x0")) == 0
    assert load_trained(out).diffusion.prediction == "x0"  # read back from the checkpoint's config
    evaluate.main(
        [str(out), "--metrics", "factor_vae", "--quick", "--out", str(tmp_path / "eval"), "--eval.pictures=false"]
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["factor_vae"]["eval_accuracy"] <= 1.0
    # the code-factor diagnostic reads the same run
    assert load_script("benchmarks/code_factor_nmi.py").main([str(out), "--json", str(tmp_path / "nmi.json")]) == 0
    report = json.loads((tmp_path / "nmi.json").read_text())
    assert len(report["nmi"][0]) == len(report["factors"]) and all(0 <= v <= 1.0001 for v in report["best"].values())
