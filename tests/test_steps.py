"""encdiff/steps.py: the one home of each stage's update. On the CPU: no host sync inside a step,
the benchmark's step is train.py's, the non-finite guard, the EMA, the batch order. On CUDA: the
captured update trains exactly as the eager one."""

import math
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from encdiff import ckpt_contents, dist, graphs, optim, steps
from encdiff import ckpt_files as ckpt
from encdiff.config import parse_args
from encdiff.data import load_all, open_dataset
from encdiff.models.encdiff import build_vq
from encdiff.runlog import NoBoard, Window
from conftest import ROOT, TINY, final, run_train

SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")


def tiny_config(data, *extra):
    return parse_args([*TINY, "--data.name=h5", f"--data.path={data}", "--run.device=cpu", *extra])


def dataset_tensor(cfg):
    return torch.from_numpy(load_all(open_dataset(cfg.data.name, cfg.data.path), progress=False))


class CountSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if any(name.startswith(op) for op in SYNCING_OPS):
            self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def one_process():
    return dist.Dist(0, 0, 1, torch.device("cpu"))


def stage_steps(cfg, images):
    torch.manual_seed(3)
    vq = build_vq(cfg.vqvae).eval().requires_grad_(False)
    return {
        "vqvae": steps.VQStep(cfg, one_process(), images),
        "encdiff": steps.EncDiffStep(cfg, one_process(), images, vq),
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_no_host_sync_inside_a_step(tiny_data, precision):
    """The update, the log window and the end-of-step checks between log steps read nothing back."""
    import train

    cfg = tiny_config(
        tiny_data, f"--perf.precision={precision}", "--run.log_every=1000", "--run.stop_check_every=1000",
        "--vqvae.batch_size=2", "--encdiff.batch_size=2",  # what runs, not how much, is counted
    )  # fmt: skip
    images = dataset_tensor(cfg)
    for stage, st in stage_steps(cfg, images).items():
        st.prepare(0)
        win = Window(torch.device("cpu"))
        vote = dist.StopVote(dist.StopSignal([]), one_process())
        cadence = train.Cadence(cfg.run, one_process(), 100, None, _Bar(), vote, lambda *a, **k: None, NoBoard())
        st(0)  # the optimiser's state is made at its first step
        with CountSyncs() as counter:
            for i in range(1, 2):  # the optimiser's state exists: a steady step
                out = st(i)
                win.add(out[0], out[1], len(out[2]))
                assert not cadence.after_step(i + 1, win, 1e-3, 0.0, {})
        assert counter.seen == {}, (stage, precision, counter.seen)


class _Bar:
    def update(self, n):
        pass


def test_the_benchmark_step_is_train_pys_step(tiny_data, straight):
    """train.py's stage 2 and train_bench.py's step from the same VQ: bitwise equal weights."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_bench

    out = straight  # trained with one thread (OMP_NUM_THREADS=1); only read here
    cfg = tiny_config(tiny_data, f"--run.out_dir={out}")
    vq, _ = ckpt_contents.frozen_vq(cfg, out, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU's reductions depend on the thread count
    try:
        st = train_bench.build_step("encdiff", cfg, one_process(), dataset_tensor(cfg), vq=vq)
        for i in range(cfg.encdiff.steps):
            st(i)
    finally:
        torch.set_num_threads(threads)
    trained = final(out, "encdiff")
    mine = {
        **ckpt.prefixed("encoder", st.model.encoder.state_dict()),
        **ckpt.prefixed("unet", st.model.unet.state_dict()),
        **ckpt.prefixed("ema", st.ema.state_dict()),
    }
    assert mine.keys() <= trained.keys()
    for k, v in mine.items():
        assert torch.equal(v, trained[k]), k


def fused_adamw(params, lr=1e-2):
    return torch.optim.AdamW(params, lr=torch.tensor(lr), fused=True)


def test_a_nonfinite_gradient_leaves_the_optimiser_untouched():
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = fused_adamw([p])
    guard = optim.NonFiniteGuard("fp32", torch.device("cpu"), fused=True)
    for g in (torch.ones(5, 3), torch.full((5, 3), math.nan)):
        before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()} if opt.state else None)
        p.grad = g
        guard.start()
        norm = guard.step(opt, [p])
        guard.update()
    assert not torch.isfinite(norm) and guard.found_inf.item() == 1.0
    assert torch.equal(p.detach(), before[0])
    for k, v in opt.state[p].items():
        assert torch.equal(v, before[1][k]), k  # moments and the step count too
    assert opt.state[p]["step"].item() == 1


def test_fp16_scale_halves_on_overflow_and_the_norm_is_unscaled():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = fused_adamw([p])
    guard = optim.NonFiniteGuard("fp16", torch.device("cpu"), fused=True)
    scale = guard.scale.item()
    guard.start()
    guard.backward((p * torch.tensor([1.0, 2.0, 2.0, 4.0])).sum())  # gradient (1, 2, 2, 4): norm 5
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 2.0, 4.0]) * scale)
    assert guard.step(opt, [p]).item() == pytest.approx(5.0)
    guard.update()
    assert guard.scale.item() == scale and guard.found_inf.item() == 0
    p.grad = torch.full((4,), math.inf)
    guard.start()
    guard.step(opt, [p])
    guard.update()
    assert guard.scale.item() == scale / 2


def test_ema_follows_ldm_litema_and_its_warmup():
    """LDM's LitEma: num_updates starts at 0 and is incremented before use, so update 1 has decay
    min(decay, 2/11); shadow -= (1 - decay) * (shadow - param)."""
    module = torch.nn.Linear(3, 2)
    ema = optim.EMA(module, decay=0.9999)
    shadow = {n: p.detach().clone() for n, p in module.named_parameters()}
    for n in range(1, 6):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.set_update(n)
        ema.apply()
        decay = min(0.9999, (1 + n) / (10 + n))
        for name, p in module.named_parameters():
            shadow[name] -= (1 - decay) * (shadow[name] - p.detach())
    assert ema.one_minus_decay.item() == pytest.approx(1 - 6 / 15)
    for name, avg in ema.state_dict().items():
        torch.testing.assert_close(avg, shadow[name], rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_ema_is_one_fused_pass_on_cuda_that_leaves_the_weights_alone():
    """CUDA's fused SGD kernel (the EMA's one pass) writes only the average: the weights stay."""
    module = torch.nn.Linear(300, 200).cuda()
    ema = optim.EMA(module, decay=0.9999)
    with torch.no_grad():
        module.weight.add_(1.0)
    before = [p.detach().clone() for p in module.parameters()]
    shadow = [a.clone() for a in ema.avg]
    ema.set_update(3)
    ema.apply()
    w = 1 - 4 / 13
    for avg, s, p, b in zip(ema.avg, shadow, module.parameters(), before):
        assert torch.equal(p, b)
        torch.testing.assert_close(avg, s - w * (s - b), rtol=0, atol=1e-6)


def test_batch_order_is_a_seeded_permutation_split_over_ranks():
    n, batch, world = 50, 8, 2
    orders = [
        steps.BatchOrder(n, batch, dist.Dist(r, r, world, torch.device("cpu")), 7, torch.device("cpu"))
        for r in range(world)
    ]
    assert orders[0].per_epoch == 6  # the short last batch (2 images) is dropped
    for step in (0, 5, 6, 13):
        epoch, i = divmod(step, 6)
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(7 * 100003 + epoch))[i * 8 : (i + 1) * 8]
        got = torch.cat([o.indices(step) for o in orders])
        assert torch.equal(got, expected) and torch.equal(orders[0].global_indices(step), expected)
    assert not set(orders[0].indices(1).tolist()) & set(orders[1].indices(1).tolist())


def test_optimizer_moments_keep_the_channels_last_layout_after_loading():
    """A fused optimiser walks a weight and its moments in memory order: moments loaded contiguous
    beside a channels-last weight would pair the wrong elements (a resumed run diverged)."""
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = fused_adamw(conv.parameters())
    conv(torch.randn(2, 3, 8, 8)).square().sum().backward()
    opt.step()
    tensors, groups = ckpt.optimizer_to_tensors(opt, "opt")
    other = fused_adamw(conv.parameters())
    ckpt.optimizer_from_tensors(other, "opt", {k: v.contiguous() for k, v in tensors.items()}, groups)
    state = other.state[conv.weight]
    assert state["exp_avg"].stride() == conv.weight.stride() and torch.equal(
        state["exp_avg"], opt.state[conv.weight]["exp_avg"]
    )
    assert torch.is_tensor(other.param_groups[0]["lr"])  # still the tensor a captured step reads


@pytest.mark.parametrize("stage", ["vqvae", "encdiff"])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_the_capture_warmup_is_undone_exactly(tiny_data, stage, steps_before):
    """What a CUDA graph's warm-up does to the training state (weights, optimiser, EMA, generators)
    is put back, for a fresh optimiser and for one with state (a resumed run)."""
    cfg = tiny_config(tiny_data)
    images = dataset_tensor(cfg)

    def trained(warmup):
        st = stage_steps(cfg, images)[stage]
        st.prepare(0)
        for i in range(steps_before):
            st(i)
        if warmup:
            snapshot = graphs.Snapshot(st.mutable_tensors, st.optimizers(), st.own_generators())
            for _ in range(3):
                st(steps_before)
            snapshot.restore()
        for i in range(steps_before, steps_before + 2):
            st(i)
        return st

    a, b = trained(False), trained(True)
    for x, y in zip(a.mutable_tensors(), b.mutable_tensors(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(graphs.optimizer_state(a.opt), graphs.optimizer_state(b.opt), strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# CUDA: the captured update


def cuda_config(data, *extra):
    return parse_args(
        [
            *TINY,
            "--data.name=h5",
            f"--data.path={data}",
            "--run.device=cuda",
            "--perf.compile=off",
            "--perf.attention=sdpa",
            *extra,
        ]
    )


def run_steps(cfg, stage, n, start=0, load=None):
    d = dist.Dist(0, 0, 1, torch.device("cuda", 0))
    images = dataset_tensor(cfg).to(d.device)
    torch.manual_seed(3)
    vq = build_vq(cfg.vqvae).to(d.device).eval().requires_grad_(False)
    st = steps.VQStep(cfg, d, images) if stage == "vqvae" else steps.EncDiffStep(cfg, d, images, vq)
    if load is not None:
        load(st)
    st.prepare(start)
    losses = [st(i)[0].item() for i in range(start, start + n)]
    return st, losses


def state_of(st):
    state = {f"model.{k}": v.clone() for k, v in st.model.state_dict().items()}
    if hasattr(st, "ema"):
        state.update({f"ema.{k}": v.clone() for k, v in st.ema.state_dict().items()})
    return state


def test_the_discriminator_learns_from_the_updated_autoencoders_reconstruction(tiny_data):
    """With vqvae.use_gan, as the release's two-optimiser loop does: the autoencoder steps, runs
    again, and the discriminator's loss takes that second reconstruction."""
    cfg = tiny_config(tiny_data, "--vqvae.use_gan=true", "--vqvae.disc_start=0")
    st = steps.VQStep(cfg, one_process(), dataset_tensor(cfg))
    seen = []
    discriminator_loss = st.loss_fn.discriminator_loss
    st.loss_fn.discriminator_loss = lambda x, xrec, step: seen.append(xrec) or discriminator_loss(x, xrec, step)
    _, _, x, xrec_before = st(0)
    with torch.no_grad():
        xrec_after, _, _ = st.model(x)
    assert len(seen) == 1
    assert torch.equal(seen[0], xrec_after.float())
    assert not torch.allclose(seen[0], xrec_before.float())


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["vqvae", "encdiff"])
def test_captured_update_trains_as_the_eager_one(tiny_data, stage):
    """Kernels are the same with the graph on and off (compile off, sdpa, fp32 here), so the
    weights after a few updates must be bitwise equal; the first update is a replay."""
    eager, eager_losses = run_steps(
        cuda_config(tiny_data, "--perf.cuda_graph=false", "--perf.precision=fp32"), stage, 5
    )
    graphed, graphed_losses = run_steps(cuda_config(tiny_data, "--perf.precision=fp32"), stage, 5)
    assert eager.graph is None and graphed.graph is not None
    assert graphed_losses == eager_losses
    a, b = state_of(eager), state_of(graphed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
def test_captured_update_resumes_bitwise(tmp_path, tiny_data):
    cfg = cuda_config(tiny_data)
    straight, _ = run_steps(cfg, "encdiff", 6)
    first, _ = run_steps(cfg, "encdiff", 3)
    path = tmp_path / "c.safetensors"
    ckpt_contents.save_encdiff(path, 3, first, cfg, "vq")
    tensors, meta = ckpt.load_checkpoint(path)
    resumed, _ = run_steps(
        cfg, "encdiff", 3, start=3, load=lambda st: ckpt_contents.load_encdiff_training(st, tensors, meta, path)
    )
    a, b = state_of(straight), state_of(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
def test_train_py_with_the_graph_skips_a_nonfinite_step(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("ENCDIFF_INJECT_NAN", "3")
    out = tmp_path / "run"
    r = run_train(out, tiny_data, "--run.device=cuda", "--perf.compile=off", "--run.log_every=6")
    assert "the update is one CUDA graph" in r.stdout
    import json

    log = [json.loads(line) for line in (out / "encdiff" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_nonfinite"] == 1 and np.isfinite(log[-1]["loss"])


def test_compile_blocks_compiles_each_repeated_block_in_place(tiny_data):
    """perf.compile_scope = "blocks": every ResBlock, SpatialTransformer and the concept encoder is
    compiled in place (compiled at its first call); the model is not wrapped."""
    cfg = tiny_config(tiny_data)
    st = stage_steps(cfg, dataset_tensor(cfg))["encdiff"]
    model = st.model
    assert steps.compile_model(model, "default", "blocks") is model
    compiled = {type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {"ResBlock", "SpatialTransformer", "ConceptEncoder"}
    assert not isinstance(steps.compile_model(model, "default", "model"), type(model))
