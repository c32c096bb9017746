"""The training log: what a log interval sums on the device, log.jsonl's rows, the peak memory.

win = Window(device); win.add(loss, grad_norm, images)   # every step, no host sync
append_jsonl(stage_dir / "log.jsonl", record)            # at a log step
drop_rows_after(stage_dir / "log.jsonl", step)           # a resumed run: the rows it will redo go
board = Board(out_dir / "tensorboard" / stage, start)    # run.tensorboard: the same rows for TensorBoard
"""

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encdiff.errors import UserError


class Window:
    """The log's sums over the steps since the last log, kept on the device so that a step never
    syncs: mean loss and gradient norm of the finite steps, the skipped (non-finite) steps, and how
    many were skipped in a row (train.py stops after run.max_nonfinite)."""

    def __init__(self, device):
        self.device = device
        self.streak = torch.zeros((), device=device)  # non-finite steps in a row
        self.reset()

    def reset(self):
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.loss, self.grad_norm, self.good, self.skipped = z(), z(), z(), z()
        self.images, self.t0 = 0, time.perf_counter()

    def add(self, loss, grad_norm, images):
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        self.loss += torch.where(bad, 0.0, loss.detach().float())
        self.grad_norm += torch.where(bad, 0.0, grad_norm.float())
        self.good += ~bad
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        self.images += images


def peak_memory_mb(device):
    """The peak memory so far: torch's allocated peak on CUDA; on the CPU the process's peak resident
    set (VmHWM, which train_bench resets between its rows), else ru_maxrss."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def drop_rows_after(path, step):
    """A run resumed from `step`: the rows of a JSONL log past it describe steps that will be done
    again (the run stopped after them but before their checkpoint), and go; so does a line cut off
    mid-write. Atomic: a temporary file, then a rename."""
    path = Path(path)
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]

    def kept(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    keep = [line for line in rows if kept(line)]
    if len(keep) < len(rows):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


def check_tensorboard(enabled):
    """run.tensorboard without the package: one line before any work."""
    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise UserError('run.tensorboard = true needs the tensorboard package: pip install -e ".[tb]"')


def numbers(record, prefix=""):
    """The numbers of a (nested) log record as ("a/b", value) pairs; strings, flags and the step go."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield f"{prefix}{key}", value


class Board:
    """log.jsonl's rows, the live metrics and the picture grids as TensorBoard events, against the
    step (rank 0, run.tensorboard); the JSONL stays the record. A resumed run purges the events past
    the step it resumes from, as drop_rows_after does for the JSONL."""

    def __init__(self, log_dir, start_step):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)

    def scalars(self, step, record, prefix=""):
        for tag, value in numbers(record, prefix):
            self.writer.add_scalar(tag, value, step)

    def image(self, tag, png, step):
        self.writer.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def close(self):
        self.writer.close()


class NoBoard:
    """run.tensorboard off, or a rank other than 0."""

    def scalars(self, step, record, prefix=""):
        pass

    def image(self, tag, png, step):
        pass

    def close(self):
        pass
