"""encdiff/live.py: the live metrics' worker process never takes the training down: it ignores
the stop signals the trainer owns, a dead worker means one line and no more live metrics, no scoring
starts once a stop is pending, and a wait says what it waits for."""

import os
import signal

import h5py
import numpy as np
import pytest
import torch

from conftest import SMOKE, run_train, train_args, with_straights_vq
from encdiff.config import build_config
from encdiff.models.encdiff import build_encoder
from encdiff.live import LiveMetrics


def live_metrics(data, stage_dir):
    cfg = build_config(SMOKE, [("eval.every", "2")])
    with h5py.File(data) as f:
        images, sizes = torch.from_numpy(f["images"][:]), tuple(f.attrs["factor_sizes"])
    torch.manual_seed(0)
    return LiveMetrics(cfg, stage_dir, sizes, images, torch.device("cpu")), build_encoder(cfg.encdiff)


@pytest.fixture
def live(tiny_data, tmp_path):
    metrics, encoder = live_metrics(tiny_data, tmp_path)
    yield metrics, encoder
    metrics.close(wait=False)


def worker_pid(metrics):
    return next(iter(metrics.pool._processes))


def test_the_worker_ignores_the_stop_signals_and_scores_on(live, capsys):
    """...and once a stop is pending no scoring starts, and the wait for the last scores says so."""
    metrics, encoder = live
    metrics.maybe_start(2, encoder, 16, 1.0, stopping=True)
    assert not metrics.pending and metrics.pool is None
    metrics.maybe_start(2, encoder, 16, 1.0)
    os.kill(worker_pid(metrics), signal.SIGINT)  # what a terminal's Ctrl-C sends the whole group
    os.kill(worker_pid(metrics), signal.SIGTERM)
    metrics.maybe_start(4, encoder, 32, 2.0)
    metrics.close()
    assert "waiting for the live metrics of step 2, 4" in capsys.readouterr().out
    assert [r["step"] for r in metrics.records] == [2, 4]
    assert all("factor_vae" in r and "error" not in r for r in metrics.records)


def test_a_dead_worker_stops_the_live_metrics_not_the_training(live, capsys):
    metrics, encoder = live
    metrics.maybe_start(2, encoder, 16, 1.0)
    os.kill(worker_pid(metrics), signal.SIGKILL)
    assert metrics.poll(wait=True) == []  # no exception
    metrics.maybe_start(4, encoder, 32, 2.0)  # nor here: live metrics are off
    out = capsys.readouterr().out
    assert out.count("live metrics stopped (BrokenProcessPool") == 1 and "training goes on" in out
    assert metrics.every == 0 and not metrics.pending


def test_ctrl_c_to_the_process_group_while_metrics_run(tmp_path, tiny_data, straight):
    """A terminal's Ctrl-C reaches train.py and the metrics worker alike: exit 130, a checkpoint of
    the step it reached, the scored rows kept, and no traceback anywhere."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = with_straights_vq(tmp_path / "run", straight)
    args = train_args(out, tiny_data, "--encdiff.steps=40", "--eval.every=2", "--run.stop_check_every=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a terminal's job
    )
    try:
        metrics = out / "encdiff" / "metrics.jsonl"
        t0 = time.time()
        while not (metrics.exists() and metrics.read_text().strip()):  # a row scored, the next in flight
            assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr + stdout and "KeyboardInterrupt" not in stderr + stdout
    ckpts = sorted((out / "encdiff").glob("ckpt_*.safetensors"))
    stopped = int(ckpts[-1].stem.split("_")[1])
    assert 2 <= stopped < 40 and f"stopped by SIGINT at step {stopped}" in stdout
    rows = [int(line.split('"step": ')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    assert rows and rows == sorted(set(rows)) and rows[-1] <= stopped
    np.testing.assert_array_less(0, rows)
    assert run_train  # the resume is train.py's (tests/test_reliability.py)
