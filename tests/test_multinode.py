"""Two nodes on a real network: two network namespaces joined by a veth pair (10.231.7.1 and .2),
`torchrun --nnodes=2` in each, gloo over that link, one run directory that both see (as on a
cluster's shared disk). Then the faults such a cluster has: a node killed, a node that never
comes, a cut link. Needs root and iproute2; skipped otherwise.

Inside namespaces torchrun cannot tell from the host name which node hosts its c10d store, nor
reach the other node under its host name: each node passes --rdzv_conf=is_host=... and
--local_addr, and GLOO_SOCKET_IFNAME names the link."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, final, run_train, train_args, weights
from encdiff.ckpt_files import load_checkpoint
from encdiff.dist import INIT_HUNG_EXIT

ADDR = {"a": "10.231.7.1", "b": "10.231.7.2"}
PORT = 29400  # in the namespaces' own network: nothing else there
STEPS = 12
LONG = [f"--encdiff.steps={STEPS}", "--run.ckpt_every=4", "--run.stop_check_every=1"]
JOIN_S = 20  # --rdzv_conf join_timeout: the first rendezvous of two fresh nodes takes a few seconds


class Net:
    """Namespaces `<name>-a` and `<name>-b` joined by veths `<name>a` / `<name>b`; torchrun (or any
    command) started in them; everything killed and removed in close()."""

    made = itertools.count()

    def __init__(self, tmp_path):
        self.name, self.tmp = f"ed{os.getpid()}x{next(Net.made)}", tmp_path  # at most 15 characters a veth
        self.started = []

    def up(self):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("needs root and iproute2 (ip netns)")
        try:
            self.ip("netns", "add", self.ns("a"))
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot make a network namespace: {e.stderr.strip()}")
        self.ip("netns", "add", self.ns("b"))
        self.ip("link", "add", self.veth("a"), "type", "veth", "peer", "name", self.veth("b"))
        for side in "ab":
            self.ip("link", "set", self.veth(side), "netns", self.ns(side))
            self.ip("-n", self.ns(side), "addr", "add", f"{ADDR[side]}/30", "dev", self.veth(side))
            self.ip("-n", self.ns(side), "link", "set", "lo", "up")
            self.ip("-n", self.ns(side), "link", "set", self.veth(side), "up")

    def ns(self, side):
        return f"{self.name}-{side}"

    def veth(self, side):
        return f"{self.name}{side}"

    @staticmethod
    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def start(self, side, *cmd, env=()):
        """cmd in the namespace of node `side`, its output in files (read with output())."""
        log = self.tmp / f"{side}{len(self.started)}.log"
        variables = ["OMP_NUM_THREADS=1", f"GLOO_SOCKET_IFNAME={self.veth(side)}", *env]
        full = ["ip", "netns", "exec", self.ns(side), "env", *variables, *map(str, cmd)]
        proc = subprocess.Popen(full, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        proc.log = log
        self.started.append(proc)
        return proc

    def torchrun(self, side, *args, rdzv_conf="", port=PORT, script_args=(), script=ROOT / "train.py", env=()):
        """One node of a c10d job: node a hosts the store, b joins it."""
        conf = f"is_host={int(side == 'a')},join_timeout={JOIN_S}{rdzv_conf}"
        return self.start(
            side,
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={ADDR['a']}:{port}",
            f"--rdzv_id={self.name}",
            f"--rdzv_conf={conf}",
            f"--local_addr={ADDR[side]}",
            *args,
            script,
            *script_args,
            env=env,
        )

    def pids(self, side):
        r = subprocess.run(["ip", "netns", "pids", self.ns(side)], capture_output=True, text=True, timeout=30)
        return [int(p) for p in r.stdout.split()]

    def kill_node(self, side):
        """The node dies: every process in its namespace, at once."""
        for pid in self.pids(side):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self):
        for side in "ab":
            self.kill_node(side)  # torchrun's workers live in sessions of their own: not killed with it
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        for side in "ab":  # the veths go with their namespaces
            subprocess.run(["ip", "netns", "del", self.ns(side)], capture_output=True, timeout=30)


@pytest.fixture
def net(tmp_path):
    n = Net(tmp_path)
    try:
        n.up()
        yield n
    finally:
        n.close()


def output(proc):
    return proc.log.read_text(errors="replace")


def wait(proc, timeout):
    """Exit status of proc, which must end within timeout seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{output(proc)[-3000:]}") from None


def wait_for_log_step(out_dir, step, procs, timeout=120):
    log = Path(out_dir) / "encdiff" / "log.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if rows and rows[-1]["step"] >= step:
                return
        for proc in procs:
            assert proc.poll() is None, output(proc)[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {log} after {timeout} s")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def ckpt_steps(out_dir):
    return sorted(int(p.stem.split("_")[1]) for p in (Path(out_dir) / "encdiff").glob("ckpt_*.safetensors"))


def one_node_run(tmp_path_factory, tiny_data, *extra):
    """The reference: both stages on one node with 2 ranks (the same global batch and seed)."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    run_train(out, tiny_data, *extra, nproc=2)
    return out


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, tiny_data):
    return one_node_run(tmp_path_factory, tiny_data, *LONG)


def test_two_nodes_train_what_one_node_with_two_ranks_does(net, tmp_path_factory, tmp_path, tiny_data, straight):
    """Bit for bit what one node with 2 ranks trains; and, as the global batch is split and the
    BatchNorm statistics are taken over both ranks, what one rank trains (up to Adam's first steps)."""
    reference = one_node_run(tmp_path_factory, tiny_data)
    out = tmp_path / "run"
    nodes = [net.torchrun(side, script_args=train_args(out, tiny_data)) for side in "ab"]
    for node in nodes:
        assert wait(node, 300) == 0, output(node)[-3000:]
    assert "world size 2" in output(nodes[0])
    for stage in ("vqvae", "encdiff"):
        assert_same(final(reference, stage), final(out, stage))
    # Adam's first updates are about lr * sign(grad): a gradient within float noise of zero may flip
    # sign, so a handful of elements can differ by up to 2 lr per step. Everything else must agree.
    for stage, lr, steps in (("vqvae", 1.152e-3, 4), ("encdiff", 2.56e-4, 6)):
        a, b = weights(final(straight, stage)), weights(final(out, stage))
        diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
        assert (diffs > 1e-5).float().mean() < 0.005, stage
        assert diffs.max() <= 2 * lr * steps, stage


@pytest.mark.slow  # 50 s: a run, join_timeout's wait, the rerun
def test_a_killed_node_stops_the_other_and_both_resume(net, tmp_path, tiny_data, one_node):
    """Node b dies (SIGKILL to its torchrun and its rank) after stage 2's checkpoint of step 4: node
    a's rank stops at once saying it lost its peer; its torchrun (--max-restarts=1) waits join_timeout
    for b to come back and gives up; both started again resume from step 4 to the same weights."""
    out = tmp_path / "run"
    shutil.copytree(one_node / "vqvae", out / "vqvae")  # stage 1 as the reference's: stage 2 starts alike
    args = train_args(out, tiny_data, *LONG)
    a, b = (net.torchrun(side, "--max-restarts=1", script_args=args) for side in "ab")
    wait_for_log_step(out, 6, (a, b))
    agent_a = a.pid
    net.kill_node("b")
    t0 = time.time()
    while [p for p in net.pids("a") if p != agent_a]:  # node a's rank
        assert time.time() - t0 < 30, output(a)[-3000:]
        time.sleep(0.1)
    assert "lost the other ranks" in output(a), output(a)[-3000:]
    assert wait(a, JOIN_S + 30) != 0  # its restart found no node b
    newest = ckpt_steps(out)[-1]
    assert 4 <= newest < STEPS
    for path in (out / "encdiff").glob("ckpt_*.safetensors"):
        load_checkpoint(path, verify=True)

    nodes = [net.torchrun(side, script_args=args) for side in "ab"]
    for node in nodes:
        assert wait(node, 300) == 0, output(node)[-3000:]
    assert f"steps {newest} -> {STEPS}" in output(nodes[0])
    assert ckpt_steps(out)[-1] == STEPS
    assert_same(final(one_node, "encdiff"), final(out, "encdiff"))


def test_a_node_that_never_comes(net, tmp_path, tiny_data):
    """Only one node of two is started, and it gives up within its bound. c10d: the node hosting the
    store after --rdzv_conf=join_timeout (torchrun's message names no endpoint), the other after
    read_timeout, naming the endpoint it tried. Static torchrun: --rdzv_conf=timeout (the ranks never
    start). train.py started without torchrun (RANK, WORLD_SIZE, MASTER_ADDR from a scheduler):
    run.init_timeout, saying where it waited and what to check."""
    idle = tmp_path / "idle.py"  # the ranks never start
    idle.write_text("")
    static = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--node_rank=0"]
    static += ["--rdzv_conf=timeout=3", f"--master_addr={ADDR['a']}", f"--master_port={PORT + 2}"]
    env = ["RANK=1", "LOCAL_RANK=0", "WORLD_SIZE=2", f"MASTER_ADDR={ADDR['a']}", f"MASTER_PORT={PORT + 3}"]
    args = train_args(tmp_path / "run", tiny_data, "--run.init_timeout=3")
    alone = {  # each on a port of its own: none of them may meet another
        "c10d host": net.torchrun("a", rdzv_conf=",join_timeout=3", script=idle),
        "c10d other": net.torchrun("b", rdzv_conf=",read_timeout=3", port=PORT + 1, script=idle),
        "static": net.start("a", sys.executable, *static, idle),
        "no torchrun": net.start("b", sys.executable, ROOT / "train.py", *args, env=env),
    }
    t0 = time.time()
    codes = {name: wait(proc, 60 - (time.time() - t0)) for name, proc in alone.items()}
    assert all(codes.values()) and codes["no torchrun"] == INIT_HUNG_EXIT, codes
    said = {name: output(proc) for name, proc in alone.items()}
    assert "RendezvousTimeoutError" in said["c10d host"]
    assert f"trying to connect to ({ADDR['a']}, {PORT + 1})" in said["c10d other"]
    assert "1/2 clients joined" in said["static"]
    where = f"did not all connect within 3 s (run.init_timeout) at {ADDR['a']}:{PORT + 3}"
    assert where in said["no torchrun"] and "--local_addr" in said["no torchrun"]


COLLECTIVES = """
import torch
from encdiff import dist
d = dist.setup("cpu", init_timeout=60, collective_timeout=2)
print("connected", flush=True)
t = torch.ones(1)
while True:
    dist.all_reduce_mean(t)
"""


def test_a_cut_link_ends_both_ranks_with_one_line(net, tmp_path):
    """The link goes down under two ranks in a collective: each fails after its collective timeout
    (gloo would wait 30 minutes by default) and says it lost its peer, in one line. Node b's torchrun
    itself waits on its rendezvous store until the link is back (torchrun's, not ours)."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    a, b = (net.torchrun(side, script=script, env=[f"PYTHONPATH={ROOT}"]) for side in "ab")
    t0 = time.time()
    while output(a).count("connected") + output(b).count("connected") < 2:
        assert time.time() - t0 < 120 and a.poll() is None and b.poll() is None, output(a) + output(b)
        time.sleep(0.1)
    net.ip("-n", net.ns("b"), "link", "set", net.veth("b"), "down")
    t0 = time.time()
    assert wait(a, 60) != 0  # node a hosts the store: its torchrun ends when its rank does
    while any(p != b.pid for p in net.pids("b")):  # node b's rank
        assert time.time() - t0 < 60, output(b)[-3000:]
        time.sleep(0.1)
    for proc in (a, b):
        lines = [line for line in output(proc).splitlines() if "lost the other ranks" in line]
        assert len(lines) == 1 and "Timed out waiting 2000ms" in lines[0], output(proc)[-3000:]
        assert "Traceback" not in output(proc).split(" failed (exitcode")[0]  # the rank's part: no traceback
    net.ip("-n", net.ns("b"), "link", "set", net.veth("b"), "up")
    assert wait(b, 60) != 0


@pytest.mark.slow
def test_a_cut_link_during_training_leaves_the_last_checkpoint(net, tmp_path, tiny_data, one_node):
    out = tmp_path / "run"
    shutil.copytree(one_node / "vqvae", out / "vqvae")
    args = train_args(out, tiny_data, *LONG, "--run.collective_timeout=5")
    a, b = (net.torchrun(side, script_args=args) for side in "ab")
    wait_for_log_step(out, 6, (a, b))
    net.ip("-n", net.ns("b"), "link", "set", net.veth("b"), "down")
    assert wait(a, 60) != 0
    assert "lost the other ranks" in output(a)
    t0 = time.time()
    while any(p != b.pid for p in net.pids("b")):
        assert time.time() - t0 < 60, output(b)[-3000:]
        time.sleep(0.1)
    assert "lost the other ranks" in output(b)
    assert ckpt_steps(out) and ckpt_steps(out)[-1] < STEPS
    for path in (out / "encdiff").glob("ckpt_*.safetensors"):
        load_checkpoint(path, verify=True)
    net.ip("-n", net.ns("b"), "link", "set", net.veth("b"), "up")  # node b's torchrun waits for its store
    assert wait(b, 60) != 0
