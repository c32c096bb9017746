"""The distributed helper: read the torchrun environment, set the device before init, and the
few collectives the trainer needs. Works for `python train.py` (one process, no process group)
and under torchrun on one or several nodes (NCCL on CUDA, gloo on the CPU)."""

import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from encdiff.errors import UserError


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


INIT_HUNG_EXIT = 3  # exit status of a rank whose init_process_group did not return in time


def init_with_watchdog(backend, timeout_s, rank, **kwargs):
    """init_process_group, but the process exits (status INIT_HUNG_EXIT) if it has not returned
    within timeout_s. Gloo's connect can wait forever when a peer of an earlier attempt died (its
    listener side ignores the timeout, pytorch/gloo#520), which left `torchrun --max-restarts` jobs
    stuck after a SIGKILL; an exit instead is one more restart, which torchrun handles."""
    done = threading.Event()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"

    def watchdog():
        if not done.wait(timeout_s):
            print(
                f"rank {rank}: the other ranks did not all connect within {timeout_s:g} s (run.init_timeout) at "
                f"{where} (MASTER_ADDR:MASTER_PORT): check that every node was started with the same --nnodes, "
                f"that this address is reachable from every node (firewall; GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME "
                f"for the right interface) and, in containers, give torchrun --local_addr=<this node's address>; "
                f"exiting so that torchrun can restart the group",
                file=sys.stderr,
                flush=True,
            )
            os._exit(INIT_HUNG_EXIT)

    threading.Thread(target=watchdog, name="init-watchdog", daemon=True).start()
    store = attempt_store()
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, **kwargs)
    done.set()


def attempt_store():
    """Under a single-node torchrun that has restarted the group: the env:// store with a prefix
    per attempt, else None (plain env://). torchrun keeps one TCPStore for all attempts, so the
    keys of a killed attempt stay readable; a restarted rank could read its dead peer's gloo address
    before the new peer overwrote it and fail to connect ("Connection refused" to the old port, seen
    in 2 of 5 SIGKILL tests). Several nodes restart with different TORCHELASTIC_RESTART_COUNTs (a
    node that did not fail does not count the restart), so there the count cannot name the attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt in (None, "0") or os.environ.get("GROUP_WORLD_SIZE") != "1":
        return None
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"encdiff/attempt_{attempt}", store)


def setup(device="auto", init_timeout=300.0, collective_timeout=None):
    """-> Dist. collective_timeout: seconds a collective waits for the other ranks before it fails,
    which bounds the wait after a cut link (None or 0: torch's default, 30 minutes with gloo)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but CUDA is not available here (use --run.device=cpu or 'auto')")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UserError(
            f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs here: "
            f"--nproc_per_node must not exceed the GPUs of a node"
        )
    if use_cuda:
        # set the device before init so NCCL binds each rank to its own GPU
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        kwargs = {"device_id": dev if use_cuda else None}
        if collective_timeout:
            kwargs["timeout"] = timedelta(seconds=collective_timeout)
        init_with_watchdog("nccl" if use_cuda else "gloo", init_timeout, rank, **kwargs)
        say_lost_peer_in_one_line(rank)
    return Dist(rank, local_rank, world_size, dev)


# what gloo's errors say when the other end went away (a node died) or stopped answering (a cut link)
LOST_PEER = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Connection refused|No route to host|Socket closed|"
    r"(Read|Write) error \[|Timed out waiting \d+ms for (recv|send) operation|Application timeout caused pair closure",
    re.IGNORECASE,
)


def lost_peer(e):
    """The gist of a collective's error whose peer is gone, or None for any other error."""
    if not isinstance(e, RuntimeError):
        return None
    text = str(e).split("This is typically caused")[0]  # gloo's advice after the reason
    found = LOST_PEER.search(text)
    if found is None:
        return None
    # "[.../pair.cc:537] Read error [10.231.7.2]:26846: Connection reset by peer." -> from "Read error" on
    return re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).strip().rstrip(".") or found.group(0)


def say_lost_peer_in_one_line(rank):
    """An error that escapes train.py because the other ranks are gone is one line saying so, in
    place of a traceback from inside a collective (the exit status stays 1)."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        gist = lost_peer(value)
        if gist is None:
            return previous(kind, value, tb)
        print(
            f"error: rank {rank} lost the other ranks ({gist}): a node stopped, or the network between the "
            f"nodes failed. The last checkpoint is intact: start every node again to resume from it.",
            file=sys.stderr,
            flush=True,
        )

    sys.excepthook = hook


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(t):
    """Mean over ranks (in place on a copy); the identity without a process group."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj, src=0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj):
    """[rank 0's obj, rank 1's, ...]; [obj] without a process group."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them (gloo aborts)
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# stopping on a signal, every rank at the same step


class Stopped(Exception):
    """A stop signal arrived before training started (data generation, latent caching)."""


class StopSignal:
    """SIGTERM/SIGINT (and any configured signal) ask the run to stop: during training it finishes
    its step, writes a checkpoint and exits with 128 + the signal's number (130 after Ctrl-C, 143
    after SIGTERM), so that a preempted job resumes where it stopped and `train.py && evaluate.py`
    evaluates only a finished run. Installed first, so the long work before the first step
    (generating the data, caching latents) polls check() and stops at once too. A second signal
    interrupts."""

    def __init__(self, names):
        self.received = None
        for name in names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def check(self):
        if self.received is not None:
            raise Stopped(self.received)

    @property
    def exit_code(self):
        # a rank stopped by another rank's signal says SIGTERM's
        return 128 + getattr(signal, self.received or "SIGTERM")


class StopVote:
    """Whether any rank received a stop signal, decided alike on every rank without waiting for the
    device: each vote starts an all-reduce of this rank's flag and reads the one the previous vote
    started (finished long ago), so every rank stops one vote after the first signal, at one step."""

    def __init__(self, stop, d):
        self.stop, self.d = stop, d
        self.flag = torch.zeros(1, dtype=torch.int32, device=d.device)
        self.pending = None  # (host copy of the last vote's result, event after its copy)

    def __call__(self):
        if not self.d.enabled:
            return self.stop.received is not None
        agreed = False
        if self.pending is not None:
            host, event = self.pending
            if event is not None:
                event.synchronize()
            agreed = bool(host.item())  # a host tensor: no device sync
        self.flag.fill_(int(self.stop.received is not None))
        torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX)
        if self.d.device.type == "cuda":
            host = torch.empty(1, dtype=self.flag.dtype, pin_memory=True)
            host.copy_(self.flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event)
        else:
            self.pending = (self.flag.clone(), None)
        return agreed
