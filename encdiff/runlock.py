"""One writer per run directory: a job submitted twice, or requeued while the old one still runs,
must not write checkpoints into the same run.out_dir.

    with RunLock(out_dir, d):    # rank 0 holds it; every rank learns whether it was free
        ...train...

The lock is the kernel's (flock on out_dir/.lock): it goes with the process that holds it, so a
killed run never leaves a stale lock behind. The file also says who holds it, for the message the
second writer stops with. Readers (evaluate.py) take no lock: checkpoint writes are atomic.
"""

import fcntl
import os
import socket
import time
from pathlib import Path

from encdiff import dist
from encdiff.errors import UserError

LOCK_NAME = ".lock"


def try_lock(out_dir):
    """-> (open file holding the lock, None) or (None, who holds it: 'host H, pid P, since T')."""
    path = Path(out_dir) / LOCK_NAME
    f = open(path, "a+")  # a+: opening must not erase the holder's line before we know we hold it
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n")
    f.flush()
    return f, None


class RunLock:
    """Held by rank 0 for the life of the run; a run directory someone else holds stops every rank
    with one line (exit 2) before anything is written."""

    def __init__(self, out_dir, d):
        self.out_dir, self.d, self.file = Path(out_dir), d, None

    def __enter__(self):
        holder = None
        if self.d.is_main:
            self.file, holder = try_lock(self.out_dir)
        if self.d.enabled:
            holder = dist.broadcast_object(holder)
        if holder is not None:
            raise UserError(
                f"run.out_dir {self.out_dir} is in use by another training run ({holder}); wait for it to end, "
                f"stop it, or give another run.out_dir"
            )
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.truncate(0)  # nobody holds it now (a rejected command leaves the directory as it was)
            self.file.close()  # closing releases the lock
            self.file = None
