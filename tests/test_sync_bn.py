import torch
import torch.distributed as dist
import torch.nn as nn

from conftest import run_ranks
from encdiff.sync_bn import GlobalBatchNorm2d, convert_to_global_bn


def _worker(rank, world, init_file, x, w_out, q):
    # a file rendezvous: no port to pick and lose to another process between picking and binding
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = convert_to_global_bn(nn.Sequential(nn.BatchNorm2d(3)))
    shard = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(shard)
    (y * w_out.chunk(world)[rank]).sum().backward()
    # numpy arrays travel by value; torch tensors would travel as shared-memory file descriptors
    # that the parent can only collect while this process is still alive (it may have exited)
    tensors = (y.detach(), shard.grad, bn[0].weight.grad, bn[0].running_mean, bn[0].running_var)
    q.put((rank, *(t.numpy().copy() for t in tensors)))
    q.close()
    q.join_thread()  # the result is in the pipe before this rank goes
    dist.destroy_process_group()


def test_two_ranks_match_one_batchnorm_over_the_global_batch(tmp_path):
    torch.manual_seed(1)
    x, w_out = torch.randn(8, 3, 5, 5) * 2 + 1, torch.randn(8, 3, 5, 5)
    ref = nn.BatchNorm2d(3)
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    (y_ref * w_out).sum().backward()

    out = run_ranks(_worker, tmp_path / "init", x, w_out)
    out = [(r, *map(torch.from_numpy, arrays)) for r, *arrays in out]
    y = torch.cat([o[1] for o in out])
    gx = torch.cat([o[2] for o in out])
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(gx, xr.grad, atol=1e-5)
    # the weight gradient is per-rank (DDP averages it); the sum over ranks is the full-batch one
    assert torch.allclose(out[0][3] + out[1][3], ref.weight.grad, atol=1e-4)
    assert torch.allclose(out[0][4], ref.running_mean, atol=1e-6) and torch.allclose(
        out[0][5], ref.running_var, atol=1e-5
    )


def test_is_plain_batchnorm_without_process_group():
    bn = GlobalBatchNorm2d(4)
    ref = nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    assert torch.allclose(bn(x), ref(x))


def _compiled_worker(rank, world, init_file, q):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    eager = convert_to_global_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    compiled = convert_to_global_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(rank))
    results = []
    for model, run in ((eager, eager), (compiled, torch.compile(compiled, fullgraph=True, backend="aot_eager"))):
        xi = x.clone().requires_grad_(True)
        y = run(xi)
        y.square().sum().backward()
        results.append([y.detach(), xi.grad, model[1].weight.grad, model[1].running_mean, model[1].running_var])
    q.put((rank, [bool(torch.allclose(a, b, atol=1e-5)) for a, b in zip(*results)]))
    q.close()
    q.join_thread()
    dist.destroy_process_group()


def test_compiled_global_batchnorm_has_no_graph_break_and_equals_eager(tmp_path):
    """torch.compile(fullgraph=True) traces both all-reduces (the statistics' and their gradient's)
    on 2 gloo ranks: outputs, input and weight gradients and running statistics equal eager's."""
    out = run_ranks(_compiled_worker, tmp_path / "init", timeout=180)
    for rank, same in out:
        assert all(same), (rank, same)
