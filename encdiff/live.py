"""The quick metrics of the live encoder while stage 2 trains (eval.every), time to disentanglement
on the progress bar, and progress.png.

    live = LiveMetrics(cfg, stage_dir, factor_sizes, images, device)
    live.maybe_start(step, encoder, images_seen, wall_s)   # at eval.every steps: encode, hand over
    for record in live.poll(): ...                         # finished scores, appended to metrics.jsonl
    live.close()                                           # at the end: wait, the summary line

The encoding runs on the training device in eval mode without gradients (a forward pass, no
BatchNorm update, no random draw), and the metrics in a separate process on the host's cores, so
training goes on meanwhile and trains exactly as with eval.every = 0. The records, the curve and the
target line are encdiff/evaluation.py's, which evaluate.py --every-checkpoint uses too.
"""

import multiprocessing
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

from encdiff import runtime
from encdiff.runlog import append_jsonl
from encdiff.evaluation import (
    ENCODE_BATCH,
    HEADLINE,
    curve_point,
    encode_dataset,
    first_reached,
    plot_progress,
    quick_scores,
    reached,
    read_jsonl,
)


def ignore_signals(names):
    """The scoring process's start: the trainer owns stopping. A terminal's Ctrl-C reaches the whole
    process group; the worker ignores it (and the other stop signals) and never dies of one."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


@contextmanager
def signals_ignored(names):
    """The stop signals ignored here while a worker process starts: it inherits the dispositions, so
    a Ctrl-C during its imports (before ignore_signals runs there) cannot kill it. One reaching this
    process in those few milliseconds is lost: press it again."""
    handlers = {name: signal.signal(getattr(signal, name), signal.SIG_IGN) for name in names}
    try:
        yield
    finally:
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)


class LiveMetrics:
    """The quick metrics of the live encoder every eval.every steps (rank 0 only), scored in a
    background process; records in stage_dir/metrics.jsonl, the figure in the run's progress.png."""

    def __init__(self, cfg, stage_dir, factor_sizes, images, device, board=None):
        ev = cfg.eval
        self.board = board  # encdiff.runlog.Board (run.tensorboard) or None
        self.cfg, self.stage_dir, self.factor_sizes = cfg, Path(stage_dir), factor_sizes
        self.images, self.device = images, device
        self.every = ev.every if factor_sizes else 0
        self.path = self.stage_dir / "metrics.jsonl"
        self.records = read_jsonl(self.path)
        self.pending = []  # (future, record without scores)
        self.pool = None
        self.amp = runtime.scoring_autocast(cfg, device)
        self.announced_plot = False
        self.latest = {}  # for the progress bar

    def due(self, done):
        return self.every > 0 and done % self.every == 0 and not any(r["step"] == done for r in self.records)

    def maybe_start(self, done, encoder, images_seen, wall_s, stopping=False):
        """At eval.every steps, unless a stop is pending: encode and hand the codes to the worker."""
        if stopping or not self.due(done):
            return
        cl = self.cfg.perf.channels_last and self.device.type == "cuda"
        codes, _ = encode_dataset(encoder, self.images, ENCODE_BATCH, self.device, self.amp, cl, progress=False)
        job = (quick_scores, codes, self.factor_sizes, self.cfg.eval.every_metrics, self.cfg.eval.seed)
        names = self.cfg.run.stop_signals
        try:
            if self.pool is None:  # the worker starts at the first submit
                self.pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=ignore_signals,
                    initargs=(tuple(names),),
                )
                with signals_ignored(names):
                    future = self.pool.submit(*job)
            else:
                future = self.pool.submit(*job)
        except Exception as e:  # the worker is gone (BrokenProcessPool): training goes on without it
            self.give_up(e)
            return
        self.pending.append((future, curve_point(done, images_seen, wall_s)))

    def give_up(self, error):
        """One line, then no live metrics: a dead scoring process must never stop the training."""
        print(
            f"live metrics stopped ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            f"training goes on without them, and evaluate.py RUN --every-checkpoint scores the checkpoints later",
            flush=True,
        )
        self.every = 0
        self.pending = []
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def poll(self, wait=False):
        """Records whose scores have arrived (all of them with wait), appended to metrics.jsonl."""
        arrived = []
        for future, record in list(self.pending):
            if not (wait or future.done()):
                continue
            self.pending.remove((future, record))
            try:
                record.update(future.result())
            except BrokenProcessPool as e:
                self.give_up(e)
                break
            except Exception as e:  # a metric that cannot score these codes: say so, keep training
                record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            ev = self.cfg.eval
            if first_reached(self.records, ev.target_factor_vae, ev.target_dci) is None and reached(
                record, ev.target_factor_vae, ev.target_dci
            ):
                record["target_reached"] = True
            self.records.append(record)
            append_jsonl(self.path, record)
            if self.board is not None:
                self.board.scalars(record["step"], record, "metrics/")
            self.latest = {k[:4]: f"{record[k][v]:.2f}" for k, v in HEADLINE.items() if k in record}
            arrived.append(record)
        if arrived:
            self.redraw()
        return arrived

    def redraw(self):
        log = read_jsonl(self.stage_dir / "log.jsonl")
        out = self.stage_dir.parent / "progress.png"
        drawn = plot_progress(out, log, self.records, f"{self.stage_dir.parent}: stage 2", self.cfg.eval)
        if not drawn and not self.announced_plot:
            warnings.warn(
                "progress.png skipped: matplotlib is not installed (pip install -e '.[plot]'); "
                "the numbers are in metrics.jsonl",
                stacklevel=2,
            )
        self.announced_plot = True

    def close(self, wait=True):
        """Wait for the scores still being computed (unless not wait), stop the background process."""
        if self.pending and wait:
            steps = ", ".join(f"{record['step']:,}" for _, record in self.pending)
            print(f"waiting for the live metrics of step {steps} (still being scored)", flush=True)
            try:
                self.poll(wait=True)
            except KeyboardInterrupt:  # a second stop signal (train.py's handler raises it): give them up
                print("gave up the live metrics still being scored", flush=True)
                wait = False
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=not wait)
            self.pool = None
