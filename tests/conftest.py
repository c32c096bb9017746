"""What the tests share: the tiny model and data, train.py run in a subprocess or in this process,
one straight tiny run for every test that compares with it, and the CPU setup.

    from conftest import ROOT, TINY, run_train, final, train_error   # helpers
    def test_x(tiny_data, straight): ...                             # fixtures (session-wide)
"""

import contextlib
import importlib.util
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

# Triton kernels run on the CPU through its interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist's workers (pyproject's addopts) take one core each; alone, the process takes two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [ROOT / "config.toml", ROOT / "configs" / "smoke.toml"]
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# data


def write_tiny_h5(path, sizes=(4, 4, 4)):
    """Smooth random 64x64 images in the generic ground-truth format."""
    n = math.prod(sizes)
    rs = np.random.RandomState(0)
    small = rs.randint(0, 256, size=(n, 8, 8, 3)).astype(np.uint8)
    images = small.repeat(8, axis=1).repeat(8, axis=2)  # (n, 64, 64, 3)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.attrs["factor_sizes"] = np.array(sizes)
        f.attrs["factor_names"] = [f"f{i}" for i in range(len(sizes))]
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_tiny_h5(tmp_path_factory.mktemp("data") / "tiny.h5")


# ---------------------------------------------------------------------------------------------
# train.py


def train_args(out_dir, data, *extra):
    return [*TINY, f"--run.out_dir={out_dir}", "--data.name=h5", f"--data.path={data}", *extra]


def run_train(out_dir, data, *extra, nproc=1, check=True):
    """train.py on TINY with one thread per process -> a CompletedProcess (returncode, stdout,
    stderr): in this process when nproc == 1 (as its own process would run it, without paying
    torch's imports again), under torchrun when nproc > 1. A test that needs a process of its own
    (signals, a namespace) starts it itself."""
    args = train_args(out_dir, data, *extra)
    r = train_here(args) if nproc == 1 else train_under_torchrun(args, nproc)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_under_torchrun(args, nproc):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "train.py"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@contextlib.contextmanager
def stop_handlers_kept():
    """train.py installs its stop handlers (SIGINT, SIGTERM); pytest's come back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def train_here(args):
    """train.py's command line in this process, as its own process would run it: one thread (the
    CPU's reductions depend on the thread count), its stdout, stderr, warnings and exit status."""
    import train

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with stop_handlers_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with warnings.catch_warnings():
                warnings.simplefilter("default")  # a process's own rule, and its warnings on its stderr
                warnings.showwarning = lambda msg, cat, name, line_no, file=None, line=None: err.write(
                    warnings.formatwarning(msg, cat, name, line_no, line)
                )
                try:
                    train.run(list(map(str, args)))
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["train.py", *args], code, out.getvalue(), err.getvalue())


def train_error(*argv):
    """The message train.py stops with before any work, run in this process (what a user sees after
    'error: '; tests/test_train.py checks once, in a subprocess, that it is one line with exit 2).
    Fails the test when train.py does not stop that way."""
    import train
    from encdiff.errors import UserError

    with stop_handlers_kept(), pytest.raises(UserError) as e:
        train.main(list(map(str, argv)))
    message = str(e.value)
    assert "\n" not in message, message
    return message


def train_in_process(*argv):
    """train.py's main in this process (for runs that train nothing: a finished run, a rerun) ->
    its exit status; what it prints goes to pytest's capture."""
    import train

    with stop_handlers_kept():
        return train.main(list(map(str, argv)))


def final(out_dir, stage):
    files = sorted((Path(out_dir) / stage).glob("ckpt_*.safetensors"))
    return load_file(str(files[-1]))


def weights(t):
    return {k: v for k, v in t.items() if k.split(".")[0] in ("model", "encoder", "unet", "ema")}


@pytest.fixture(scope="session")
def straight(tmp_path_factory, tiny_data):
    """One uninterrupted run of TINY, shared by the tests that compare with it or read it: copy it
    before changing anything in it."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train(out, tiny_data)
    return out


def with_straights_vq(out_dir, straight):
    """out_dir holding straight's finished stage 1, so a test of stage 2 does not train it again;
    its stage 2 starts as straight's did (each stage reseeds)."""
    shutil.copytree(Path(straight) / "vqvae", Path(out_dir) / "vqvae")
    return out_dir


# ---------------------------------------------------------------------------------------------
# models


def perturb(model, std=0.05, seed=0):
    """Move every parameter off its init (the zero-initialised output layers block all gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


# ---------------------------------------------------------------------------------------------
# the benchmarks' scripts as modules


def load_script(relative):
    """A script of the repository (benchmarks/...) imported as a module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ranks(worker, *args, world=2, timeout=120):
    """Spawn `world` processes running worker(rank, world, *args, queue); each puts one tuple that
    starts with its rank -> those tuples in rank order. Daemons, killed in `finally`: a rank stuck
    in a rendezvous fails the test instead of hanging pytest."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, *args, q), daemon=True) for r in range(world)]
    try:
        for p in procs:
            p.start()
        out = sorted((q.get(timeout=timeout) for _ in range(world)), key=lambda o: o[0])
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * world
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return out
