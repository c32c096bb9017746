"""encdiff/graphs.py: the ranks agree on the CUDA graph. Two gloo ranks on the CPU play the capture
with a stand-in for the CUDA recording (a real DDP warm-up with its all-reduces, a recording that
fails on one rank): both end eager at the same step, with identical weights, and no hang."""

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import run_ranks
from encdiff import dist, graphs


class CpuGraphed(graphs.Graphed):
    """Graphed with the CUDA parts played on the CPU: the warm-up runs body, the recording runs it
    once more and then fails on `fail_rank` as a recording does (the op's error, then "capture
    invalidated" raised on top of it)."""

    def __init__(self, body, optimizers, fail_rank, rank):
        super().__init__(body, [], optimizers)
        self.fail = rank == fail_rank

    def warm_up(self, steps):
        for _ in range(steps):
            self.body()

    def free_cached_memory(self):
        pass

    def record(self):
        self.out = self.body()
        if self.fail:
            try:
                raise RuntimeError("operation not permitted when stream is capturing\nmore lines")
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.graph = "recorded"


def _rank(rank, world, init_file, q):
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    d = dist.Dist(rank, rank, world, torch.device("cpu"))
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01), fused=True)
    g = torch.Generator().manual_seed(10 + rank)

    def body():
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()  # DDP's all-reduce: the warm-up talks to the other rank
        opt.step()

    before = [p.detach().clone() for p in model.parameters()]
    snapshot = graphs.Snapshot(lambda: list(model.parameters()), [opt], [g])
    graphed = CpuGraphed(body, [opt], fail_rank=1, rank=rank)
    reason = graphs.capture_on_every_rank(graphed, snapshot, 3, d)
    restored = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for _ in range(2):  # the eager DDP steps both ranks now take
        body()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    q.put((rank, reason, graphed.graph, restored, weights.numpy().copy()))
    q.close()
    q.join_thread()
    torch_dist.destroy_process_group()


def test_a_failed_recording_on_one_rank_leaves_every_rank_eager(tmp_path):
    out = run_ranks(_rank, tmp_path / "init")
    for rank, reason, graph, restored, _ in out:
        # the first error of the chain, in one line, named on every rank
        assert reason == "rank 1: RuntimeError: operation not permitted when stream is capturing", (rank, reason)
        assert graph is None and restored
    assert (out[0][4] == out[1][4]).all()  # the eager steps after it kept the ranks in step


def test_one_process_keeps_its_graph_and_undoes_the_warm_up():
    w = torch.zeros(3)

    def body():
        w.add_(1.0)
        return w.sum()

    snapshot = graphs.Snapshot(lambda: [w], [], [])
    graphed = CpuGraphed(body, [], fail_rank=None, rank=0)
    assert graphs.capture_on_every_rank(graphed, snapshot, 4, dist.Dist(0, 0, 1, torch.device("cpu"))) is None
    assert graphed.graph == "recorded" and torch.equal(w, torch.zeros(3))
    graphed.fail = True
    assert graphs.capture_on_every_rank(graphed, snapshot, 4, dist.Dist(0, 0, 1, torch.device("cpu"))).startswith(
        "RuntimeError: operation not permitted"
    )
    assert graphed.graph is None
