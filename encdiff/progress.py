"""How a run is doing while it trains: the quick metrics of the live encoder, time to disentanglement,
and progress.png.

    live = LiveMetrics(cfg, stage_dir, factor_sizes, images, device)
    live.maybe_start(step, encoder, images_seen, wall_s)   # at eval.every steps: encode, hand over
    for record in live.poll(): ...                         # finished scores, appended to metrics.jsonl
    live.close()                                           # at the end: wait, the summary line

The encoding runs on the training device in eval mode without gradients (a forward pass, no
BatchNorm update, no random draw), and the metrics in a separate process on the host's cores, so
training goes on meanwhile and trains exactly as with eval.every = 0. evaluate.py --every-checkpoint
writes the same records from a run's checkpoints.
"""

import json
import multiprocessing
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import torch

from encdiff import runtime
from encdiff.images import uint8_to_model

HEADLINE = {
    "factor_vae": "eval_accuracy",
    "dci": "disentanglement",
    "mig": "discrete_mig",
    "sap": "sap_score",
    "beta_vae": "eval_accuracy",
    "modularity_explicitness": "modularity",
}
ENCODE_BATCH = 1024


@torch.no_grad()
def encode_codes(encoder, images, device, amp, channels_last=False, batch=ENCODE_BATCH):
    """The representation (N, num_tokens) float32 numpy of every image of a (N, 64, 64, 3) uint8
    tensor, with the encoder in eval mode; its training mode is put back after."""
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = []
        for s in range(0, len(images), batch):
            x = uint8_to_model(images[s : s + batch].to(device, non_blocking=True), channels_last)  # (b, 3, 64, 64)
            with amp:
                chunks.append(encoder.encode(x).float())
        return torch.cat(chunks).cpu().numpy()
    finally:
        encoder.train(was_training)


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


def score(codes, factor_sizes, metrics, seed):
    """The quick metrics of codes (what the background process runs)."""
    from encdiff.metrics import compute_all  # here: scikit-learn is a second of the trainer's start-up

    return compute_all(codes, factor_sizes, metrics, seed=seed, quick=True, n_jobs=1)


def reached(record, target_factor_vae, target_dci):
    fv = record.get("factor_vae", {}).get("eval_accuracy")
    dci = record.get("dci", {}).get("disentanglement")
    return fv is not None and dci is not None and fv >= target_factor_vae and dci >= target_dci


def read_jsonl(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_reached(records, target_factor_vae, target_dci):
    return next((r for r in records if reached(r, target_factor_vae, target_dci)), None)


def describe_target(records, cfg_eval, steps_total=None):
    """One line: when the quick FactorVAE and DCI (eval.every's small sample counts, not evaluate.py's
    full ones) first reached their targets, or the best so far."""
    ev = cfg_eval
    goal = f"quick FactorVAE >= {ev.target_factor_vae:g} and DCI >= {ev.target_dci:g}"
    hit = first_reached(records, ev.target_factor_vae, ev.target_dci)
    if hit is not None:
        return (
            f"time to disentanglement ({goal}): step {hit['step']:,}, {hit['wall_s'] / 60:.1f} min, "
            f"{hit['images_seen']:,} images (FactorVAE {hit['factor_vae']['eval_accuracy']:.3f}, "
            f"DCI {hit['dci']['disentanglement']:.3f})"
        )
    scored = [r for r in records if "factor_vae" in r and "dci" in r]
    if not scored:
        return f"time to disentanglement ({goal}): no scores yet"
    best = max(scored, key=lambda r: r["factor_vae"]["eval_accuracy"] + r["dci"]["disentanglement"])
    until = f" in {steps_total:,} steps" if steps_total else ""
    return (
        f"time to disentanglement ({goal}): not reached{until}; best at step {best['step']:,}: FactorVAE "
        f"{best['factor_vae']['eval_accuracy']:.3f}, DCI {best['dci']['disentanglement']:.3f}"
    )


def plot_progress(path, log, records, title="", targets=None):
    """progress.png: the loss (log.jsonl records) and each metric's headline value against step and
    against wall time, with the targets (FactorVAE, DCI) dashed. Without matplotlib (an optional
    extra) nothing is drawn and False returned."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    for col, (x_key, x_label, scale) in enumerate((("step", "step", 1), ("wall_s", "wall time (min)", 1 / 60))):
        ax = axes[0][col]
        points = [(r[x_key] * scale, r["loss"]) for r in log if x_key in r and r.get("loss") is not None]
        if points:
            ax.plot(*zip(*points), color="black", lw=1)
            ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("training loss")
        ax = axes[1][col]
        for name, key in HEADLINE.items():
            points = [(r[x_key] * scale, r[name][key]) for r in records if name in r and x_key in r]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=f"{name}.{key}")
        for value in (targets or {}).values():
            ax.axhline(value, color="grey", ls="--", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(x_label)
        ax.set_ylabel("score (quick)")
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return True


class LiveMetrics:
    """The quick metrics of the live encoder every eval.every steps (rank 0 only), scored in a
    background process; records in stage_dir/metrics.jsonl, the figure in the run's progress.png."""

    def __init__(self, cfg, stage_dir, factor_sizes, images, device):
        ev = cfg.eval
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
        codes = encode_codes(
            encoder, self.images, self.device, self.amp, self.cfg.perf.channels_last and self.device.type == "cuda"
        )
        job = (score, codes, self.factor_sizes, self.cfg.eval.every_metrics, self.cfg.eval.seed)
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
        self.pending.append((future, {"step": done, "images_seen": images_seen, "wall_s": round(wall_s, 2)}))

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
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.latest = {k[:4]: f"{record[k][v]:.2f}" for k, v in HEADLINE.items() if k in record}
            arrived.append(record)
        if arrived:
            self.redraw()
        return arrived

    def redraw(self):
        log = read_jsonl(self.stage_dir / "log.jsonl")
        out = self.stage_dir.parent / "progress.png"
        ev = self.cfg.eval
        targets = {"factor_vae": ev.target_factor_vae, "dci": ev.target_dci}
        drawn = plot_progress(out, log, self.records, f"{self.stage_dir.parent}: stage 2", targets)
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
