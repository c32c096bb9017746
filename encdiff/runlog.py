"""The training log: what a log interval sums on the device, log.jsonl's rows, the peak memory.

win = Window(device); win.add(loss, grad_norm, images)   # every step, no host sync
append_jsonl(stage_dir / "log.jsonl", record)            # at a log step
drop_rows_after(stage_dir / "log.jsonl", step)           # a resumed run: the rows it will redo go
"""

import json
import time
from pathlib import Path

import torch


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
