"""train.py end to end on the CPU: one process, two gloo ranks under torchrun, exact resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from encdiff import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # a tiny model on a tiny generic-h5 dataset: seconds per run
    "--config",
    str(ROOT / "config.toml"),
    "--config",
    str(ROOT / "configs" / "smoke.toml"),
    "--vqvae.steps=4",
    "--encdiff.steps=6",
    "--run.ckpt_every=3",
    "--run.log_every=2",
    "--run.image_every=4",
    "--vqvae.ch_mult=[1,1,2]",
    "--vqvae.n_embed=32",
    "--encdiff.model_channels=32",
    "--encdiff.channel_mult=[1,2]",
    "--encdiff.encoder_ch=16",
    "--eval.batch_size=32",
]


def write_tiny_h5(path, sizes=(4, 4, 4)):
    """Smooth random 64x64 images in the generic ground-truth format."""
    n = int(np.prod(sizes))
    rs = np.random.RandomState(0)
    small = rs.randint(0, 256, size=(n, 8, 8, 3)).astype(np.uint8)
    images = small.repeat(8, axis=1).repeat(8, axis=2)  # (n, 64, 64, 3)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.attrs["factor_sizes"] = np.array(sizes)
        f.attrs["factor_names"] = [f"f{i}" for i in range(len(sizes))]
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_h5(tmp_path_factory.mktemp("data") / "tiny.h5")


def run_train(out_dir, data, *extra, nproc=1, check=True):
    args = [*TINY, f"--run.out_dir={out_dir}", "--data.name=h5", f"--data.path={data}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "train.py"),
            *args,
        ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def final(out_dir, stage):
    files = sorted((Path(out_dir) / stage).glob("ckpt_*.safetensors"))
    return load_file(str(files[-1]))


def weights(t):
    return {k: v for k, v in t.items() if k.split(".")[0] in ("model", "encoder", "unet", "ema")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_data):
    """One uninterrupted run of TINY, shared by the tests that compare with it (not to be changed)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train(out, tiny_data)
    return out


def test_one_process_trains_both_stages(tmp_path, tiny_data, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for stage, steps in (("vqvae", 4), ("encdiff", 6)):
        log = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
        assert [rec["step"] for rec in log] == list(range(2, steps + 1, 2))
        assert all(np.isfinite(rec["loss"]) and rec["images_per_s"] > 0 and rec["peak_mem_mb"] > 0 for rec in log)
        assert len(list((out / stage).glob("ckpt_*.safetensors"))) == 2  # keep_last
    assert list((out / "encdiff").glob("samples_*.png")) and list((out / "vqvae").glob("recon_*.png"))
    ck = final(out, "encdiff")
    assert any(k.startswith("vq.") for k in ck) and any(k.startswith("ema.") for k in ck) and "scale_factor" in ck
    # a finished run is skipped on the next invocation
    r = run_train(out, tiny_data)
    assert "finished already" in r.stdout


def test_resume_is_bitwise_exact(tmp_path, tiny_data, straight):
    broken = tmp_path / "broken"
    run_train(broken, tiny_data, "--encdiff.steps=3")  # stops after the step-3 checkpoint
    run_train(broken, tiny_data)  # resumes from step 3 to step 6
    a, b = final(straight, "encdiff"), final(broken, "encdiff")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_ranks_equal_one_rank(tmp_path, tiny_data, straight):
    one, two = straight, tmp_path / "two"
    run_train(two, tiny_data, nproc=2)
    # Adam's first updates are about lr * sign(grad): a gradient within float noise of zero may flip
    # sign, so a handful of elements can differ by up to 2 lr per step. Everything else must agree.
    for stage, lr, steps in (("vqvae", 1.152e-3, 4), ("encdiff", 2.56e-4, 6)):
        a, b = weights(final(one, stage)), weights(final(two, stage))
        diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
        assert (diffs > 1e-5).float().mean() < 0.005, stage
        assert diffs.max() <= 2 * lr * steps, stage


def test_batch_not_divisible_by_world_size(tmp_path, tiny_data):
    r = run_train(tmp_path / "x", tiny_data, "--encdiff.batch_size=7", nproc=2, check=False)
    assert r.returncode != 0 and "not divisible by the world size 2" in r.stderr


def test_missing_data_and_missing_vq_checkpoint(tmp_path, tiny_data, straight):
    r = run_train(tmp_path / "a", tmp_path / "nope.h5", check=False)
    assert r.returncode == 2 and "nope.h5" in r.stderr
    r = run_train(tmp_path / "b", tiny_data, "--run.stages=encdiff", check=False)
    assert r.returncode == 2 and "no VQ checkpoint" in r.stderr
    stage2 = sorted((straight / "encdiff").glob("ckpt_*.safetensors"))[-1]
    r = run_train(tmp_path / "c", tiny_data, "--run.stages=encdiff", f"--vqvae.ckpt={stage2}", check=False)
    assert r.returncode == 2 and "a stage-2 (encdiff) checkpoint; vqvae.ckpt needs a stage-1" in r.stderr
    assert "data:" not in r.stdout  # refused before the data is opened (or generated)


def test_two_launchers_on_one_host_act_as_two_nodes(tmp_path, tiny_data):
    """torchrun --nnodes=2 with a c10d rendezvous on 127.0.0.1, one process per 'node'."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = [*TINY, f"--run.out_dir={out}", "--data.name=h5", f"--data.path={tiny_data}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=twonodes",
                str(ROOT / "train.py"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "world size 2" in outputs[0][0] + outputs[1][0]
    assert ckpt.list_checkpoints(out / "encdiff")[-1].name == ckpt.checkpoint_name(6)


@pytest.mark.slow
def test_compile_path_trains(tmp_path, tiny_data):
    """perf.compile = default through both stages. Slow on a CPU (Inductor builds C++ kernels:
    minutes), hence not in CI; the models' tests trace the U-Net as one graph in CI instead."""
    out = tmp_path / "run"
    run_train(out, tiny_data, "--vqvae.steps=2", "--encdiff.steps=2", "--run.log_every=1", "--perf.compile=default")
    assert ckpt.list_checkpoints(out / "encdiff")[-1].name == ckpt.checkpoint_name(2)


# ---------------------------------------------------------------------------------------------
# a user's first hour: every mistake one early line, nothing a user made changed


def test_help_lists_every_table_and_no_arguments_says_what_to_give():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "torchrun --nproc_per_node=8" in r.stdout
    assert all(f"  [{t}]" in r.stdout for t in ("run", "data", "vqvae", "encdiff", "perf", "eval"))
    assert "encdiff.prediction = " in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "train.py")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: no config given") and "configs/cpu.toml" in r.stderr


def test_a_rejected_command_leaves_the_run_directory_as_it_was(tmp_path, tiny_data):
    out = tmp_path / "run"
    run_train(out, tiny_data, "--run.stages=vqvae")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args, message in (
        ([f"--data.path={tmp_path / 'nope.h5'}"], "nope.h5"),  # missing data
        # resuming stage 1 with another value of a key it fixes: the key, both values, the way out
        (["--vqvae.n_embed=16"], "trained with vqvae.n_embed = 32, the config now says 16; use those values"),
        (["--run.resume=never"], "already holds checkpoints"),
    ):
        r = run_train(out, tiny_data, *args, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr[-2000:])
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run.device=cuda"], "CUDA is not available here"),
        (["--perf.attention=xformers"], "perf.attention = 'xformers' cannot run here: xformers"),
        (["--data.name=synth3d", "--data.grid=small", "--data.path={full}"], "holds the 'full' synth3d grid"),
        (["--data.path={dir}"], "is a directory"),
        (["--encdiff.steps=100000", "--run.max_hours=0.001"], "add --config configs/cpu.toml"),  # timed steps
    ],
)
def test_each_mistake_is_one_early_line(tmp_path, tiny_data, args, message):
    full = tmp_path / "full.h5"
    if any("{full}" in a for a in args):
        import h5py

        with h5py.File(full, "w") as f:  # a synth3d file of the other grid (only its attribute is read)
            f.attrs["grid"] = "full"
    args = [a.format(full=full, dir=tmp_path) for a in args]
    r = run_train(tmp_path / "run", tiny_data, *args, check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert message in r.stderr


# ---------------------------------------------------------------------------------------------
# metrics while it trains


def test_metrics_while_training_leave_the_training_bitwise_unchanged(tmp_path, tiny_data, straight):
    quiet, live = straight, tmp_path / "live"
    r = run_train(live, tiny_data, "--eval.every=2")
    a, b = final(quiet, "encdiff"), final(live, "encdiff")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (live / "encdiff" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [2, 4, 6]
    for rec in records:
        assert rec["images_seen"] == rec["step"] * 8 and rec["wall_s"] > 0  # smoke.toml: batch 8
        assert 0 <= rec["factor_vae"]["eval_accuracy"] <= 1 and 0 <= rec["dci"]["disentanglement"] <= 1
        assert "discrete_mig" in rec["mig"]
    assert "time to disentanglement (FactorVAE >= 0.9 and DCI >= 0.8): not reached in 6 steps" in r.stdout
    assert (live / "progress.png").stat().st_size > 1000 and not (quiet / "progress.png").exists()
    log = [json.loads(line) for line in (live / "encdiff" / "log.jsonl").read_text().splitlines()]
    assert all(rec["wall_s"] > 0 for rec in log)
    # the same curve afterwards, from the kept checkpoints
    import evaluate

    evaluate.main([str(live), "--every-checkpoint"])
    again = [
        json.loads(line) for line in (live / "encdiff" / "eval_checkpoints" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [rec["step"] for rec in again] == [3, 6] and all("dci" in rec for rec in again)


def test_time_to_disentanglement_is_the_first_step_at_both_targets():
    from encdiff.config import build_config
    from encdiff.progress import describe_target

    def rec(step, fv, dci):
        return {
            "step": step,
            "wall_s": 60.0 * step,
            "images_seen": 128 * step,
            "factor_vae": {"eval_accuracy": fv},
            "dci": {"disentanglement": dci},
        }

    ev = build_config().eval
    records = [rec(1, 0.95, 0.5), rec(2, 0.91, 0.81), rec(3, 0.99, 0.9)]
    assert describe_target(records, ev).endswith("step 2, 2.0 min, 256 images (FactorVAE 0.910, DCI 0.810)")
    assert "not reached; best at step 3" in describe_target([rec(2, 0.5, 0.1), rec(3, 0.6, 0.2)], ev)


def test_progress_png_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    from encdiff.progress import plot_progress

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot_progress(tmp_path / "p.png", [], []) is False and not (tmp_path / "p.png").exists()
