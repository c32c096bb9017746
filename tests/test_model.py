"""encdiff.load: the README's example runs as written, and its codes are evaluate.py's."""

import re

import numpy as np
import pytest
import torch

import encdiff
from conftest import ROOT
from encdiff.ckpt_contents import load_trained
from encdiff.data import open_dataset
from encdiff.evaluation import encode_dataset
from encdiff.images import uint8_to_model
from encdiff.runtime import scoring_autocast


def readme_example():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use a trained model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_and_gives_evaluate_pys_codes(straight, tiny_data):
    code = readme_example()
    assert code.count("\n") <= 8
    code = code.replace("steps=50", "steps=2")  # the example's DDIM, fewer steps on the CPU
    code = code.replace('"runs/synth3d"', repr(str(straight))).replace(
        '"synth3d", "data/synth3d.h5"', f'"h5", {str(tiny_data)!r}'
    )
    scope = {}
    exec(code, scope)
    model, images, codes, row = scope["model"], scope["images"], scope["codes"], scope["row"]
    assert codes.shape == (len(images), model.num_tokens) and codes.dtype == np.float32
    assert row.shape == (8, 64, 64, 3) and row.dtype == np.uint8
    # evaluate.py's codes: its loader, its encoding pass, its precision
    trained = load_trained(straight)
    ds = open_dataset("h5", tiny_data)
    expected, _ = encode_dataset(
        trained.encoder, ds.images, trained.cfg.eval.batch_size, trained.device,
        scoring_autocast(trained.cfg, trained.device), trained.channels_last, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(codes, expected[: len(images)])


def test_every_input_form_gives_the_same_codes_and_bad_ones_say_why(straight, tiny_data):
    model = encdiff.load(straight, device="cpu")
    images = open_dataset("h5", tiny_data).images[:5]  # (5, 64, 64, 3) uint8
    codes = model.encode(images)
    np.testing.assert_array_equal(model.encode(torch.from_numpy(images)), codes)
    np.testing.assert_allclose(model.encode(uint8_to_model(torch.from_numpy(images))), codes, atol=1e-5)
    np.testing.assert_allclose(model.encode(images[0]), codes[:1], atol=1e-6)  # one image, no N axis
    recon = model.reconstruct(images[:2], steps=3)
    assert recon.shape == (2, 64, 64, 3) and recon.dtype == np.uint8
    np.testing.assert_array_equal(model.decode(codes[:2], steps=3), recon)
    row = model.traverse(images[0], code=1, values=[-1.0, 0.0, 1.0], steps=3)
    assert row.shape == (3, 64, 64, 3) and not np.array_equal(row[0], row[2])  # the code changes the image
    with pytest.raises(ValueError, match=r"uint8 images must be \(N, 64, 64, 3\), got \(2, 32, 32, 3\)"):
        model.encode(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="float images must be"):
        model.encode(torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="code must be in 0..3"):
        model.traverse(images[0], code=4, values=[0.0])
    with pytest.raises(ValueError, match="traverse takes one image"):
        model.traverse(images[:2], code=0, values=[0.0])
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        model.encode([[1, 2]])
