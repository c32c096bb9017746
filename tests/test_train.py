"""train.py end to end on the CPU: one process, two gloo ranks under torchrun, exact resume (two nodes:
tests/test_multinode.py)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, final, run_train, train_args, train_error, train_in_process, with_straights_vq
from encdiff import ckpt_files as ckpt


def test_one_process_trains_both_stages(tmp_path, tiny_data, straight, capsys, monkeypatch):
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
    # a finished run is skipped on the next invocation, and its plan says so (no steps timed, however
    # short a run the CPU plan would time)

    from encdiff import plan

    monkeypatch.setattr(plan, "PLAN_MIN_STEPS", 1)
    assert train_in_process(*train_args(out, tiny_data)) == 0
    printed = capsys.readouterr().out
    assert "finished already" in printed and "nothing to train" in printed and "timing" not in printed


def test_resume_is_bitwise_exact(tmp_path, tiny_data, straight):
    broken = tmp_path / "broken"
    shutil.copytree(straight, broken)
    (broken / "encdiff" / "ckpt_00000006.safetensors").unlink()  # as if it had stopped after step 3
    run_train(broken, tiny_data)  # resumes from step 3 to step 6
    # the log's rows past step 3 (written before it stopped) were dropped, not written twice
    steps = [json.loads(line)["step"] for line in (broken / "encdiff" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    a, b = final(straight, "encdiff"), final(broken, "encdiff")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_batch_not_divisible_by_world_size(tmp_path, tiny_data):
    r = run_train(tmp_path / "x", tiny_data, "--encdiff.batch_size=7", nproc=2, check=False)
    assert r.returncode != 0 and "not divisible by the world size 2" in r.stderr


def test_missing_data_and_missing_vq_checkpoint(tmp_path, tiny_data, straight, capsys):
    assert "nope.h5" in train_error(*train_args(tmp_path / "a", tmp_path / "nope.h5"))
    assert "no VQ checkpoint" in train_error(*train_args(tmp_path / "b", tiny_data, "--run.stages=encdiff"))
    stage2 = sorted((straight / "encdiff").glob("ckpt_*.safetensors"))[-1]
    capsys.readouterr()
    message = train_error(*train_args(tmp_path / "c", tiny_data, "--run.stages=encdiff", f"--vqvae.ckpt={stage2}"))
    assert "a stage-2 (encdiff) checkpoint; vqvae.ckpt needs a stage-1" in message
    assert "data:" not in capsys.readouterr().out  # refused before the data is opened (or generated)


@pytest.mark.slow
def test_compile_path_trains(tmp_path, tiny_data):
    """perf.compile = default through both stages. Slow on a CPU (Inductor builds C++ kernels:
    minutes), hence not in CI; the models' tests trace the U-Net as one graph in CI instead."""
    out = tmp_path / "run"
    run_train(out, tiny_data, "--vqvae.steps=2", "--encdiff.steps=2", "--run.log_every=1", "--perf.compile=default")
    assert ckpt.list_checkpoints(out / "encdiff")[-1].name == ckpt.checkpoint_name(2)


# ---------------------------------------------------------------------------------------------
# a user's first hour: every mistake one early line, nothing a user made changed


def test_help_lists_every_table(capsys):
    assert train_in_process("--help") == 0
    out = capsys.readouterr().out
    assert "torchrun --nproc_per_node=8" in out
    assert all(f"  [{t}]" in out for t in ("run", "data", "vqvae", "encdiff", "perf", "eval"))
    assert "encdiff.prediction = " in out


def test_a_mistake_is_one_line_on_stderr_and_exit_2():
    """The contract every refusal keeps (the others are checked in this process, train_error)."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: no config given") and "configs/cpu.toml" in r.stderr
    assert r.stderr.count("\n") == 1


def test_a_rejected_command_leaves_the_run_directory_as_it_was(tmp_path, tiny_data, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args, message in (
        ([f"--data.path={tmp_path / 'nope.h5'}"], "nope.h5"),  # missing data
        # resuming stage 1 with another value of a key it fixes: the key, both values, the way out
        (["--vqvae.n_embed=16"], "trained with vqvae.n_embed = 32, the config now says 16; use those values"),
        (["--run.resume=never"], "already holds checkpoints"),
    ):
        assert message in train_error(*train_args(out, tiny_data, *args)), args
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
        (["--run.out_dir={dir}/caf\udce9"], "run.out_dir: is not valid UTF-8 ('"),  # a Latin-1 byte in argv
    ],
)
def test_each_mistake_is_one_early_line(tmp_path, tiny_data, args, message):
    full = tmp_path / "full.h5"
    if any("{full}" in a for a in args):
        import h5py

        with h5py.File(full, "w") as f:  # a synth3d file of the other grid (only its attribute is read)
            f.attrs["grid"] = "full"
    args = [a.format(full=full, dir=tmp_path) for a in args]
    assert message in train_error(*train_args(tmp_path / "run", tiny_data, *args))


# ---------------------------------------------------------------------------------------------
# metrics while it trains


def test_metrics_and_tensorboard_while_training_leave_the_training_bitwise_unchanged(tmp_path, tiny_data, straight):
    quiet, live = straight, with_straights_vq(tmp_path / "live", straight)
    r = run_train(live, tiny_data, "--eval.every=2", "--run.tensorboard=true")
    a, b = final(quiet, "encdiff"), final(live, "encdiff")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (live / "encdiff" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [2, 4, 6]
    for rec in records:
        assert rec["images_seen"] == rec["step"] * 8 and rec["wall_s"] > 0  # smoke.toml: batch 8
        assert 0 <= rec["factor_vae"]["eval_accuracy"] <= 1 and 0 <= rec["dci"]["disentanglement"] <= 1
        assert "discrete_mig" in rec["mig"]
    assert "time to disentanglement (quick FactorVAE >= 0.9 and DCI >= 0.8): not reached in 6 steps" in r.stdout
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
    # TensorBoard's own reader finds log.jsonl's and metrics.jsonl's numbers, and the sample grids
    board = tensorboard_events(live / "tensorboard" / "encdiff")
    for key in ("loss", "lr", "grad_norm", "images_per_s", "skipped_nonfinite", "peak_mem_mb", "wall_s"):
        assert board[key] == [(rec["step"], pytest.approx(rec[key], rel=1e-6)) for rec in log], key
    for metric, key in (("factor_vae", "eval_accuracy"), ("dci", "disentanglement"), ("mig", "discrete_mig")):
        tag = f"metrics/{metric}/{key}"
        assert board[tag] == [(rec["step"], pytest.approx(rec[metric][key], rel=1e-6)) for rec in records], tag
    assert board["images:samples"] == [4, 6]  # run.image_every = 4, and the last step


def tensorboard_events(log_dir):
    """{scalar tag: [(step, value)], "images:TAG": [steps]} as TensorBoard reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out.update({f"images:{tag}": [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]})
    return out


def test_tensorboard_without_the_package_is_one_early_line(tmp_path, tiny_data, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    message = train_error(*train_args(tmp_path / "run", tiny_data, "--run.tensorboard=true"))
    assert message == 'run.tensorboard = true needs the tensorboard package: pip install -e ".[tb]"'
    assert not (tmp_path / "run").exists()


def test_time_to_disentanglement_is_the_first_step_at_both_targets():
    from encdiff.config import build_config
    from encdiff.evaluation import describe_target

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
    from encdiff.evaluation import plot_progress

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot_progress(tmp_path / "p.png", [], []) is False and not (tmp_path / "p.png").exists()


def test_rows_past_the_resumed_step_are_dropped_with_a_torn_line(tmp_path):
    from encdiff.runlog import drop_rows_after

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 8, "lo')  # stopped mid-write
    drop_rows_after(log, 4)
    assert log.read_text() == '{"step": 2}\n{"step": 4}\n' and not list(tmp_path.glob(".*tmp*"))
    drop_rows_after(tmp_path / "none.jsonl", 4)  # no log yet: nothing to do


def test_the_cpu_plan_times_the_stages_batch(monkeypatch):
    """The plan times steps at the stage's per-rank batch (at most PLAN_BATCH): at batch 8 it said 37
    minutes for the CPU preset's 16-minute stage 2 (RESULTS.md)."""
    from encdiff import dist, plan
    from encdiff.config import build_config

    built = []

    class Done(Exception):
        pass

    def build_step(stage, cfg, d, images, vq=None):
        built.append((cfg.encdiff.batch_size, len(images)))
        raise Done

    monkeypatch.setattr(plan, "build_step", build_step)
    one = dist.Dist(0, 0, 1, torch.device("cpu"))
    for batch, expected in ((16, 16), (128, plan.PLAN_BATCH)):
        cfg = build_config([ROOT / "config.toml"], [("encdiff.batch_size", str(batch))])
        with pytest.raises(Done):
            plan.seconds_per_image("encdiff", cfg, one)
        assert built[-1][0] == expected
