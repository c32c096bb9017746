"""Train EncDiff: stage 1 the VQ autoencoder, stage 2 the concept encoder with the latent U-Net.

    python train.py --config config.toml                                  # one process
    torchrun --nproc_per_node=8 train.py --config config.toml             # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train.py --config config.toml          # two nodes
    python train.py --config config.toml --config configs/cpu.toml --encdiff.steps=2000
    torchrun --nproc_per_node=8 train.py --config config.toml \
        --run.seeds=0,1,2,3,4,5,6,7 --run.parallel=seeds                  # 8 seeds at once, one per GPU

Stages run in order in one command; a finished stage is skipped; `run.resume = "auto"` continues
from the newest good checkpoint in `run.out_dir/<stage>/`. What one update of a stage does lives in
encdiff/steps.py, what its checkpoint holds in encdiff/ckpt_contents.py, the checks before any long
work in encdiff/plan.py; here are main, the loop, the log and the checkpoint cadence.
"""

import copy
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
from encdiff.config import help_text, parse_args, to_toml
from encdiff.data import ensure_synth3d, load_all, open_dataset
from encdiff.dist import StopSignal, Stopped, StopVote
from encdiff.errors import UserError, exit_on_user_error
from encdiff.images import check_images
from encdiff.live import LiveMetrics
from encdiff.evaluation import describe_target, plot_runs, read_jsonl, target_met
from encdiff.plan import announce_plan, attention_refusal
from encdiff.runlock import RunLock
from encdiff.runlog import Board, NoBoard, Window, append_jsonl, check_tensorboard, drop_rows_after, peak_memory_mb
from encdiff.steps import EncDiffStep, VQStep

STAGES = ("vqvae", "encdiff")


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
    code = 0
    for one in seed_runs(cfg):  # cfg itself, or one run per seed of run.seeds
        code = train_run(one, stop)
        if cfg.run.seeds and os.environ.get("RANK", "0") == "0":  # one figure per run.out_dir writer
            plot_seeds(cfg)
        if code:  # a stop signal: the next seeds wait for the rerun
            break
    dist.cleanup()
    return code


def seed_runs(cfg):
    """The runs this process trains: cfg, or with run.seeds one per seed in run.out_dir/seed_N (each
    resumable on its own). Under run.parallel = "seeds" only this process's share of the seeds, each
    process a run of its own: no process group, its own GPU (LOCAL_RANK) or CPU threads."""
    if not cfg.run.seeds:
        return [cfg]
    seeds = cfg.run.seeds
    if cfg.run.parallel == "seeds":
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if len(seeds) < world:
            raise UserError(
                f"run.parallel = 'seeds': {len(seeds)} seeds for {world} processes; give each process a seed"
            )
        seeds = seeds[rank::world]
        os.environ.update(RANK="0", WORLD_SIZE="1")  # what dist.setup reads: this process alone
    runs = []
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.run.seed, one.run.seeds, one.run.parallel = seed, [], "none"
        one.run.out_dir = str(Path(cfg.run.out_dir) / f"seed_{seed}")
        runs.append(one)
    return runs


def plot_seeds(cfg):
    """run.out_dir/progress.png: every seed's live metrics so far on one axis of images seen."""
    out = Path(cfg.run.out_dir)
    runs = [(f"seed {s}", read_jsonl(out / f"seed_{s}" / "encdiff" / "metrics.jsonl")) for s in cfg.run.seeds]
    plot_runs(out / "progress.png", runs, f"{out}: {len(runs)} seeds", cfg.eval)


def train_run(cfg, stop):
    """One run: the checks before any long work, then its stages in run.out_dir. -> exit status."""
    d = dist.setup(cfg.run.device, cfg.run.init_timeout, cfg.run.collective_timeout)
    for name in STAGES:
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
    check_tensorboard(cfg.run.tensorboard)
    runtime.set_cuda_flags(d.device, cfg.perf.tf32)
    announce_plan(cfg, d)
    out_dir = Path(cfg.run.out_dir)
    if d.is_main:
        check_output_dir(out_dir)
    with RunLock(out_dir, d):  # one writer per run directory, released when this process ends
        stopped = train_stages(cfg, d, stop, out_dir)
    dist.print0(f"{'stopped' if stopped else 'done'}: {out_dir}")
    return stop.exit_code if stopped else 0


def train_stages(cfg, d, stop, out_dir):
    """The data, then each stage of run.stages in order. -> True when a stop signal ended the run."""
    ds, images = open_data(cfg, d, stop)
    dist.print0(
        f"data: {cfg.data.name} {cfg.data.path}, {len(images):,} images, world size {d.world_size}, device {d.device}"
    )
    if cfg.eval.stop_at_target and getattr(ds, "factor_sizes", None) is None:
        raise UserError(f"eval.stop_at_target needs a dataset with a factor grid to score; {cfg.data.name} has none")
    for name in STAGES:
        if len(images) < getattr(cfg, name).batch_size:
            raise UserError(
                f"{name}.batch_size = {getattr(cfg, name).batch_size} is larger than the dataset ({len(images)} images)"
            )

    vote = StopVote(stop, d)
    stopped = False
    for stage in STAGES:
        if stage in cfg.run.stages and not stopped and not (stage == "vqvae" and cfg.vqvae.ckpt):
            stopped = train_stage(stage, cfg, d, images, out_dir, vote, getattr(ds, "factor_sizes", None))
    return stopped


def run(argv=None):
    """The command line: main's exit status, a one-line error (exit 2 for a mistake, 1 for a halt)."""
    try:
        code = exit_on_user_error(lambda: main(argv))
    except Halt as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:
        print(
            f"stopped by {e} before training started; nothing was written that a rerun would not redo", file=sys.stderr
        )
        sys.exit(128 + getattr(signal, str(e)))
    sys.exit(code)


class Halt(Exception):
    """Training cannot go on (non-finite losses, a checkpoint that cannot be written)."""


# ---------------------------------------------------------------------------------------------
# one stage


def train_stage(stage, cfg, d, images, out_dir, vote, factor_sizes=None):
    """Train `stage` ("vqvae" or "encdiff") from where its checkpoints left it. -> True when a stop
    signal ended it (its checkpoint written), False when it finished."""
    section = getattr(cfg, stage)
    stage_dir = out_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    if stage == "vqvae" and section.kind == "pool":
        return fixed_first_stage(cfg, d, out_dir, stage_dir)
    st = build_stage_step(stage, cfg, d, images, out_dir, factor_sizes)
    found = ckpt_contents.find_resume(stage_dir, cfg, stage, d)
    start = ckpt_contents.load_training(st, found) if found is not None else 0
    clock = StageClock(found[2] if found else None)
    if start >= section.steps:
        dist.print0(f"{stage}: finished already (step {start}), skipped")
        return False
    met = target_met_by(stage_dir, cfg, start) if stage == "encdiff" and cfg.eval.stop_at_target else None
    if met is not None:
        dist.print0(f"{stage}: finished already (the targets reached at step {met}, eval.stop_at_target), skipped")
        return False
    dist.print0(st.summary(start))
    if d.is_main:
        for log in ("log.jsonl", "metrics.jsonl"):  # the rows of steps this run will do again go
            drop_rows_after(stage_dir / log, start)
        check_disk_space(stage_dir, ckpt_contents.checkpoint_bytes(st))
        write_resolved_config(cfg, out_dir, stage_dir)
    reseed(cfg.run.seed, d.rank, start)
    st.prepare(start, stop=vote.stop.check)

    def save(step, final=False):
        path = stage_dir / ckpt.checkpoint_name(step)
        if d.is_main:
            guarded_save(
                lambda: ckpt_contents.save_training(path, step, st, cfg, clock()), step, final, stage_dir, cfg.run
            )

    bar = tqdm(total=section.steps, initial=start, desc=stage, disable=not d.is_main, dynamic_ncols=True)
    board = Board(out_dir / "tensorboard" / stage, start) if cfg.run.tensorboard and d.is_main else NoBoard()
    cadence = Cadence(cfg.run, d, section.steps, stage_dir, bar, vote, save, board)
    extras = (VQExtras if stage == "vqvae" else EncDiffExtras)(cfg, d, images, stage_dir, st, bar, board)
    win = Window(d.device)
    for step in range(start, section.steps):
        out = st(step)
        win.add(out[0], out[1], section.batch_size)
        at_target = extras.after_step(step + 1, out, clock(), vote.stop.received is not None)
        if cadence.after_step(step + 1, win, st.lr_at(step), clock(), extras.shown(), at_target):
            extras.close()  # the checkpoint is written: the live scores in flight are kept (a 2nd signal skips)
            board.close()
            return True
        if at_target:
            dist.print0(f"\n{stage}: the targets reached at step {step + 1} (eval.stop_at_target): finished there")
            break
    bar.close()
    extras.close(finished=True)
    board.close()
    dist.barrier()
    return False


def target_met_by(stage_dir, cfg, step):
    """The step at which eval.stop_at_target's rule was met in the run's records up to `step`, or None."""
    met = target_met([r for r in read_jsonl(stage_dir / "metrics.jsonl") if r["step"] <= step], cfg.eval)
    return None if met is None else met["step"]


def build_stage_step(stage, cfg, d, images, out_dir, factor_sizes):
    if stage == "vqvae":
        return VQStep(cfg, d, images)
    vq, vq_path = ckpt_contents.frozen_vq(cfg, out_dir, d.device)
    return EncDiffStep(cfg, d, images, vq, vq_source=vq_path, factor_sizes=factor_sizes)


def fixed_first_stage(cfg, d, out_dir, stage_dir):
    """vqvae.kind = "pool" has nothing to learn: one checkpoint, so that stage 2 finds it as usual."""
    v = cfg.vqvae
    if d.is_main and ckpt.latest_good_checkpoint(stage_dir) is None:
        write_resolved_config(cfg, out_dir, stage_dir)
        ckpt_contents.save_fixed_vq(stage_dir / ckpt.checkpoint_name(v.steps), v.steps, cfg)
    dist.print0(f"vqvae: kind 'pool' ({v.pool_size}x{v.pool_size} average pooling) has nothing to train")
    dist.barrier()
    return False


def picture_due(done, steps, every):
    return done % every == 0 or (done == steps and every <= steps)


class VQExtras:
    """Stage 1 besides its updates: a grid of inputs over reconstructions every run.image_every."""

    def __init__(self, cfg, d, images, stage_dir, st, bar, board):
        self.cfg, self.d, self.stage_dir, self.board = cfg, d, stage_dir, board

    def after_step(self, done, out, wall_s, stopping):
        if self.d.is_main and picture_due(done, self.cfg.vqvae.steps, self.cfg.run.image_every):
            _, _, x, xrec = out
            path = self.stage_dir / f"recon_{done:08d}.png"
            pictures.save_vq_reconstructions(x[:8], xrec[:8], path)
            self.board.image("reconstructions", path, done)

    def shown(self):
        return {}

    def close(self, finished=False):
        pass


class EncDiffExtras:
    """Stage 2 besides its updates: the live encoder's quick metrics (eval.every, scored in the
    background on rank 0) and DDIM samples from the images' tokens every run.image_every."""

    def __init__(self, cfg, d, images, stage_dir, st, bar, board):
        self.cfg, self.d, self.stage_dir, self.st, self.bar, self.board = cfg, d, stage_dir, st, bar, board
        self.live = LiveMetrics(cfg, stage_dir, st.factor_sizes, images, d.device, board) if d.is_main else None

    def after_step(self, done, out, wall_s, stopping):
        """-> True when eval.stop_at_target ends the stage at this step (every rank alike)."""
        e, ev = self.cfg.encdiff, self.cfg.eval
        if self.live is not None:
            self.live.maybe_start(done, self.st.model.encoder, done * e.batch_size, wall_s, stopping)
            # stop_at_target waits for this point's scores, so that it can stop at this very step
            for record in self.live.poll(wait=ev.stop_at_target and not stopping):
                if record.get("target_reached"):
                    self.bar.write(describe_target([record], ev))
        if self.d.is_main and picture_due(done, e.steps, self.cfg.run.image_every):
            trained = ckpt_contents.trained_from_step(self.st)
            path = self.stage_dir / f"samples_{done:08d}.png"
            pictures.save_reconstructions(trained, out[2][:8], path, steps=min(50, ev.ddim_steps), seed=done)
            self.board.image("samples", path, done)
        if not (ev.stop_at_target and done % ev.every == 0):
            return False
        met = self.live is not None and target_met(self.live.records, ev) is not None
        return dist.broadcast_object(met) if self.d.enabled else met  # rank 0 scored; a sync per eval point

    def shown(self):
        return self.live.latest if self.live is not None else {}

    def close(self, finished=False):
        if self.live is None:
            return
        self.live.close()
        if finished and self.live.every:
            print(describe_target(self.live.records, self.cfg.eval, self.cfg.encdiff.steps), flush=True)


# ---------------------------------------------------------------------------------------------
# the log, the checkpoint cadence, the stop


class Cadence:
    """After each step: the log (every run.log_every steps, the only host sync), the checkpoints
    (every run.ckpt_every, at the end, and at a stop) and the stop vote."""

    def __init__(self, r, d, total, stage_dir, bar, vote, save, board):
        self.r, self.d, self.total, self.stage_dir = r, d, total, stage_dir
        self.bar, self.vote, self.save, self.board = bar, vote, save, board

    def after_step(self, done, win, lr, wall_s, shown, last=False):
        """-> True when a stop signal ends the run now (its checkpoint written). last: the stage ends
        at this step before its step count (eval.stop_at_target): logged and saved as its last step."""
        r, d = self.r, self.d
        self.bar.update(1)
        last = last or done == self.total
        log_now = done % r.log_every == 0 or last
        if log_now:
            self.log(done, win, lr, wall_s, shown, early=last and done < self.total)
        stopping = (log_now or done % r.stop_check_every == 0 or not d.enabled) and self.vote()
        if stopping or done % r.ckpt_every == 0 or last:
            self.save(done, final=stopping or last)
        if stopping:
            self.bar.close()
            dist.print0(
                f"\nstopped by {self.vote.stop.received or 'a signal on another rank'} at step {done}; checkpoint "
                f"saved. Run the same command to resume."
            )
        return stopping

    def log(self, done, win, lr, wall_s, shown, early=False):
        """One row of log.jsonl (means over every rank), the bar's numbers, the non-finite streak."""
        sums = dist.all_reduce_mean(torch.stack([win.loss, win.grad_norm, win.good, win.skipped])).tolist()
        good = max(sums[2], 1.0)
        rec = {
            "step": done,
            "loss": sums[0] / good,
            "lr": lr,
            "grad_norm": sums[1] / good,
            "skipped_nonfinite": int(round(sums[3])),
            "images_per_s": win.images / (time.perf_counter() - win.t0),
            "peak_mem_mb": peak_memory_mb(self.d.device),
            "wall_s": round(wall_s, 2),
        }
        if early:
            rec["stopped_at_target"] = True
        if self.d.is_main:
            append_jsonl(self.stage_dir / "log.jsonl", rec)
            self.board.scalars(done, rec)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}", **shown)
        streak = int(win.streak.item())
        win.reset()
        if streak >= self.r.max_nonfinite:
            self.save(done, final=True)
            self.bar.close()
            raise Halt(
                f"{streak} steps in a row had a non-finite loss or gradient (each was skipped); stopped at "
                f"step {done} with the last good weights saved in {self.stage_dir}. Lower the learning rate or "
                f"use perf.precision = 'fp32', then rerun to resume."
            )


def guarded_save(write, step, final, stage_dir, r):
    """Write a checkpoint and keep the last run.keep_last; a failed write (full disk) warns and
    leaves the previous one intact, except the last one of a stage, which must succeed."""
    try:
        write()
        ckpt.prune_checkpoints(stage_dir, r.keep_last)
    except OSError as e:
        if final:
            raise Halt(f"cannot write the checkpoint of step {step} in {stage_dir}: {e.strerror or e}") from None
        print(
            f"warning: checkpoint of step {step} not written ({e.strerror or e}); the previous one is intact",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------------------------------------
# setup


def check_output_dir(out_dir):
    """Fail before any long work if the run directory cannot be written."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(out_dir) / f".write_test_{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run.out_dir: cannot write to {out_dir} ({e.strerror})") from None


def check_disk_space(stage_dir, checkpoint_bytes):
    """Fail early if a checkpoint cannot fit (twice: the new one is written before the old one goes)."""
    need, free = 2 * checkpoint_bytes, shutil.disk_usage(stage_dir).free
    if free < need:
        raise UserError(
            f"run.out_dir: {stage_dir} has {free / 2**20:.0f} MiB free; checkpoints need about {need / 2**20:.0f} MiB"
        )


def open_data(cfg, d, stop):
    """Open (generating the bundled set on first use) and load the dataset as a uint8 tensor."""
    if cfg.data.name == "synth3d":  # generated when missing; when there, its grid must be data.grid
        if d.local_rank == 0:  # once per node (the write is atomic, so a shared disk is fine too)
            if not Path(cfg.data.path).exists():  # a mistyped path must not pass unnoticed
                print(f"data.path {cfg.data.path} does not exist: generating the bundled synth3d there", flush=True)
            ensure_synth3d(cfg.data.path, cfg.data.grid, stop=stop.check)
        dist.barrier()
    ds = open_dataset(cfg.data.name, cfg.data.path)
    check_images(ds.images.shape, cfg.data.path)
    images = torch.from_numpy(load_all(ds, progress=d.is_main))  # (N, 64, 64, 3) uint8
    if d.device.type == "cuda" and cfg.data.on_device:
        images = images.to(d.device)  # resident: no data loader in the step
    return ds, images


def write_resolved_config(cfg, out_dir, stage_dir):
    """The config a stage trains with, beside its checkpoints and at the top of the run: written
    only once it really starts (after the data and the resume checks), so a rejected command
    leaves the run directory as it was, and a resumed run matches it in every key it fixes."""
    text = to_toml(cfg)
    (stage_dir / "config.toml").write_text(text)
    (out_dir / "config.toml").write_text(text)


class StageClock:
    """Wall seconds a stage has trained, over every invocation (the checkpoint carries the sum)."""

    def __init__(self, meta=None):
        self.offset = float((meta or {}).get("wall_s", 0.0))
        self.t0 = time.perf_counter()

    def __call__(self):
        return self.offset + time.perf_counter() - self.t0


def reseed(seed, rank, step):
    # the global RNG (dropout) is reseeded at each stage start so a resumed run is reproducible
    torch.manual_seed(seed * 1_000_003 + rank * 7919 + step)


if __name__ == "__main__":
    run()
