"""evaluate.py and encdiff.evaluation on a tiny random EncDiff (the smoke preset) and a tiny generic
HDF5 dataset written here: checkpoint loading (EMA layouts), encoding in index order, the picture
helpers, the table, the whole command end to end, and every user error as one line with exit 2."""

import json
import copy
import math
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import evaluate
from conftest import ROOT
from encdiff.ckpt_files import prefixed, save_checkpoint
from encdiff.ckpt_contents import load_trained
from encdiff.config import build_config, from_toml_text, to_toml
from encdiff.errors import UserError
from encdiff.evaluation import encode_dataset, format_table, open_eval_dataset
from encdiff.pictures import attention_maps, decode_tokens, fixed_noise, swap_codes, traversal_codes
from encdiff.metrics import metric_names
from encdiff.images import uint8_to_model
from encdiff.models.encdiff import build_encoder, build_unet, build_vq

SIZES = (2, 3, 4)  # 24 images: every metric's sampler works, and encoding is instant


def write_factor_h5(path, sizes=SIZES):
    """Generic format: background colour by factor 0, square position by factor 1, its colour by factor 2."""
    n = math.prod(sizes)
    images = np.zeros((n, 64, 64, 3), np.uint8)
    for i, (a, b, c) in enumerate(np.ndindex(*sizes)):
        images[i] = (40 + 120 * a, 60, 200 - 100 * a)
        x = 4 + 18 * b
        images[i, 20:40, x : x + 16] = (255 - 50 * c, 40 * c, 128)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.attrs["factor_sizes"] = np.array(sizes, np.int64)
        f.attrs["factor_names"] = [f"f{k}" for k in range(len(sizes))]
    return path


def smoke_config(data_path, **data):
    overrides = [
        ("data.name", "h5"),
        ("data.path", str(data_path)),
        ("run.device", "cpu"),
        ("eval.batch_size", "10"),
        ("eval.ddim_steps", "2"),
        *((f"data.{k}", v) for k, v in data.items()),
    ]
    return build_config([ROOT / "config.toml", ROOT / "configs/smoke.toml"], overrides)


def random_state(module, seed, scale=0.05):
    """The module's state with every float tensor nudged: distinguishable from any other state."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in module.state_dict().items()
    }


def write_checkpoint(path, cfg, ema_all=False, step=8):
    """An EncDiff checkpoint in train.py's format, from tiny randomly initialised models."""
    cfg = copy.deepcopy(cfg)
    cfg.encdiff.ema_all = ema_all  # the stored config says whose EMA the file holds
    torch.manual_seed(0)
    vq, encoder = build_vq(cfg.vqvae), build_encoder(cfg.encdiff)
    unet = build_unet(cfg.encdiff, latent_channels=cfg.vqvae.embed_dim)
    encoder_state, unet_state = random_state(encoder, 1), random_state(unet, 2)
    # the trainer's EMA holds a state dict (buffers included, never updated) of the U-Net, or of
    # the whole EncDiff module with encdiff.ema_all
    ema = random_state(unet, 3)
    if ema_all:
        ema = {**prefixed("unet", ema), **prefixed("encoder", random_state(encoder, 4))}
    tensors = {
        **prefixed("encoder", encoder_state),
        **prefixed("unet", unet_state),
        **prefixed("ema", ema),
        **prefixed("vq", vq.state_dict()),
        "scale_factor": torch.tensor(0.7),
        "rng.noise": torch.Generator().get_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, tensors, step=step, stage="encdiff", config_toml=to_toml(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory holding a checkpoint, and its tiny dataset."""
    root = tmp_path_factory.mktemp("eval")
    data = write_factor_h5(root / "tiny.h5")
    cfg = smoke_config(data)
    ckpt = write_checkpoint(root / "run" / "encdiff" / "ckpt_00000008.safetensors", cfg)
    return {"root": root, "data": data, "cfg": cfg, "ckpt": ckpt, "run_dir": root / "run"}


@pytest.fixture(scope="module")
def trained(run):
    return load_trained(run["run_dir"])


# ---------------------------------------------------------------------------------------------
# config and checkpoint


def test_config_layers_stored_then_files_then_overrides(run, tmp_path):
    stored = to_toml(run["cfg"])
    extra = tmp_path / "eval.toml"
    extra.write_text('[eval]\nbatch_size = 7\n[data]\npath = "from_file.h5"\n')
    cfg = build_config([extra], [("data.path", "from_cli.h5")], base=from_toml_text(stored))
    assert cfg.data.path == "from_cli.h5"
    assert cfg.eval.batch_size == 7
    assert cfg.encdiff.num_tokens == run["cfg"].encdiff.num_tokens != 20  # stored, not the default
    with pytest.raises(UserError, match="eval.nonsense"):
        build_config([], [("eval.nonsense", "1")], base=from_toml_text(stored))


def test_model_tables_always_come_from_the_checkpoint(run):
    # the full default config would describe the default (large) model: its model tables are ignored
    t = load_trained(run["ckpt"], files=[ROOT / "config.toml"], overrides=[("data.path", str(run["data"]))])
    assert t.cfg.encdiff == run["cfg"].encdiff and t.cfg.vqvae == run["cfg"].vqvae
    assert "encdiff.num_tokens" in t.ignored and "vqvae.n_embed" in t.ignored
    assert t.cfg.data.name == "synth3d"  # the other tables do follow the file


def test_load_trained_takes_ema_unet_and_trained_encoder(run, trained):
    tensors = load_file(str(run["ckpt"]))
    assert trained.path == run["ckpt"] and trained.step == 8 and trained.scale == pytest.approx(0.7)
    for k, v in trained.unet.state_dict().items():
        torch.testing.assert_close(v, tensors[f"ema.{k}"])
    for k, v in trained.encoder.state_dict().items():
        torch.testing.assert_close(v, tensors[f"encoder.{k}"])
    assert not trained.encoder.training and not trained.unet.training


def test_load_trained_whole_module_ema_keeps_live_batchnorm_statistics(run, tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.safetensors", run["cfg"], ema_all=True)
    tensors = load_file(str(path))
    t = load_trained(path)
    params = dict(t.encoder.named_parameters())
    for k, v in t.encoder.state_dict().items():
        source = "ema.encoder" if k in params else "encoder"  # BN running statistics stay the trained ones
        torch.testing.assert_close(v, tensors[f"{source}.{k}"])
    for k, v in t.unet.state_dict().items():
        torch.testing.assert_close(v, tensors[f"ema.unet.{k}"])


# ---------------------------------------------------------------------------------------------
# encoding


def test_encode_dataset_is_in_index_order_across_batches(run, trained):
    ds = open_eval_dataset(trained)
    keep = [23, 0, 11, 10]  # across the batch boundaries of batch size 10
    codes, kept = encode_dataset(trained.encoder, ds.images, 10, trained.device, keep=keep, progress=False)
    images = ds.images[np.arange(len(ds))]
    with torch.no_grad():
        expected = trained.encoder.encode(uint8_to_model(torch.from_numpy(images))).numpy()
    assert codes.shape == (math.prod(SIZES), run["cfg"].encdiff.num_tokens) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(kept, images[keep])
    assert codes.std(0).min() > 0  # the images differ, so must the codes


# ---------------------------------------------------------------------------------------------
# pictures


def test_traversal_codes_change_one_scalar_per_row():
    code = torch.tensor([1.0, 2.0, 3.0])
    low, high = torch.tensor([-1.0, 0.0, 5.0]), torch.tensor([1.0, 4.0, 9.0])
    codes = traversal_codes(code, low, high, 5).reshape(3, 5, 3)  # (N * values, N) -> (N, values, N)
    for i in range(3):
        torch.testing.assert_close(codes[i, :, i], torch.linspace(low[i].item(), high[i].item(), 5))
        others = [j for j in range(3) if j != i]
        torch.testing.assert_close(codes[i][:, others], code[others].expand(5, 2))


def test_swap_codes_take_one_scalar_from_the_partner():
    a, b = torch.arange(6.0).reshape(2, 3), -torch.arange(1.0, 7.0).reshape(2, 3)
    codes = swap_codes(a, b)  # (P, N + 1, N)
    assert codes.shape == (2, 4, 3)
    torch.testing.assert_close(codes[:, 0], a)
    for i in range(3):
        expected = a.clone()
        expected[:, i] = b[:, i]
        torch.testing.assert_close(codes[:, 1 + i], expected)


def test_fixed_noise_samples_differ_only_through_their_tokens(trained):
    code = torch.randn(trained.encoder.num_tokens)
    sweep = traversal_codes(code, code - 3, code + 3, 3)  # (N * 3, N)
    same = code.expand(3, -1)  # three identical codes
    tokens = trained.encoder.mlps(torch.cat([same, sweep]))
    images = decode_tokens(trained, tokens, steps=2, x_T=fixed_noise(trained, len(tokens), seed=0))
    torch.testing.assert_close(images[0], images[1])
    torch.testing.assert_close(images[0], images[2])
    assert (images[3] - images[5]).abs().max() > 1e-4  # the traversed scalar does change the sample


def test_attention_maps_are_per_token_distributions(trained):
    x = uint8_to_model(torch.from_numpy(open_eval_dataset(trained).images[np.arange(3)]))
    _, tokens = trained.encoder(x)
    maps = attention_maps(trained, tokens, steps=2, x_T=fixed_noise(trained, 3, seed=0))
    n, side = trained.encoder.num_tokens, trained.latent_shape[1]
    assert maps.shape == (3, n, side, side)  # the highest attended resolution is the latent's
    torch.testing.assert_close(maps.sum(1), torch.ones(3, side, side))  # softmax over tokens, averaged


# ---------------------------------------------------------------------------------------------
# table


def test_table_shows_paper_values_for_the_papers_datasets():
    results = {"factor_vae": {"eval_accuracy": 0.5, "num_active_dims": 3}, "dci": {"disentanglement": 0.25}}
    shapes = format_table(
        results,
        {"factor_vae": {"eval_accuracy": 0.125, "num_active_dims": 1}, "dci": {"disentanglement": 0.0625}},
        "shapes3d",
    )
    assert "paper EncDiff (Shapes3D)" in shapes and "random" in shapes
    row = next(line for line in shapes.splitlines() if line.startswith("factor_vae.eval_accuracy"))
    assert row.split()[1:] == ["0.500", "0.125", "0.999"]
    assert next(line for line in shapes.splitlines() if line.startswith("dci.disentanglement")).split()[-1] == "0.969"
    assert "reference only" in format_table(results, None, "synth3d")
    plain = format_table(results, None, "h5")
    assert "paper" not in plain and "random" not in plain


# ---------------------------------------------------------------------------------------------
# the command


def png_size(path):
    with Image.open(path) as im:
        assert np.asarray(im).std() > 1, f"{path} is blank"
        return im.size


def test_evaluate_end_to_end(run, tmp_path, capsys):
    copy = shutil.copy(run["data"], tmp_path / "copy.h5")  # --data.path points at another copy
    out = tmp_path / "out"
    evaluate.main([str(run["run_dir"]), "--quick", "--out", str(out), f"--data.path={copy}"])
    printed = capsys.readouterr().out
    record = json.loads((out / "metrics.json").read_text())
    names = metric_names()
    assert set(record) == {
        *names,
        "data",
        "step",
        "seed",
        "quick",
        "checkpoint",
        "baseline",
        "degenerate",
        "options",
        "table",
    }
    for name in names:
        assert record[name] and all(isinstance(v, (int, float)) for v in record[name].values())
        assert all(f"{name}.{key}" in printed for key in record[name])
    assert record["step"] == 8 and record["seed"] == 0 and record["baseline"] is None and record["quick"] is True
    assert record["data"]["factor_sizes"] == list(SIZES) and record["data"]["path"] == str(copy)
    assert record["checkpoint"] == str(run["ckpt"])
    # every wait says what it waits for: the metrics one by one, then the pictures' DDIM steps
    assert "scoring factor_vae, dci" in printed and "  factor_vae: " in printed and "  dci: " in printed
    assert "FID skipped" in printed  # a full evaluation says how to get FID; one with --metrics does not

    n = run["cfg"].encdiff.num_tokens
    shown, values = 4, 5  # --quick: 4 images, 5 values per traversal
    # (columns, rows) of 64 px cells; labels and padding add a margin
    cells = {
        "reconstructions": (shown, 3),
        "traversal": (values, n),
        "swap": (n + 3, shown),
        "attention": (n + 2, shown),  # input, the tokens, the colour scale
    }
    for name, (cols, rows) in cells.items():
        w, h = png_size(out / f"{name}.png")
        scale = 2 if name == "reconstructions" else 1
        assert cols * 64 * scale <= w <= (cols * 66 + 150) * scale, name
        assert rows * 64 * scale <= h <= (rows * 66 + 30) * scale, name


def test_a_degenerate_score_is_marked_with_its_reason():
    from encdiff.evaluation import degenerate_scores

    results = {"factor_vae": {"eval_accuracy": 0.0, "num_active_dims": 0}, "dci": {"disentanglement": 0.0}}
    flat = np.full((24, 4), 0.3) + 1e-4 * np.random.RandomState(0).randn(24, 4)
    notes = degenerate_scores(results, flat)
    assert set(notes) == {"factor_vae", "dci"} and "no code varies" in notes["dci"]
    table = format_table(results, None, "h5", notes)
    assert "factor_vae.eval_accuracy (!)" in table and table.splitlines()[-1].startswith("(!) dci: no code varies")
    varied = np.random.RandomState(0).randn(24, 4)
    assert degenerate_scores(results, varied) == {
        "factor_vae": "0 active codes (std >= 0.05): the score is 0 by definition"
    }
    assert degenerate_scores({"dci": {"disentanglement": 0.4}}, varied) == {}


def test_each_kind_of_evaluation_has_its_own_folder_and_none_is_replaced(run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    common = [str(run_dir), f"--data.path={run['data']}", "--eval.pictures=false"]
    evaluate.main([*common, "--metrics", "mig", "--quick"])
    evaluate.main([*common, "--metrics", "mig"])  # the full evaluation beside the quick one
    folders = sorted(p.name for p in (run_dir / "encdiff").glob("eval_*"))
    assert folders == ["eval_step00000008_h5_full-counts", "eval_step00000008_h5_quick-counts"]
    quick = run_dir / "encdiff" / folders[1] / "metrics.json"
    before = quick.read_text()
    table = json.loads(before)["table"]
    capsys.readouterr()
    # the same evaluation again is up to date: the stored table, exit status 0, nothing rewritten
    assert evaluate.main([*common, "--metrics", "mig", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and table in out and "encoded" not in out
    # another evaluation into the same folder replaces nothing
    with pytest.raises(UserError, match="earlier evaluation's metrics.json"):
        evaluate.main([*common, "--metrics", "dci", "--quick"])
    assert quick.read_text() == before


def test_evaluate_random_baseline(run, tmp_path, capsys):
    out = tmp_path / "out"
    evaluate.main(
        [str(run["ckpt"]), "--quick", "--out", str(out), "--metrics", "factor_vae,mig", "--eval.pictures=false"]
    )
    record = json.loads((out / "metrics.json").read_text())
    evaluate.main(
        [
            str(run["ckpt"]),
            "--quick",
            "--out",
            str(out),
            "--metrics",
            "factor_vae,mig",
            "--eval.pictures=false",
            "--baseline",
            "random",
            "--overwrite",
        ]
    )
    with_floor = json.loads((out / "metrics.json").read_text())
    assert set(with_floor["baseline"]) == {"encoder", "seed", "factor_vae", "mig"}
    assert with_floor["mig"] == record["mig"]  # the trained encoder's numbers do not move
    assert with_floor["baseline"]["mig"] != record["mig"]  # another encoder, other codes
    assert "random enc." in capsys.readouterr().out
    assert not list(out.glob("*.png"))


@pytest.fixture(scope="module")
def bad_inputs(run):
    """Each bad input -> (evaluate.py's arguments, the message expected)."""
    root = run["root"] / "bad"
    root.mkdir()
    corrupt = root / "corrupt.safetensors"
    data = bytearray(run["ckpt"].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    corrupt.write_bytes(bytes(data))
    # a model trained on the small synth3d grid, pointed at a file with another factor grid
    synth = write_checkpoint(root / "synth.safetensors", smoke_config(run["data"], name="synth3d", grid="small"))
    return {
        "missing checkpoint": ([root / "nope.safetensors"], "checkpoint not found"),
        "corrupt checkpoint": ([corrupt], "corrupt checkpoint"),
        "factor sizes": ([synth], "factor sizes (2, 3, 4) do not match"),
        "unknown metric": ([run["ckpt"], "--metrics", "factor_vae,dcii"], "unknown metric 'dcii'"),
        "missing data": ([synth, f"--data.path={root / 'gone.h5'}"], "encdiff.data.synth --out"),
    }


@pytest.mark.parametrize(
    "case", ["missing checkpoint", "corrupt checkpoint", "factor sizes", "unknown metric", "missing data"]
)
def test_bad_input_is_one_line(bad_inputs, case, tmp_path):
    args, message = bad_inputs[case]
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        evaluate.main([*map(str, args), "--quick", "--out", str(out)])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (out / "metrics.json").exists()
    if case == "missing data":  # the command that recreates what the run trained on: its grid
        assert str(e.value).endswith("--grid small")


def test_a_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path):
    """The contract every refusal of evaluate.py keeps (the others are checked in this process)."""
    cmd = [sys.executable, str(ROOT / "evaluate.py"), str(tmp_path / "nope.safetensors"), "--quick"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert "checkpoint not found" in r.stderr


def test_dataset_whose_images_do_not_fill_its_factor_grid_is_refused(run, tmp_path):
    bad = write_factor_h5(tmp_path / "bad.h5")
    with h5py.File(bad, "a") as f:
        f.attrs["factor_sizes"] = np.array([2, 3, 5], np.int64)
    with pytest.raises(UserError, match="need 30"):
        open_eval_dataset(load_trained(run["ckpt"], overrides=[("data.path", str(bad))]))


@pytest.mark.slow
def test_evaluate_a_checkpoint_written_by_train_py(run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            str(ROOT / "config.toml"),
            "--config",
            str(ROOT / "configs/smoke.toml"),
            f"--run.out_dir={out}",
            "--data.name=h5",
            f"--data.path={run['data']}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=1200,
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), str(out), "--quick", "--baseline", "random"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "encdiff" / "metrics.json").read_text())
    assert record["step"] == 8 and set(metric_names()) <= set(record) and record["baseline"]["encoder"] == "random"
    assert all(
        (out / "encdiff" / f"{name}.png").is_file() for name in ("reconstructions", "traversal", "swap", "attention")
    )


def test_what_evaluate_says_around_the_table(run, tmp_path, capsys):
    """No FID notice when --metrics chose the metrics, the switch for the pictures when they are
    off, the DDIM bar when they are on, and a run that has not reached its last step says so."""
    unfinished = write_checkpoint(tmp_path / "run" / "encdiff" / "ckpt_00000004.safetensors", run["cfg"], step=4)
    common = [str(unfinished), f"--data.path={run['data']}", "--metrics", "mig", "--quick"]
    evaluate.main([*common, "--out", str(tmp_path / "a"), "--eval.pictures=false"])
    out = capsys.readouterr().out
    assert "step 4 of 8" in out and "FID skipped" not in out
    assert "pictures: off (eval.pictures = false in this run's config); --eval.pictures=true draws them" in out
    evaluate.main([*common, "--out", str(tmp_path / "b")])
    assert "pictures: DDIM steps" in capsys.readouterr().err


def test_help_names_config_files_and_overrides(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert "--config FILE" in usage and "--section.key=value" in usage


def test_the_reconstruction_row_names_the_first_stage(trained, monkeypatch):
    from encdiff import pictures

    seen = []
    monkeypatch.setattr(pictures, "labelled_grid", lambda rows, ncol, row_labels=(), **kw: seen.append(row_labels))
    monkeypatch.setattr(pictures, "save_png", lambda *a, **kw: None)
    x = uint8_to_model(torch.from_numpy(open_eval_dataset(trained).images[np.arange(2)]))
    for kind in ("vq", "pool"):
        t = copy.copy(trained)
        t.cfg = copy.deepcopy(trained.cfg)
        t.cfg.vqvae.kind = kind
        pictures.save_reconstructions(t, x, None, steps=1, seed=0)
    assert [labels[1] for labels in seen] == ["VQ", "pool"]
