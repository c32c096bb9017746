"""encdiff/runlock.py: one writer per run directory. A second train.py on a run directory that a
live run holds stops at once (one line naming the holder, exit 2, nothing written), under torchrun
too; a killed holder leaves no stale lock; evaluate.py reads a run that trains without a lock."""

import os
import shutil
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_train, train_args, train_error, with_straights_vq
from encdiff.ckpt_contents import load_trained
from encdiff.runlock import try_lock


def holder(out_dir):
    """A process that holds out_dir's lock until killed -> (Popen, its pid)."""
    code = f"from encdiff.runlock import try_lock; f, h = try_lock({str(out_dir)!r}); print(h, flush=True); input()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "None"  # it got the lock
    return proc


def test_a_second_run_on_a_held_directory_stops_at_once_and_a_killed_holder_frees_it(tmp_path, tiny_data, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = holder(out)
    try:
        message = train_error(*train_args(out, tiny_data))
        assert f"pid {proc.pid}" in message and "in use by another training run" in message
        assert f"host {os.uname().nodename}" in message and "since 20" in message
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
        assert load_trained(out).step == 6  # what evaluate.py reads a run with: no lock, no wait
    finally:
        proc.send_signal(signal.SIGKILL)  # as a crash or `kill -9` would
        proc.wait()
    f, held_by = try_lock(out)  # the kernel released it with the process: no stale lock
    assert held_by is None
    f.close()


def test_torchrun_ranks_stop_together_while_a_training_run_holds_it(tmp_path, tiny_data, straight):
    """The holder is a real train.py; two ranks under torchrun both stop with the line, no hang; the
    holder trains on, and stops as usual."""
    out = with_straights_vq(tmp_path / "run", straight)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *train_args(out, tiny_data, "--encdiff.steps=60", "--run.stop_check_every=1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        t0 = time.time()
        while not (out / "encdiff" / "log.jsonl").exists():  # it trains, holding the lock
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()
            time.sleep(0.05)
        second = run_train(out, tiny_data, "--encdiff.steps=60", nproc=2, check=False)
        assert second.returncode != 0
        assert f"in use by another training run (host {os.uname().nodename}, pid {first.pid}" in second.stderr
        assert second.stderr.count("error: run.out_dir") == 2  # each rank says it once, and neither hangs
        assert first.poll() is None  # still training
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in stdout, stderr[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert (out / ".lock").read_text() == ""  # released at the end: nobody holds it
    f, held_by = try_lock(out)
    assert held_by is None
    f.close()
