"""encdiff/runlock.py: one writer per run directory. A second train.py on a run directory that a
live run holds stops at once (one line naming the holder, exit 2, nothing written), under torchrun
too; a killed holder leaves no stale lock; evaluate.py reads a held run without a lock."""

import os
import shutil
import subprocess
import sys
import time

from conftest import ROOT, run_train, train_args, train_error
from encdiff.ckpt_contents import load_trained
from encdiff.runlock import try_lock


def test_a_second_run_stops_at_once_and_a_killed_holder_leaves_no_lock(tmp_path, tiny_data, straight):
    """The holder is a real train.py, training on from the straight run's step 6; the second is told
    who holds it (that it writes nothing: the torchrun test); evaluate.py's loader reads the run
    meanwhile; then a SIGKILL."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *train_args(out, tiny_data, "--encdiff.steps=200")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        t0 = time.time()
        while "host" not in (out / ".lock").read_text():  # it holds the lock
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()
            time.sleep(0.05)
        message = train_error(*train_args(out, tiny_data, "--encdiff.steps=200"))
        assert f"in use by another training run (host {os.uname().nodename}, pid {first.pid}, since 20" in message
        assert load_trained(out).step >= 6  # what evaluate.py reads a run with: no lock, no wait
        assert first.poll() is None  # the holder trains on
    finally:
        first.kill()  # as a crash or `kill -9` would
        first.communicate()
    f, held_by = try_lock(out)  # the kernel released it with the process: no stale lock
    assert held_by is None
    f.close()


def test_both_torchrun_ranks_stop_with_the_line_while_another_process_holds_it(tmp_path, tiny_data):
    out = tmp_path / "run"
    out.mkdir()
    code = f"from encdiff.runlock import try_lock; f, h = try_lock({str(out)!r}); print(h, flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "None"  # it got the lock
        r = run_train(out, tiny_data, nproc=2, check=False)
        assert r.returncode != 0
        assert r.stderr.count(f"in use by another training run (host {os.uname().nodename}, pid {holder.pid}") == 2
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.communicate()
    assert (out / ".lock").read_text().startswith("host ")  # a killed holder's line stays, its lock goes
    f, held_by = try_lock(out)
    assert held_by is None
    f.close()
