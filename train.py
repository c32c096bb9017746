"""Train EncDiff: stage 1 the VQ autoencoder, stage 2 the concept encoder with the latent U-Net.

    python train.py --config config.toml                                  # one process
    torchrun --nproc_per_node=8 train.py --config config.toml             # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train.py --config config.toml          # two nodes
    python train.py --config config.toml --config configs/cpu.toml --encdiff.steps=2000

Stages run in order in one command; a finished stage is skipped; `run.resume = "auto"` continues
from the newest good checkpoint in `run.out_dir/<stage>/`. What one update of a stage does lives in
encdiff/steps.py and what its checkpoint holds in encdiff/ckpt_contents.py; here are the loop, the log,
the checkpoint cadence and the stop rules.
"""

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from encdiff import ckpt_contents, dist, pictures, runtime
from encdiff import ckpt_files as ckpt
from encdiff.config import check_resumable, from_toml_text, help_text, parse_args, to_toml
from encdiff.data import ensure_synth3d, load_all, open_dataset
from encdiff.errors import UserError, exit_on_user_error
from encdiff.models.encdiff import count_params
from encdiff.progress import LiveMetrics, describe_target
from encdiff.steps import EncDiffStep, VQStep, Window, attention_refusal, lr_factor, seconds_per_image


# ---------------------------------------------------------------------------------------------
# setup helpers


def check_output_dir(out_dir):
    """Fail before any long work if the run directory cannot be written."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(out_dir) / f".write_test_{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run.out_dir: cannot write to {out_dir} ({e.strerror})") from None


def open_data(cfg, d, stop):
    """Open (generating the bundled set on first use) and load the dataset as a uint8 tensor."""
    if cfg.data.name == "synth3d":  # generated when missing; when there, its grid must be data.grid
        if d.local_rank == 0:  # once per node (the write is atomic, so a shared disk is fine too)
            if not Path(cfg.data.path).exists():  # a mistyped path must not pass unnoticed
                print(f"data.path {cfg.data.path} does not exist: generating the bundled synth3d there", flush=True)
            ensure_synth3d(cfg.data.path, cfg.data.grid, stop=stop.check)
        dist.barrier()
    ds = open_dataset(cfg.data.name, cfg.data.path)
    h, w, c = ds.images.shape[1:]
    if (h, w, c) != (64, 64, 3):
        raise UserError(f"{cfg.data.path}: images are {h}x{w}x{c}; EncDiff's encoder needs 64x64x3")
    images = torch.from_numpy(load_all(ds, progress=d.is_main))  # (N, 64, 64, 3) uint8
    if d.device.type == "cuda" and cfg.data.on_device:
        images = images.to(d.device)  # resident: no data loader in the step
    return ds, images


PLAN_MIN_STEPS = 1000  # shorter runs start at once: timing them would cost more than it tells


def stages_to_train(cfg):
    """{stage: steps left} of the stages this command trains: a stage whose newest checkpoint (by its
    name) is at its last step has none left and is not listed."""
    todo = {}
    for s in cfg.run.stages:
        if s == "vqvae" and (cfg.vqvae.ckpt or cfg.vqvae.kind == "pool"):
            continue
        steps, done = getattr(cfg, s).steps, ckpt.newest_step(Path(cfg.run.out_dir) / s)
        if done < steps:
            todo[s] = steps - done
    return todo


def announce_plan(cfg, d):
    """Say what the run will do and, on a CPU, about how long from a few timed steps (before any long
    work); a run that would take longer than run.max_hours there stops with the reason."""
    todo = stages_to_train(cfg)
    if not todo:
        dist.print0(f"plan: every stage of {cfg.run.out_dir} has finished; nothing to train")
        return
    what = ", ".join(
        f"{s} {left:,}{'' if left == getattr(cfg, s).steps else f' of {getattr(cfg, s).steps:,}'} steps "
        f"at batch {getattr(cfg, s).batch_size}"
        for s, left in todo.items()
    )
    dist.print0(f"plan: {what} on {d.world_size} x {d.device.type}")
    if d.device.type != "cpu" or sum(todo.values()) < PLAN_MIN_STEPS:
        return
    dist.print0("plan: timing a few steps of each stage on this CPU ...")
    hours = sum(seconds_per_image(s, cfg, d) * n * getattr(cfg, s).batch_size / d.world_size for s, n in todo.items())
    hours /= 3600
    threads = torch.get_num_threads()
    how_long = f"{hours * 60:.0f} minutes" if hours < 2 else f"{hours:,.1f} hours"
    dist.print0(f"plan: about {how_long} on this CPU ({threads} thread{'s' if threads > 1 else ''}; from timed steps)")
    if cfg.run.max_hours and hours > cfg.run.max_hours:
        raise UserError(
            f"this run would take about {hours:,.0f} hours on this CPU (run.max_hours = "
            f"{cfg.run.max_hours:g}); config.toml is the GPU recipe: for a CPU add --config configs/cpu.toml "
            f"(about 20 minutes), or raise run.max_hours to run it anyway"
        )


class StageClock:
    """Wall seconds a stage has trained, over every invocation (the checkpoint carries the sum)."""

    def __init__(self, meta=None):
        self.offset = float((meta or {}).get("wall_s", 0.0))
        self.t0 = time.perf_counter()

    def __call__(self):
        return self.offset + time.perf_counter() - self.t0


def write_resolved_config(cfg, out_dir, stage_dir):
    """The config a stage trains with, beside its checkpoints and at the top of the run: written
    only once it really starts (after the data and the resume checks), so a rejected command
    leaves the run directory as it was, and a resumed run matches it in every key it fixes."""
    text = to_toml(cfg)
    (stage_dir / "config.toml").write_text(text)
    (out_dir / "config.toml").write_text(text)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
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


def find_resume(stage_dir, cfg, stage, d):
    if cfg.run.resume == "never":
        if ckpt.list_checkpoints(stage_dir):
            raise UserError(f"{stage_dir} already holds checkpoints and run.resume = 'never': use a new run.out_dir")
        return None
    found = ckpt.latest_good_checkpoint(stage_dir)
    if found is not None:
        path, _, meta = found
        check_resumable(from_toml_text(meta["config"], f"{path} (stored config)"), cfg, stage, path)
    # every rank must resume from the same step: on several nodes run.out_dir must be a shared disk
    mine = int(found[2]["step"]) if found is not None else 0
    first = dist.broadcast_object(mine)
    if mine != first:
        raise UserError(
            f"rank {d.rank} would resume {stage} from step {mine} but rank 0 from step {first}: "
            f"run.out_dir must be on a disk shared by every node"
        )
    return found


def reseed(seed, rank, step):
    # the global RNG (dropout) is reseeded at each stage start so a resumed run is reproducible
    torch.manual_seed(seed * 1_000_003 + rank * 7919 + step)


class Halt(Exception):
    """Training cannot go on (non-finite losses, a checkpoint that cannot be written)."""


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


def end_of_step(done, total, r, d, win, lr, stage_dir, bar, vote, save, wall_s=0.0, shown=None):
    """Log, checkpoint and stop checks after a step. Returns True when the run must stop now. Only a
    log step waits for the device. wall_s: the stage's seconds so far; shown: more for the bar."""
    bar.update(1)
    log_now = done % r.log_every == 0 or done == total
    if log_now:
        sums = dist.all_reduce_mean(torch.stack([win.loss, win.grad_norm, win.good, win.skipped])).tolist()
        good = max(sums[2], 1.0)
        rec = {
            "step": done,
            "loss": sums[0] / good,
            "lr": lr,
            "grad_norm": sums[1] / good,
            "skipped_nonfinite": int(round(sums[3])),
            "images_per_s": win.images / (time.perf_counter() - win.t0),
            "peak_mem_mb": peak_memory_mb(d.device),
            "wall_s": round(wall_s, 2),
        }
        if d.is_main:
            append_jsonl(stage_dir / "log.jsonl", rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}", **(shown or {}))
        streak = int(win.streak.item())
        win.reset()
        if streak >= r.max_nonfinite:
            save(done, final=True)
            bar.close()
            raise Halt(
                f"{streak} steps in a row had a non-finite loss or gradient (each was skipped); stopped at "
                f"step {done} with the last good weights saved in {stage_dir}. Lower the learning rate or "
                f"use perf.precision = 'fp32', then rerun to resume."
            )
    stopping = (log_now or done % r.stop_check_every == 0 or not d.enabled) and vote()
    if stopping or done % r.ckpt_every == 0 or done == total:
        save(done, final=stopping or done == total)
    if stopping:
        bar.close()
        dist.print0(
            f"\nstopped by {vote.stop.received or 'a signal on another rank'} at step {done}; checkpoint saved. "
            f"Run the same command to resume."
        )
    return stopping


def guarded_save(write, step, final, stage_dir, keep_last):
    """Write a checkpoint; a failed write (full disk) warns and leaves the previous one intact,
    except the last one of a stage, which must succeed."""
    try:
        write(step)
        ckpt.prune_checkpoints(stage_dir, keep_last)
    except OSError as e:
        if final:
            raise Halt(f"cannot write the checkpoint of step {step} in {stage_dir}: {e.strerror or e}") from None
        import warnings

        warnings.warn(
            f"checkpoint of step {step} not written ({e.strerror or e}); the previous one is intact", stacklevel=2
        )


def check_disk_space(stage_dir, modules, copies):
    """Fail early if a checkpoint (weights, optimiser moments, EMA: `copies` fp32 copies) cannot fit."""
    need = copies * sum(p.numel() * 4 for m in modules for p in m.parameters()) * 2  # x2: old + new file
    free = shutil.disk_usage(stage_dir).free
    if free < need:
        raise UserError(
            f"run.out_dir: {stage_dir} has {free / 2**20:.0f} MiB free; checkpoints need about {need / 2**20:.0f} MiB"
        )


# ---------------------------------------------------------------------------------------------
# stage 1: VQ autoencoder


def train_vqvae(cfg, d, images, out_dir, vote):
    v, r = cfg.vqvae, cfg.run
    stage_dir = out_dir / "vqvae"
    stage_dir.mkdir(parents=True, exist_ok=True)
    if v.kind == "pool":  # fixed: nothing to learn, one checkpoint so that stage 2 finds it as usual
        if d.is_main and ckpt.latest_good_checkpoint(stage_dir) is None:
            write_resolved_config(cfg, out_dir, stage_dir)
            ckpt_contents.save_fixed_vq(stage_dir / ckpt.checkpoint_name(v.steps), v.steps, cfg)
        dist.print0(f"vqvae: kind 'pool' ({v.pool_size}x{v.pool_size} average pooling) has nothing to train")
        dist.barrier()
        return False

    st = VQStep(cfg, d, images)
    start = 0
    found = find_resume(stage_dir, cfg, "vqvae", d)
    if found is not None:
        start = ckpt_contents.load_vq_training(st, found[1], found[2], found[0])
    clock = StageClock(found[2] if found else None)
    if start >= v.steps:
        dist.print0(f"vqvae: finished already (step {start}), skipped")
        return False
    if d.is_main:
        drop_rows_after(stage_dir / "log.jsonl", start)
    dist.print0(
        f"vqvae: {count_params(st.model):,} parameters, steps {start} -> {v.steps}, global batch {v.batch_size}"
    )
    if d.is_main:
        check_disk_space(stage_dir, [st.model] + ([st.disc] if st.disc is not None else []), copies=3)
        write_resolved_config(cfg, out_dir, stage_dir)
    reseed(r.seed, d.rank, start)
    st.prepare(start)

    def save(step, final=False):
        if d.is_main:
            guarded_save(
                lambda s: ckpt_contents.save_vq(stage_dir / ckpt.checkpoint_name(s), s, st, cfg, clock()),
                step,
                final,
                stage_dir,
                r.keep_last,
            )

    bar = tqdm(total=v.steps, initial=start, desc="vqvae", disable=not d.is_main, dynamic_ncols=True)
    win = Window(d.device)
    for step in range(start, v.steps):
        loss, grad_norm, x, xrec = st(step)
        win.add(loss, grad_norm, v.batch_size)
        done = step + 1
        if d.is_main and (done % r.image_every == 0 or (done == v.steps and r.image_every <= v.steps)):
            pictures.save_vq_reconstructions(x[:8], xrec[:8], stage_dir / f"recon_{done:08d}.png")
        if end_of_step(done, v.steps, r, d, win, v.lr, stage_dir, bar, vote, save, clock()):
            return True
    bar.close()
    dist.barrier()
    return False


# ---------------------------------------------------------------------------------------------
# stage 2: concept encoder + latent U-Net


def train_encdiff(cfg, d, images, out_dir, vote, factor_sizes=None):
    e, r = cfg.encdiff, cfg.run
    stage_dir = out_dir / "encdiff"
    stage_dir.mkdir(parents=True, exist_ok=True)
    vq, vq_path = ckpt_contents.frozen_vq(cfg, out_dir, d.device)
    st = EncDiffStep(cfg, d, images, vq)
    start = 0
    found = find_resume(stage_dir, cfg, "encdiff", d)
    if found is not None:
        start = ckpt_contents.load_encdiff_training(st, found[1], found[2], found[0])
    clock = StageClock(found[2] if found else None)
    if start >= e.steps:
        dist.print0(f"encdiff: finished already (step {start}), skipped")
        return False
    if d.is_main:
        for log in ("log.jsonl", "metrics.jsonl"):
            drop_rows_after(stage_dir / log, start)
    dist.print0(
        f"encdiff: encoder {count_params(st.model.encoder):,} + U-Net {count_params(st.model.unet):,} parameters, "
        f"steps {start} -> {e.steps}, global batch {e.batch_size}, lr {st.lr:.3g}, VQ from {vq_path}"
    )
    if d.is_main:
        check_disk_space(stage_dir, [st.model, vq], copies=4)
        write_resolved_config(cfg, out_dir, stage_dir)
    reseed(r.seed, d.rank, start)
    st.prepare(start, stop=vote.stop.check)

    def save(step, final=False):
        if d.is_main:
            guarded_save(
                lambda s: ckpt_contents.save_encdiff(
                    stage_dir / ckpt.checkpoint_name(s), s, st, cfg, vq_path, factor_sizes, clock()
                ),
                step,
                final,
                stage_dir,
                r.keep_last,
            )

    # the live encoder's quick metrics (eval.every), scored in the background on rank 0
    live = LiveMetrics(cfg, stage_dir, factor_sizes, images, d.device) if d.is_main else None
    bar = tqdm(total=e.steps, initial=start, desc="encdiff", disable=not d.is_main, dynamic_ncols=True)
    win = Window(d.device)
    for step in range(start, e.steps):
        loss, grad_norm, x = st(step)
        win.add(loss, grad_norm, e.batch_size)
        done = step + 1
        if live is not None:
            live.maybe_start(done, st.model.encoder, done * e.batch_size, clock(), vote.stop.received is not None)
            for record in live.poll():
                if record.get("target_reached"):
                    bar.write(describe_target([record], cfg.eval))
        if d.is_main and (done % r.image_every == 0 or (done == e.steps and r.image_every <= e.steps)):
            pictures.save_reconstructions(
                ckpt_contents.trained_from_step(st),
                x[:8],
                stage_dir / f"samples_{done:08d}.png",
                steps=min(50, cfg.eval.ddim_steps),
                seed=done,
            )
        lr = st.lr * lr_factor(step, e.warmup_steps)
        if end_of_step(done, e.steps, r, d, win, lr, stage_dir, bar, vote, save, clock(), live and live.latest):
            if live is not None:
                live.close()  # the checkpoint is written: keep the scores still being computed (a 2nd signal skips)
            return True
    bar.close()
    if live is not None:
        live.close()
        if live.every:
            dist.print0(describe_target(live.records, cfg.eval, e.steps))
    dist.barrier()
    return False


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    """-> the exit status: 0 when every stage finished, 128 + signal number when a signal stopped it."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # say what to give rather than start the GPU recipe
        raise UserError(
            "no config given: python train.py --config config.toml (a GPU), add --config "
            "configs/cpu.toml on a CPU; --help lists every key"
        )
    if "-h" in argv or "--help" in argv:
        print(help_text(__doc__))
        return 0
    cfg = parse_args(argv)  # every config mistake stops here
    stop = StopSignal(cfg.run.stop_signals)
    d = dist.setup(cfg.run.device, cfg.run.init_timeout)
    for name in ("vqvae", "encdiff"):
        if getattr(cfg, name).batch_size % d.world_size:
            raise UserError(
                f"{name}.batch_size = {getattr(cfg, name).batch_size} is not divisible by the world size {d.world_size}"
            )
    refusal = attention_refusal(cfg, d.device)
    if refusal is not None:
        raise UserError(f"perf.attention = {cfg.perf.attention!r} cannot run here: {refusal} (use 'auto')")
    if d.device.type == "cpu" and cfg.perf.precision in ("bf16", "fp16"):
        dist.print0(
            f"note: perf.precision = {cfg.perf.precision!r} on the CPU emulates what a GPU does in hardware "
            f"and runs far slower than fp32 ('auto' picks fp32 here)"
        )
    if cfg.vqvae.ckpt:
        ckpt_contents.check_given_vq(cfg)
    runtime.set_cuda_flags(d.device, cfg.perf.tf32)
    announce_plan(cfg, d)
    out_dir = Path(cfg.run.out_dir)
    if d.is_main:
        check_output_dir(out_dir)
    ds, images = open_data(cfg, d, stop)
    dist.print0(
        f"data: {cfg.data.name} {cfg.data.path}, {len(images):,} images, world size {d.world_size}, device {d.device}"
    )
    for name in ("vqvae", "encdiff"):
        if len(images) < getattr(cfg, name).batch_size:
            raise UserError(
                f"{name}.batch_size = {getattr(cfg, name).batch_size} is larger than the dataset ({len(images)} images)"
            )

    vote = StopVote(stop, d)
    stopped = False
    if "vqvae" in cfg.run.stages and not cfg.vqvae.ckpt:
        stopped = train_vqvae(cfg, d, images, out_dir, vote)
    if "encdiff" in cfg.run.stages and not stopped:
        stopped = train_encdiff(cfg, d, images, out_dir, vote, getattr(ds, "factor_sizes", None))
    dist.print0(f"{'stopped' if stopped else 'done'}: {out_dir}")
    dist.cleanup()
    return stop.exit_code if stopped else 0


def run():
    try:
        code = exit_on_user_error(main)
    except Halt as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:
        print(
            f"stopped by {e} before training started; nothing was written that a rerun would not redo", file=sys.stderr
        )
        sys.exit(128 + getattr(signal, str(e)))
    sys.exit(code)


if __name__ == "__main__":
    run()
