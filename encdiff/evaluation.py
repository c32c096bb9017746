"""Scoring a trained EncDiff: encode a dataset with its concept encoder, compute the metrics, tabulate.

    trained = load_trained("runs/synth3d", overrides=[("data.path", "/fast/synth3d.h5")])  # encdiff.ckpt_contents
    ds = open_eval_dataset(trained)
    codes, kept = encode_dataset(trained.encoder, ds.images, 1024, trained.device, trained.amp, keep=[0, 5])
    scores = score_codes(codes, ds, None, seed=0, quick=True)   # factor metrics, or TAD for CelebA
    print(format_table(scores, None, ds.name))
    fid = fid_of_samples(trained, ds, load_inception("pt_inception.pth"), 1000, steps=50, seed=0, batch_size=250)

evaluate.py is the command line around these (and encdiff/pictures.py's); they are here so tests and
notebooks can reuse them.
"""

import json
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from encdiff.data import open_dataset
from encdiff.data.formats import FACTORS
from encdiff.data.synth import GRIDS as SYNTH3D_GRIDS
from encdiff.errors import UserError
from encdiff.images import IMAGE_SHAPE, check_images, uint8_to_model
from encdiff.models.encdiff import build_encoder
from encdiff.pictures import decode_tokens

# Paper Table 1, EncDiff row: the FactorVAE score is disentanglement_lib's eval_accuracy, "DCI" its
# disentanglement.
PAPER_ENCDIFF = {
    "shapes3d": ("Shapes3D", {("factor_vae", "eval_accuracy"): 0.999, ("dci", "disentanglement"): 0.969}),
    "mpi3d": ("MPI3D", {("factor_vae", "eval_accuracy"): 0.872, ("dci", "disentanglement"): 0.685}),
    "cars3d": ("Cars3D", {("factor_vae", "eval_accuracy"): 0.773, ("dci", "disentanglement"): 0.279}),
    "celeba": ("CelebA", {("tad", "tad"): 0.638}),  # the paper's TAD table (NashAE's metric)
}
TAD_QUICK_SAMPLES = 5000  # --quick scores TAD on this many random rows


# ---------------------------------------------------------------------------------------------
# the floor: an untrained encoder


def random_encoder(trained, seed, ds=None, calibration_images=1024):
    """A freshly initialised (untrained) concept encoder, seeded, in eval mode: the metrics' floor.

    Its BatchNorm statistics are first measured on `calibration_images` random images of ds (a
    train-mode pass without gradients). Without that, fresh running statistics (mean 0, var 1)
    squash every code below FactorVAE's 0.05 std threshold and the floor reads 0 by construction."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(trained.cfg.encdiff)
    encoder = encoder.to(trained.device).requires_grad_(False)
    if trained.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    if ds is not None:
        for m in encoder.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batches
        idx = np.sort(np.random.RandomState(seed).choice(len(ds), min(calibration_images, len(ds)), replace=False))
        encoder.train()
        with torch.no_grad():
            for chunk in np.array_split(idx, max(1, len(idx) // 256)):
                x = uint8_to_model(
                    torch.from_numpy(np.asarray(ds.images[chunk])).to(trained.device), trained.channels_last
                )
                encoder(x)
    return encoder.eval()


# ---------------------------------------------------------------------------------------------
# data and codes


def trained_factor_sizes(stored, meta):
    """Factor sizes of the data the checkpoint was trained on, where they are known."""
    if "factor_sizes" in meta:  # recorded by the trainer, when it does
        return tuple(int(s) for s in json.loads(meta["factor_sizes"]))
    name = stored.data.name
    if name == "synth3d":
        return tuple(len(v) for v in SYNTH3D_GRIDS[stored.data.grid])
    if name in FACTORS and name != "cars3d":  # cars3d's object count is the number of files
        return tuple(size for _, size in FACTORS[name])
    return None


def same_data_kind(cfg, stored):
    """True when the config still names the data the model was trained on (only the path may differ)."""
    return cfg.data.name == stored.data.name and (cfg.data.name != "synth3d" or cfg.data.grid == stored.data.grid)


def open_eval_dataset(trained):
    """Open the dataset of the (layered) config and check that it can be evaluated.

    The path may point at another copy of the training data; its factor grid must then be the one
    the model was trained on. Naming another dataset (--data.name) is allowed: the metrics only
    need a complete factor grid in row-major order. Photo datasets (celeba, imagefolder) have no
    grid: see score_codes."""
    cfg, stored = trained.cfg, trained.stored
    if cfg.data.name == "synth3d" and not Path(cfg.data.path).exists():
        raise UserError(
            f"{cfg.data.path}: no such file; recreate the data this run trained on: python -m "
            f"encdiff.data.synth --out {cfg.data.path} --grid {cfg.data.grid}"
        )
    ds = open_dataset(cfg.data.name, cfg.data.path)
    check_images(ds.images.shape, cfg.data.path)
    sizes = ds.factor_sizes
    if sizes is None:
        return ds
    if len(ds) != math.prod(sizes):  # GroundTruthDataset checks this too; the metrics depend on it
        raise UserError(f"{cfg.data.path}: {len(ds)} images for a factor grid of {math.prod(sizes)}")
    if len(sizes) < 2 or min(sizes) < 2:  # checked before encoding: the metrics would refuse it after
        raise UserError(
            f"{cfg.data.path}: factor sizes {sizes}: the metrics need at least 2 factors of at least 2 values"
        )
    expected = trained_factor_sizes(stored, trained.meta)
    if same_data_kind(cfg, stored) and expected is not None and sizes != expected:
        hint = "--data.grid or --data.name" if cfg.data.name == "synth3d" else "--data.name"
        raise UserError(
            f"{cfg.data.path}: factor sizes {sizes} do not match the {stored.data.name} data the checkpoint "
            f"was trained on {expected}; point --data.path at that dataset, or name another with {hint}"
        )
    return ds


ENCODE_BATCH = 1024  # images per forward when the live metrics encode the dataset


@torch.no_grad()
def encode_dataset(encoder, images, batch_size, device, amp=nullcontext(), channels_last=False, keep=(), progress=True):
    """Every image's representation (the encoder's scalars), in index order, in one pass, with the
    encoder in eval mode (its mode put back after). `images`: a dataset's streamed Images (read
    chunk by chunk) or a (N, 64, 64, 3) uint8 tensor (the one in memory while training).

    -> (codes (N, num_tokens) float32 numpy, the images at the indices `keep` (K, 64, 64, 3) uint8),
    so that pictures never need a second (random-access) read of a streamed dataset."""
    n_images = len(images)
    if hasattr(images, "chunks"):
        batches = images.chunks(batch_size)
    else:
        batches = (images[s : s + batch_size] for s in range(0, n_images, batch_size))
    was_training = encoder.training
    encoder.eval()
    keep = np.asarray(keep, dtype=np.int64)
    kept = np.zeros((len(keep), *IMAGE_SHAPE), np.uint8)
    codes = torch.empty((n_images, encoder.num_tokens), dtype=torch.float32, device=device)
    start = 0
    try:
        with tqdm(
            total=n_images, desc="encoding", unit="img", unit_scale=True, disable=not progress, dynamic_ncols=True
        ) as bar:
            for chunk in batches:
                chunk = torch.as_tensor(chunk)  # (n, 64, 64, 3) uint8
                n = len(chunk)
                here = (keep >= start) & (keep < start + n)
                kept[here] = chunk[torch.from_numpy(keep[here] - start)].cpu().numpy()
                # uint8 travels to the device (4x fewer bytes than float); conversion happens there
                x = uint8_to_model(chunk.to(device, non_blocking=True), channels_last)  # (n, 3, 64, 64)
                with amp:
                    codes[start : start + n] = encoder.encode(x).float()
                start += n
                bar.update(n)
    finally:
        encoder.train(was_training)
    if start != n_images:
        raise UserError(f"read {start} images, expected {n_images}")
    return codes.cpu().numpy(), kept


def describe_data(ds):
    """One line: name, path, size, and the factor grid or the attributes."""
    if ds.factor_sizes is not None:
        labels = "factors " + ", ".join(f"{n} {s}" for n, s in zip(ds.factor_names, ds.factor_sizes))
    elif getattr(ds, "attributes", None) is not None:
        labels = f"no factor grid, {len(ds.attribute_names)} attributes"
    else:
        labels = "no factor grid, no attributes"
    return f"data: {ds.name} {ds.path}, {len(ds):,} images, {labels}"


def score_codes(codes, ds, metrics=None, seed=0, quick=False, report=None):
    """The scores a dataset supports: the factor metrics (encdiff.metrics.compute_all, which calls
    report(name, seconds) as each finishes) on a factor grid; TAD on attribute labels (CelebA);
    nothing otherwise (imagefolder)."""
    from encdiff.metrics import compute_all, tad  # scikit-learn: only where something is scored

    if ds.factor_sizes is not None:
        return compute_all(codes, ds.factor_sizes, metrics, seed=seed, quick=quick, report=report)
    if getattr(ds, "attributes", None) is not None:
        return {"tad": tad(codes, ds.attributes, num_samples=TAD_QUICK_SAMPLES if quick else None, seed=seed)}
    return {}


def quick_scores(codes, factor_sizes, metrics, seed):
    """The quick metrics of codes: what the live metrics (in their worker) and evaluate.py
    --every-checkpoint score at each point of the curve."""
    from encdiff.metrics import compute_all

    return compute_all(codes, factor_sizes, metrics, seed=seed, quick=True, n_jobs=1)


@torch.no_grad()
def fid_of_samples(trained, ds, inception, num_samples, steps, seed, batch_size, progress=True):
    """FID between num_samples dataset images (a seeded random choice) and their DDIM
    reconstructions: each image's tokens condition a DDIM sample (eta 1) from fresh noise, which
    the stage-1 decoder turns into an image. -> {"fid", "num_samples", "ddim_steps"}."""
    from encdiff.fid import fid_from_features, inception_features  # scipy: only when FID is asked for

    rows = np.sort(np.random.RandomState(seed).choice(len(ds), min(num_samples, len(ds)), replace=False))
    g = torch.Generator(device=trained.device).manual_seed(seed)
    real, fake = [], []
    for start in tqdm(
        range(0, len(rows), batch_size), desc="FID", unit="batch", disable=not progress, dynamic_ncols=True
    ):
        batch = torch.from_numpy(ds.images[rows[start : start + batch_size]])  # (b, 64, 64, 3) uint8
        x = uint8_to_model(batch.to(trained.device))  # (b, 3, 64, 64)
        with trained.amp:
            _, tokens = trained.encoder(x)
        sample = decode_tokens(trained, tokens, steps, eta=1.0, generator=g)
        real.append(inception_features(inception, x))
        fake.append(inception_features(inception, sample))
    return {
        "fid": fid_from_features(torch.cat(real).numpy(), torch.cat(fake).numpy()),
        "num_samples": len(rows),
        "ddim_steps": steps,
    }


# ---------------------------------------------------------------------------------------------
# table


def _fmt(v):
    if v is None:
        return ""
    return str(v) if isinstance(v, int) else f"{v:.3f}"


ACTIVE_STD = 0.05  # FactorVAE's threshold: a code varying less than this over the data counts as unused


def degenerate_scores(results, codes):
    """{metric: why its numbers say nothing about disentanglement} for scores that are degenerate by
    construction (a collapsed or untrained encoder): shown beside them in the table."""
    notes = {}
    if codes is not None and len(codes) and float(np.max(np.std(codes, axis=0))) < ACTIVE_STD:
        why = f"no code varies (every std < {ACTIVE_STD}): a collapsed or barely trained encoder"
        return {name: why for name in results if name not in ("fid",)}
    if results.get("factor_vae", {}).get("num_active_dims") == 0:
        notes["factor_vae"] = f"0 active codes (std >= {ACTIVE_STD}): the score is 0 by definition"
    return notes


def format_table(results, baseline, dataset_name, notes=None):
    """One row per score: ours, the random-encoder floor (when given) and the paper's EncDiff value
    (the paper's datasets; synth3d shows Shapes3D's, labelled as a reference only); a metric in
    `notes` (degenerate_scores) is marked, with the reason under the table."""
    notes = notes or {}
    paper_label, paper = paper_scores(dataset_name)
    header = ["metric", "ours"]
    if baseline is not None:
        header.append("random enc.")
    if paper:
        header.append(paper_label)
    rows = []
    for name, scores in results.items():
        for key, value in scores.items():
            row = [f"{name}.{key}" + (" (!)" if name in notes else ""), _fmt(value)]
            if baseline is not None:
                row.append(_fmt(baseline.get(name, {}).get(key)))
            if paper:
                row.append(_fmt(paper.get((name, key))))
            rows.append(row)
    return "\n".join([text_table(header, rows), *[f"(!) {name}: {why}" for name, why in notes.items()]])


def paper_scores(dataset_name):
    """(column label, {(metric, key): the paper's EncDiff value}) for a dataset: the paper's
    datasets, and synth3d labelled as Shapes3D's reference only; ("paper EncDiff", {}) for the others."""
    paper_key = "shapes3d" if dataset_name == "synth3d" else dataset_name
    paper_name, paper = PAPER_ENCDIFF.get(paper_key, (None, {}))
    if paper_name is None:
        return "paper EncDiff", {}
    if paper_key == dataset_name:
        return f"paper EncDiff ({paper_name})", paper
    return f"paper EncDiff on {paper_name} (reference only)", paper


def text_table(header, rows):
    """Columns padded to their widest cell: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


# ---------------------------------------------------------------------------------------------
# several runs (seeds): one row each, mean and sample std per score

NOT_SCORES = ("data", "baseline", "degenerate", "options")  # the other tables of a metrics.json


def scores_of(record):
    """{"metric.key": value} of an evaluation's metrics.json record: the numbers a summary averages."""
    return {
        f"{name}.{key}": value
        for name, table in record.items()
        if isinstance(table, dict) and name not in NOT_SCORES
        for key, value in table.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def mean_std(values):
    """-> (mean, sample standard deviation (n - 1; nan for one value), n), NaNs left out."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def summarize(scored):
    """scored: [(run name, {"metric.key": value})] -> {"metric.key": {"mean", "std", "n"}}, in the
    order the keys first appear."""
    keys = list(dict.fromkeys(k for _, scores in scored for k in scores))
    summary = {}
    for key in keys:
        mean, std, n = mean_std([scores[key] for _, scores in scored if key in scores])
        summary[key] = {"mean": mean, "std": std, "n": n}
    return summary


def paper_value(dataset_name, key):
    """The paper's EncDiff value of score "metric.key" on a dataset, or None."""
    return paper_scores(dataset_name)[1].get(tuple(key.split(".", 1)))


def format_summary(scored, summary, dataset_name):
    """A table: one column per run, then mean ± std (n), then the paper's EncDiff value."""
    header = ["metric", *[name for name, _ in scored], "mean ± std (n)", paper_scores(dataset_name)[0]]
    rows = []
    for key, m in summary.items():
        spread = f"{m['mean']:.3f} ± {m['std']:.3f} ({m['n']})" if m["n"] > 1 else f"{m['mean']:.3f} (1)"
        rows.append(
            [key, *[_fmt(scores.get(key)) for _, scores in scored], spread, _fmt(paper_value(dataset_name, key))]
        )
    return text_table(header, rows)


# ---------------------------------------------------------------------------------------------
# the curve: the quick metrics at points of a training run (metrics.jsonl, progress.png)

HEADLINE = {  # the number that stands for each metric on the curve
    "factor_vae": "eval_accuracy",
    "dci": "disentanglement",
    "mig": "discrete_mig",
    "sap": "sap_score",
    "beta_vae": "eval_accuracy",
    "modularity_explicitness": "modularity",
}


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


def target_met(records, cfg_eval):
    """eval.stop_at_target's rule: the record ending the first eval.patience points in a row at both
    targets, or None."""
    ev, run = cfg_eval, 0
    for record in records:
        run = run + 1 if reached(record, ev.target_factor_vae, ev.target_dci) else 0
        if run >= ev.patience:
            return record
    return None


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


def curve_point(step, images_seen, wall_s, scores=None):
    """One record of metrics.jsonl: where in training, then the quick scores."""
    return {"step": step, "images_seen": images_seen, "wall_s": round(wall_s, 2), **(scores or {})}


def pyplot():
    """matplotlib's pyplot for files (Agg), or None: it is an optional extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, plt, path):
    """Written under a temporary name, then renamed: a reader never sees half a PNG."""
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")  # "tight": a legend outside the axes is kept
    plt.close(fig)
    tmp.replace(path)


RUN_METRICS = ("factor_vae", "dci", "mig")  # the panels of a figure of several runs


LINE_STYLES = ("-", "--", ":", "-.")


def run_styles(groups):
    """A colour per group and a line style per run within it (groups: one key per run, equal keys
    for the seeds of one setting); all runs in one group: a colour per run, all drawn solid."""
    keys = list(dict.fromkeys(groups))  # first seen, first coloured
    if len(keys) == 1:
        return [{"color": f"C{i % 10}", "ls": "-"} for i in range(len(groups))]
    return [
        {"color": f"C{keys.index(g) % 10}", "ls": LINE_STYLES[groups[:i].count(g) % len(LINE_STYLES)]}
        for i, g in enumerate(groups)
    ]


def plot_runs(path, runs, title="", cfg_eval=None, groups=None):
    """Several runs' curves (seeds of a sweep, batch 32 against 256, ...) on one axis of images seen:
    one panel per headline metric, one line per run, eval's targets dashed. runs: [(label, records of
    metrics.jsonl)]; groups: a key per run, equal for runs of one setting (run_styles). -> False
    (nothing drawn) without matplotlib or without any scores."""
    plt = pyplot()
    names = [n for n in RUN_METRICS if any(n in r for _, records in runs for r in records)]
    if plt is None or not names:
        return False
    targets = {} if cfg_eval is None else {"factor_vae": cfg_eval.target_factor_vae, "dci": cfg_eval.target_dci}
    styles = run_styles(list(range(len(runs))) if groups is None else groups)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        key = HEADLINE[name]
        for (label, records), style in zip(runs, styles):
            points = [(r["images_seen"], r[name][key]) for r in records if name in r and "images_seen" in r]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=label, **style)
        if name in targets:
            ax.axhline(targets[name], color="grey", ls="--", lw=0.8, label="target")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("images seen")
        ax.set_title(f"{name}.{key} (quick)", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()  # one legend for all panels, off the curves
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    save_figure(fig, plt, path)
    return True


def plot_progress(path, log, records, title="", cfg_eval=None):
    """progress.png: the loss (log.jsonl records) and each metric's headline value against step and
    against wall time, with eval's targets (FactorVAE, DCI) dashed. Without matplotlib (an optional
    extra) nothing is drawn and False returned."""
    targets = {} if cfg_eval is None else {"factor_vae": cfg_eval.target_factor_vae, "dci": cfg_eval.target_dci}
    plt = pyplot()
    if plt is None:
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
        for value in targets.values():
            ax.axhline(value, color="grey", ls="--", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(x_label)
        ax.set_ylabel("score (quick)")
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    save_figure(fig, plt, path)
    return True
