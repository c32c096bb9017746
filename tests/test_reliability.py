"""Fault injection: preemption signals, killed workers, corrupt checkpoints, non-finite losses,
unwritable output, bad input. Every test runs the real train.py in subprocesses on the CPU."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, final, run_train, train_args, train_error, with_straights_vq
from encdiff import steps as step_module

LONG_STEPS = 12
LONG = [f"--encdiff.steps={LONG_STEPS}", "--run.ckpt_every=4", "--run.stop_check_every=1"]


def train_cmd(out_dir, data, *extra, nproc=1, restarts=0):
    args = train_args(out_dir, data, *extra)
    if nproc == 1:
        return [sys.executable, str(ROOT / "train.py"), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
        str(ROOT / "train.py"),
        *args,
    ]


_started = []


def start(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    _started.append(proc)
    return proc


@pytest.fixture(autouse=True)
def stop_what_a_failed_test_left_running():
    """A test that fails while its training runs must not leave it training (torchrun's workers
    live in their own sessions) and take the cores from the tests after it. SIGTERM: torchrun
    passes it on, train.py checkpoints and exits."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def wait_for_log_step(out_dir, stage, min_step, proc, timeout=300):
    log = Path(out_dir) / stage / "log.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists():
            steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]
            if steps and steps[-1] >= min_step:
                return steps[-1]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"no step {min_step} in {log}")


def workers_of(agent_pid):
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(pid)
    return out


def ckpt_steps(out_dir, stage):
    return sorted(int(p.stem.split("_")[1]) for p in (Path(out_dir) / stage).glob("ckpt_*.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_data, straight):
    out = with_straights_vq(tmp_path_factory.mktemp("straight") / "run", straight)
    run_train(out, tiny_data, *LONG)
    return out


def test_sigterm_then_resume_is_bitwise_equal(tmp_path, tiny_data, straight, straight_run):
    out = with_straights_vq(tmp_path / "run", straight)
    proc = start(train_cmd(out, tiny_data, *LONG))
    wait_for_log_step(out, "encdiff", 2, proc)
    time.sleep(random.uniform(0, 1.0))  # a random step
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]  # not 0: `train.py && evaluate.py` stops
    assert "stopped by SIGTERM" in stdout
    stopped_at = ckpt_steps(out, "encdiff")[-1]
    assert stopped_at < LONG_STEPS
    run_train(out, tiny_data, *LONG)
    a, b = final(straight_run, "encdiff"), final(out, "encdiff")
    assert ckpt_steps(out, "encdiff")[-1] == LONG_STEPS
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, tiny_data, straight):
    out = with_straights_vq(tmp_path / "run", straight)
    proc = start(train_cmd(out, tiny_data, *LONG, nproc=2))
    wait_for_log_step(out, "encdiff", 2, proc)
    workers = workers_of(proc.pid)
    os.kill(workers[1], signal.SIGTERM)  # only rank 1 hears it; rank 0 must stop at the same step
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0, stderr[-3000:]  # the workers exit 143: torchrun reports the job as stopped
    assert "exitcode  : 143" in stderr and "stopped by" in stdout and ckpt_steps(out, "encdiff")[-1] < LONG_STEPS
    r = run_train(out, tiny_data, *LONG, nproc=2)
    assert ckpt_steps(out, "encdiff")[-1] == LONG_STEPS, r.stdout[-2000:]


def test_a_signal_to_torchrun_ends_the_job_without_a_restart(tmp_path, tiny_data, straight):
    out = with_straights_vq(tmp_path / "run", straight)
    proc = start(train_cmd(out, tiny_data, *LONG, nproc=2, restarts=2))
    wait_for_log_step(out, "encdiff", 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0 and stdout.count("stopped by") == 1, stderr[-3000:]
    assert "Restarting" not in stderr and ckpt_steps(out, "encdiff")[-1] < LONG_STEPS


# SIGINT and SIGTERM share one handler: CI tries SIGTERM, -m slow both
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])
def test_a_signal_while_the_data_is_generated_stops_it_and_leaves_no_file(tmp_path, sig):
    data = tmp_path / "data" / "synth3d.h5"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        f"--run.out_dir={tmp_path / 'run'}",
        f"--data.path={data}",
        "--data.grid=full",
    ]
    proc = start(cmd)
    t0 = time.time()
    while not list(data.parent.glob(".synth3d.h5.tmp-*")):  # the images are being written
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert f"data.path {data} does not exist: generating the bundled synth3d there" in stdout
    assert time.time() - t0 < 15, "the generation did not stop at once"
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert f"stopped by {signal.Signals(sig).name} before training started" in stderr
    assert list(data.parent.iterdir()) == [] and not (tmp_path / "run" / "config.toml").exists()


def test_a_rank_whose_init_hangs_exits_for_torchrun_to_restart():
    """Rank 0 of a world of 2 whose peer never comes: init_process_group would wait for it (30
    minutes by default); the watchdog ends the process with INIT_HUNG_EXIT after run.init_timeout."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "0",
    }  # rank 0 binds any free port: no other process can take it first
    code = "from encdiff import dist; dist.setup('cpu', init_timeout=2); print('initialised')"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    from encdiff.dist import INIT_HUNG_EXIT

    assert r.returncode == INIT_HUNG_EXIT, r.stderr[-2000:]
    assert "initialised" not in r.stdout and "run.init_timeout" in r.stderr
    assert time.time() - t0 < 60


def test_only_a_single_node_restart_gets_a_store_per_attempt(monkeypatch):
    from encdiff import dist

    for env, expect_none in (
        ({}, True),
        ({"TORCHELASTIC_RESTART_COUNT": "0", "GROUP_WORLD_SIZE": "1"}, True),
        ({"TORCHELASTIC_RESTART_COUNT": "2", "GROUP_WORLD_SIZE": "2"}, True),
    ):
        for key in ("TORCHELASTIC_RESTART_COUNT", "GROUP_WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert (dist.attempt_store() is None) == expect_none


def test_sigkill_worker_restarts_and_finishes(tmp_path, tiny_data, straight):
    """SIGKILL one of two gloo workers under torchrun --max-restarts: the group restarts and resumes
    from the last checkpoint. torchrun keeps one store for all attempts, and without a prefix per
    attempt (dist.attempt_store) a restarted rank read its dead peer's gloo address in 3 of 12 runs
    and the restarts ran out; with it, 11 of 11 runs passed (2026-11-28, 2 cores)."""
    out = with_straights_vq(tmp_path / "run", straight)
    proc = start(train_cmd(out, tiny_data, *LONG, "--run.init_timeout=30", nproc=2, restarts=1))
    wait_for_log_step(out, "encdiff", 6, proc)  # past the first stage-2 checkpoint (step 4)
    os.kill(workers_of(proc.pid)[1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert ckpt_steps(out, "encdiff")[-1] == LONG_STEPS
    log = [json.loads(line)["step"] for line in (out / "encdiff" / "log.jsonl").read_text().splitlines()]
    assert log[-1] == LONG_STEPS and log == sorted(set(log))  # the redone steps' rows once each
    assert f"steps 4 -> {LONG_STEPS}" in stdout  # it went back to step 4 and on


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_data, straight):
    out = with_straights_vq(tmp_path / "run", straight)
    run_train(out, tiny_data, "--encdiff.steps=3", "--run.keep_last=3", "--run.ckpt_every=1")
    newest = out / "encdiff" / "ckpt_00000003.safetensors"
    data = bytearray(newest.read_bytes())
    data[-50] ^= 0xFF
    newest.write_bytes(bytes(data))
    r = run_train(out, tiny_data, "--encdiff.steps=4", "--run.keep_last=3", "--run.ckpt_every=1")
    assert "skipping" in r.stderr and "checksum" in r.stderr
    assert "steps 2 -> 4" in r.stdout  # resumed from step 2, the last good one
    log = [json.loads(line)["step"] for line in (out / "encdiff" / "log.jsonl").read_text().splitlines()]
    assert log == [2, 4]  # step 3's row (the corrupt checkpoint's run) went with it


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, tiny_data, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(step_module, "INJECT_NAN", frozenset({3}))  # in a process of its own: ENCDIFF_INJECT_NAN=3
    run_train(out, tiny_data, "--run.stages=vqvae")
    log = [json.loads(line) for line in (out / "vqvae" / "log.jsonl").read_text().splitlines()]
    assert [rec["skipped_nonfinite"] for rec in log] == [0, 1]
    assert all(np.isfinite(rec["loss"]) for rec in log)
    assert all(torch.isfinite(t).all() for t in final(out, "vqvae").values() if t.is_floating_point())


def test_too_many_nonfinite_steps_stop_with_the_last_good_state(tmp_path, tiny_data, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(step_module, "INJECT_NAN", frozenset(range(2, LONG_STEPS)))
    r = run_train(
        out, tiny_data, *LONG, "--run.stages=vqvae", f"--vqvae.steps={LONG_STEPS}", "--run.max_nonfinite=3",
        check=False,
    )  # fmt: skip
    errors = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "non-finite" in errors[0]
    steps = ckpt_steps(out, "vqvae")
    assert steps and steps[-1] < LONG_STEPS
    assert all(torch.isfinite(t).all() for t in final(out, "vqvae").values() if t.is_floating_point())


def test_unwritable_output_dir(tmp_path, tiny_data):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "run.out_dir: cannot write" in train_error(*train_args(blocker / "run", tiny_data))


def _bad_h5(path, images, sizes):
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.attrs["factor_sizes"] = np.array(sizes)
        f.attrs["factor_names"] = [f"f{i}" for i in range(len(sizes))]
    return path


@pytest.mark.parametrize("case", ["not_hdf5", "wrong_dtype", "wrong_count", "wrong_size"])
def test_bad_dataset_is_one_clear_line(tmp_path, case):
    p = tmp_path / f"{case}.h5"
    if case == "not_hdf5":
        p.write_text("hello")
    elif case == "wrong_dtype":
        _bad_h5(p, np.zeros((8, 64, 64, 3), np.float32), (2, 4))
    elif case == "wrong_count":
        _bad_h5(p, np.zeros((8, 64, 64, 3), np.uint8), (3, 4))
    else:
        _bad_h5(p, np.zeros((8, 32, 32, 3), np.uint8), (2, 4))
    assert str(p.name) in train_error(*train_args(tmp_path / "run", p))


@pytest.mark.slow
def test_soak_kill_and_resume_20_times(tmp_path, tiny_data):
    """20 SIGKILLs at random points, each followed by a resume; the end equals a straight run."""
    steps = ["--encdiff.steps=60", "--run.ckpt_every=3"]
    straight = tmp_path / "straight"
    run_train(straight, tiny_data, *steps)
    out = tmp_path / "soak"
    rng = random.Random(0)
    for _ in range(20):
        proc = start(train_cmd(out, tiny_data, *steps))
        time.sleep(rng.uniform(3, 12))
        proc.kill()
        proc.communicate()
        if ckpt_steps(out, "encdiff") and ckpt_steps(out, "encdiff")[-1] == 60:
            break
    run_train(out, tiny_data, *steps)
    a, b = final(straight, "encdiff"), final(out, "encdiff")
    for k in a:
        assert torch.equal(a[k], b[k]), k
