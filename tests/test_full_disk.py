"""A full disk: run.out_dir (or evaluate.py's --out) on a small tmpfs in a mount namespace of the test's
own, so that no mount outlives it. Needs root (unshare, mount, nsenter); skipped otherwise."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, train_args
from encdiff.ckpt_files import load_checkpoint

# stage 2 only (stage 1 copied from straight): a checkpoint every step, three kept, so that the disk
# holds two and the third does not fit
STAGE2 = ["--encdiff.steps=4", "--run.ckpt_every=1", "--run.keep_last=3", "--run.image_every=100"]
PAGE = 4096


class SmallDisk:
    """A tmpfs of `size` bytes at `mount` in a mount namespace held by a sleeping process: commands run
    in it through nsenter; the test reads it through /proc/PID/root; it goes when the holder does."""

    def __init__(self, mount, size):
        self.mount = Path(mount)
        self.mount.mkdir(parents=True, exist_ok=True)
        script = f"mount -t tmpfs -o size={size} tmpfs {self.mount} && echo mounted && exec sleep 600"
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        self.holder = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()  # the holder ends if it cannot mount: readline returns
        if line.strip() != "mounted":
            self.close()
            pytest.skip(f"cannot mount a small tmpfs in a mount namespace: {self.holder.stderr.read().strip()}")

    @property
    def seen(self):
        """The tmpfs as this process sees it."""
        return Path(f"/proc/{self.holder.pid}/root{self.mount}")

    def run(self, *cmd, timeout=300):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        inside = ["nsenter", f"--target={self.holder.pid}", "--mount", *map(str, cmd)]
        return subprocess.run(inside, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)

    def resize(self, size):
        r = self.run("mount", "-o", f"remount,size={size}", self.mount)
        assert r.returncode == 0, r.stderr

    def close(self):
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.communicate(timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux)")
    disks = []

    def make(size):
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()


def pages(n):
    return -(-n // PAGE) * PAGE


def tree_bytes(path):
    return sum(pages(p.stat().st_size) for p in Path(path).rglob("*") if p.is_file())


def checkpoints(stage_dir):
    return sorted(p.name for p in Path(stage_dir).glob("ckpt_*.safetensors"))


def said(stderr, start):
    """The line of stderr that holds `start`, from there on (the progress bar shares its line)."""
    found = [line[line.index(start) :] for line in stderr.replace("\r", "\n").splitlines() if start in line]
    assert len(found) == 1, stderr[-3000:]
    return found[0]


def test_a_checkpoint_that_does_not_fit(small_disk, tiny_data, straight):
    """Stage 2 on a disk with room for two of its checkpoints: the third is reported in one line and
    training goes on; the stage's last one stops the run (exit 1) saying how much space it needs; no
    partial file under a final name; the rerun, with more space, resumes from the newest good one."""
    newest = Path(straight) / "encdiff" / "ckpt_00000006.safetensors"
    ckpt_bytes = newest.stat().st_size
    # train.py's check before a stage asks for twice its estimate of a checkpoint (4 copies of the
    # weights, the VQ's too: more than two real ones); a third real one must not fit in that
    weights = sum(t.nbytes for k, t in load_file(str(newest)).items() if k.split(".")[0] in ("encoder", "unet", "vq"))
    free = 2 * 4 * weights + 2**20
    assert free < 3 * ckpt_bytes - 2**20, "no disk size holds the check's need but not three checkpoints"
    disk = small_disk(tree_bytes(Path(straight) / "vqvae") + free)
    run_dir = disk.mount / "run"
    for step in (["mkdir", run_dir], ["cp", "-r", Path(straight) / "vqvae", run_dir / "vqvae"]):
        r = disk.run(*step)
        assert r.returncode == 0, r.stderr
    cmd = [sys.executable, ROOT / "train.py", *train_args(run_dir, tiny_data, *STAGE2)]

    r = disk.run(*cmd)
    stage_dir = disk.seen / "run" / "encdiff"
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lost = said(r.stderr, "checkpoint of step 3 not written")
    assert "No space left on device" in lost and "MiB free" in lost and "the previous one is intact" in lost, lost
    error = said(r.stderr, "error: cannot write the checkpoint of step 4")
    needs = float(re.search(r"ckpt_00000004.safetensors needs ([\d.]+) MiB", error).group(1))
    assert abs(needs - ckpt_bytes / 2**20) < 0.2, error
    assert checkpoints(stage_dir) == ["ckpt_00000001.safetensors", "ckpt_00000002.safetensors"]
    assert [p.name for p in stage_dir.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    for path in stage_dir.glob("ckpt_*.safetensors"):
        load_checkpoint(path, verify=True)

    disk.resize(tree_bytes(disk.seen) + 3 * ckpt_bytes + 10 * 2**20)
    r = disk.run(*cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps 2 -> 4" in r.stdout, r.stdout[-2000:]
    assert checkpoints(stage_dir)[-1] == "ckpt_00000004.safetensors"
    for path in stage_dir.glob("ckpt_*.safetensors"):
        load_checkpoint(path, verify=True)


def test_evaluate_into_a_full_disk_leaves_no_partial_metrics(small_disk, straight):
    """No room for metrics.json: one line, and no empty or partial file that a rerun would refuse."""
    disk = small_disk(16 * PAGE)
    r = disk.run("dd", "if=/dev/zero", f"of={disk.mount / 'filler'}", "bs=4096", "count=64")  # fill it up
    assert "No space left" in r.stderr, r.stderr
    out = disk.mount / "eval"
    r = disk.run(sys.executable, ROOT / "evaluate.py", straight, "--quick", "--metrics=mig", f"--out={out}")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot write"), r.stderr[-3000:]
    metrics = disk.seen / "eval" / "metrics.json"
    assert not metrics.exists() or json.loads(metrics.read_text())["options"], "a partial metrics.json"
