"""Evaluate a trained EncDiff: disentanglement metrics of its concept scalars, and pictures.

    python evaluate.py runs/synth3d                                   # newest EncDiff checkpoint of a run
    python evaluate.py runs/synth3d/encdiff/ckpt_00100000.safetensors --metrics factor_vae,dci
    python evaluate.py runs/synth3d --data.path /fast/synth3d.h5 --quick --out /tmp/eval
    python evaluate.py runs/synth3d --baseline random                 # also score an untrained encoder
    python evaluate.py runs/seed_* --out runs/summary                 # several runs: mean ± std per score
    python evaluate.py runs/celeba --eval.inception_path=pt_inception-2015-12-05-6726825d.pth   # TAD and FID

The config is the checkpoint's own, then --config files, then --section.key=value overrides (so
--data.path points it at another copy of the data). The whole dataset is encoded once, in index
order; the metrics of encdiff.metrics are computed on the codes (the factor metrics on a factor grid,
TAD on CelebA's attributes, none on an imagefolder); with eval.inception_path, the FID of DDIM
reconstructions (encdiff/fid.py); a table is printed (with the paper's EncDiff numbers for its
datasets) and metrics.json is written to --out (default: a folder beside the checkpoint named by
step, dataset and quick/full; an earlier result is never replaced without --overwrite), with PNG
pictures when eval.pictures is on.
"""

import csv
import dataclasses
import glob
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from encdiff import ckpt_files as ckpt
from encdiff import runtime
from encdiff.ckpt_contents import load_trained
from encdiff.config import split_args
from encdiff.data import load_all
from encdiff.errors import ArgumentParser, UserError, exit_on_user_error
from encdiff.evaluation import (
    HEADLINE,
    curve_point,
    degenerate_scores,
    describe_target,
    describe_data,
    encode_dataset,
    fid_of_samples,
    format_summary,
    format_table,
    open_eval_dataset,
    plot_progress,
    plot_runs,
    quick_scores,
    random_encoder,
    read_jsonl,
    paper_value,
    score_codes,
    scores_of,
    summarize,
)
from encdiff.pictures import picture_indices, picture_settings, save_pictures
from encdiff.fid import HOW_TO_PROVIDE, load_inception
from encdiff.metrics import metric_names
from encdiff.runlog import append_jsonl

FID_SAMPLES, FID_SAMPLES_QUICK = 10000, 64


def parse_args(argv):
    """-> (args, config files, overrides)."""
    files, overrides, rest = split_args(argv)
    p = ArgumentParser(
        prog="evaluate.py",
        usage="evaluate.py [-h] PATH [PATH ...] [options] [--config FILE ...] [--section.key=value ...]",
        description="Disentanglement metrics and pictures of an EncDiff checkpoint.",
        epilog="Also: --config FILE (repeatable) and --section.key=value, layered on the checkpoint's own config "
        "(e.g. --data.path=/fast/copy.h5, --eval.ddim_steps=50); the keys are listed by train.py --help.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="an EncDiff checkpoint file, or a run directory (its newest EncDiff checkpoint); several (or a glob "
        "such as 'runs/seed_*'): each is evaluated, then mean ± std of each score over them",
    )
    p.add_argument("--metrics", help="comma-separated metric names (default: eval.metrics)")
    p.add_argument("--quick", action="store_true", help="small sample counts and cheap pictures (tests, smoke runs)")
    p.add_argument(
        "--out",
        help="output folder (default: eval_stepSTEP_DATASET_quick-counts|full-counts beside the checkpoint, one "
        "per kind of evaluation); with several PATHs: where summary.json and summary.csv go (each run's own "
        "results stay beside its checkpoint)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results an earlier evaluation left in --out")
    p.add_argument(
        "--every-checkpoint",
        action="store_true",
        help="score every kept checkpoint of a run directory with the quick eval.every_metrics: metrics.jsonl "
        "and progress.png in --out (default RUN/encdiff/eval_checkpoints), the curve eval.every draws while training",
    )
    p.add_argument("--baseline", choices=["random"], help="also score a freshly initialised (untrained) encoder")
    p.add_argument(
        "--fid-samples",
        type=int,
        help=f"images (and DDIM reconstructions) for FID (default {FID_SAMPLES}, "
        f"--quick {FID_SAMPLES_QUICK}); needs eval.inception_path",
    )
    return p.parse_args(rest), files, overrides


def default_out_dir(trained, ds, quick):
    """Each kind of evaluation its own folder beside the checkpoint, so none replaces another:
    quick-counts (--quick's small metric sample counts) or full-counts; the dataset is named."""
    return trained.path.parent / f"eval_step{trained.step:08d}_{ds.name}_{'quick' if quick else 'full'}-counts"


def stored_evaluation(path):
    """The metrics.json an earlier evaluation left in `path`, or None."""
    try:
        return json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def writable_dir(path, overwrite):
    for name in ("metrics.json", "metrics.jsonl"):
        if (path / name).exists() and not overwrite:
            raise UserError(
                f"{path} holds an earlier evaluation's {name} (another checkpoint or other options): "
                f"choose another --out, or --overwrite"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {path} ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--out: cannot write to {path}")
    return path


def every_checkpoint_of_runs(paths, args, files, overrides):
    """--every-checkpoint over several runs: each run's curve in its own folder, then all of them on one
    axis of images seen in --out/progress_runs.png."""
    if not args.out:
        raise UserError("--every-checkpoint over several runs needs --out DIR (where progress_runs.png goes)")
    out = writable_dir(Path(args.out), overwrite=True)
    names = [Path(p).name for p in paths]
    labels = names if len(set(names)) == len(names) else [str(p) for p in paths]  # short where they differ
    runs, settings, cfg = [], [], None
    for i, (path, label) in enumerate(zip(paths, labels)):
        print(f"\n[{i + 1}/{len(paths)}] {path}")
        records, cfg = every_checkpoint(path, args, files, overrides, None)
        runs.append((label, records))
        settings.append(setting_of(cfg))
    groups = [settings.index(s) for s in settings]  # the seeds of one setting: one colour
    if plot_runs(out / "progress_runs.png", runs, f"{len(runs)} runs: every checkpoint", cfg.eval, groups):
        print(f"wrote {out / 'progress_runs.png'}")
    else:
        print("progress_runs.png skipped: matplotlib is not installed (pip install -e '.[plot]')")
    return 0


def setting_of(cfg):
    """A run's config without what only names or seeds it: equal for the seeds of one setting."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=0, seeds=[], parallel="none", out_dir=""))


def every_checkpoint(path, args, files, overrides, out):
    """The quick metrics of each kept checkpoint of a run, oldest first, as the records of eval.every,
    in `out` (default RUN/encdiff/eval_checkpoints). -> (records, the run's config)."""
    run = Path(path)
    stage_dir = run / "encdiff" if (run / "encdiff").is_dir() else run
    paths = ckpt.list_checkpoints(stage_dir)
    if not run.is_dir() or not paths:
        raise UserError(f"{path}: --every-checkpoint needs a run directory holding encdiff checkpoints")
    first = load_trained(paths[0], files, overrides)
    ds = open_eval_dataset(first)
    if ds.factor_sizes is None:
        raise UserError(f"{ds.name}: no factor grid, so there is no disentanglement curve to draw")
    out_dir = writable_dir(Path(out) if out else stage_dir / "eval_checkpoints", args.overwrite)
    names = metric_names(args.metrics) if args.metrics is not None else first.cfg.eval.every_metrics
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)  # --overwrite (or a folder without one)
    images = torch.from_numpy(load_all(ds))  # (N, 64, 64, 3) uint8: read once for every checkpoint
    records = []
    for path in tqdm(paths, desc="checkpoints", unit="ckpt"):
        trained = load_trained(path, files, overrides)
        cfg = trained.cfg
        amp = runtime.scoring_autocast(cfg, trained.device)
        codes, _ = encode_dataset(
            trained.encoder, images, cfg.eval.batch_size, trained.device, amp, trained.channels_last, progress=False
        )
        scores = quick_scores(codes, ds.factor_sizes, names, cfg.eval.seed)
        wall_s = float(trained.meta.get("wall_s", "nan"))
        seen = trained.step * cfg.encdiff.batch_size
        record = {**curve_point(trained.step, seen, wall_s, scores), "checkpoint": str(path)}
        records.append(record)
        append_jsonl(out_dir / "metrics.jsonl", record)
        print(f"step {trained.step:,}: " + ", ".join(f"{n}.{HEADLINE[n]} {record[n][HEADLINE[n]]:.3f}" for n in names))
    ev = first.cfg.eval
    print(describe_target(records, ev))
    log = read_jsonl(stage_dir / "log.jsonl")
    if plot_progress(out_dir / "progress.png", log, records, f"{run}: every checkpoint", ev):
        print(f"wrote {out_dir / 'progress.png'}")
    else:
        print("progress.png skipped: matplotlib is not installed (pip install -e '.[plot]')")
    print(f"wrote {out_dir / 'metrics.jsonl'}")
    return records, first.cfg


def main(argv=None):
    args, files, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.fid_samples is not None and args.fid_samples < 2:
        raise UserError(f"--fid-samples must be at least 2, got {args.fid_samples}")
    paths = expand_paths(args.paths)
    if args.every_checkpoint:
        if len(paths) == 1:
            every_checkpoint(paths[0], args, files, overrides, args.out)
            return 0
        return every_checkpoint_of_runs(paths, args, files, overrides)
    requested = metric_names(args.metrics) if args.metrics is not None else None  # a typo fails before any loading
    if len(paths) > 1:
        return evaluate_runs(paths, args, files, overrides, requested)
    evaluate_one(paths[0], args, files, overrides, requested, Path(args.out) if args.out else None)
    return 0


def expand_paths(given):
    """PATH arguments -> paths; a pattern the shell left unexpanded ('runs/seed_*') is expanded here."""
    paths = []
    for p in given:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) and not Path(p).exists() else [p]
        if not matches:
            raise UserError(f"{p}: matches nothing")
        paths.extend(matches)
    return paths


def evaluate_runs(paths, args, files, overrides, requested):
    """Each run as alone (its results beside its checkpoint, an up-to-date one reused), then one row per
    run and mean ± sample std per score; a run that cannot be scored is named and left out."""
    out = Path(args.out) if args.out else None
    if out is not None:
        for name in ("summary.json", "summary.csv"):
            if (out / name).exists() and not args.overwrite:
                raise UserError(f"{out} holds an earlier {name}: choose another --out, or --overwrite")
        writable_dir(out, overwrite=True)
    scored, skipped = [], []
    for i, path in enumerate(paths):
        print(f"\n[{i + 1}/{len(paths)}] {path}")
        try:
            record = evaluate_one(path, args, files, overrides, requested, None)
        except UserError as e:
            print(f"left out {path}: {e}")
            skipped.append({"run": str(path), "reason": str(e)})
            continue
        scored.append((str(path), record))
    if not scored:
        raise UserError(f"none of the {len(paths)} runs could be scored (the first: {skipped[0]['reason']})")
    table_rows = [(name, scores_of(record)) for name, record in scored]
    summary = summarize(table_rows)
    dataset = scored[0][1]["data"]["name"]
    print(f"\n{len(scored)} runs (mean ± sample std, n):")
    print(format_summary(table_rows, summary, dataset))
    for s in skipped:
        print(f"left out {s['run']}: {s['reason']}")
    if out is None:
        print("(--out DIR writes summary.json and summary.csv)")
        return 0
    runs = [
        {"run": name, "checkpoint": r["checkpoint"], "step": r["step"], "scores": scores_of(r)} for name, r in scored
    ]
    paper = {key: paper_value(dataset, key) for key in summary if paper_value(dataset, key) is not None}
    document = {"dataset": dataset, "runs": runs, "summary": summary, "paper": paper, "left_out": skipped}
    (out / "summary.json").write_text(json.dumps(document, indent=2) + "\n")
    write_summary_csv(out / "summary.csv", runs, summary)
    print(f"wrote {out / 'summary.json'} and {out / 'summary.csv'}")
    return 0


def write_summary_csv(path, runs, summary):
    """One row per run, then the rows mean, std and n; one column per score."""
    keys = list(summary)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "checkpoint", "step", *keys])
        for r in runs:
            w.writerow([r["run"], r["checkpoint"], r["step"], *[r["scores"].get(k, "") for k in keys]])
        for stat in ("mean", "std", "n"):
            w.writerow([stat, "", "", *[summary[k][stat] for k in keys]])


def evaluate_one(path, args, files, overrides, requested, out_dir):
    """Evaluate one checkpoint or run (out_dir None: beside the checkpoint) -> its metrics.json record."""
    trained = load_trained(path, files, overrides)
    cfg = trained.cfg
    names = requested or metric_names(cfg.eval.metrics)
    quick, seed = args.quick, cfg.eval.seed
    runtime.set_cuda_flags(trained.device, cfg.perf.tf32)
    score_amp = runtime.scoring_autocast(cfg, trained.device)  # the codes in eval.precision
    # a bad weights file fails here, before any long work
    inception = load_inception(cfg.eval.inception_path, trained.device) if cfg.eval.inception_path else None
    ds = open_eval_dataset(trained)
    out_dir = out_dir or default_out_dir(trained, ds, quick)
    options = {
        "checkpoint": str(trained.path),
        "data": str(ds.path),
        "metrics": names,
        "quick": quick,
        "seed": seed,
        "baseline": args.baseline,
        "fid": None if inception is None else [cfg.eval.inception_path, args.fid_samples],
    }
    stored = stored_evaluation(out_dir)
    if not args.overwrite and stored is not None and stored.get("options") == options:
        print(f"{out_dir}: up to date (the same checkpoint, data and options); the stored results:")
        print(stored["table"])
        return stored
    out_dir = writable_dir(out_dir, args.overwrite)
    print(f"checkpoint: {trained.path} (step {trained.step}), device {trained.device}")
    if trained.step < trained.stored.encdiff.steps:
        print(
            f"note: the run has not finished: step {trained.step:,} of {trained.stored.encdiff.steps:,} "
            f"(still training, or stopped; rerun train.py to go on)"
        )
    print(describe_data(ds))
    if trained.ignored:
        print(f"note: kept the checkpoint's model config; ignored other values of {', '.join(trained.ignored)}")
    if ds.name != trained.stored.data.name:
        print(f"note: the model was trained on {trained.stored.data.name}, evaluated here on {ds.name}")

    n_images, _, _ = picture_settings(cfg.eval, quick)
    keep = picture_indices(n_images, len(ds), seed) if cfg.eval.pictures else ()
    t0 = time.perf_counter()
    codes, kept = encode_dataset(
        trained.encoder, ds.images, cfg.eval.batch_size, trained.device, score_amp, trained.channels_last, keep=keep
    )
    seconds = time.perf_counter() - t0
    print(f"encoded {len(ds):,} images in {seconds:.1f} s ({len(ds) / seconds:,.0f} images/s)")

    if ds.factor_sizes is None:
        scored = "TAD on its attributes" if getattr(ds, "attributes", None) is not None else "no disentanglement metric"
        ignored = f" (ignored --metrics {args.metrics})" if requested else ""
        print(f"note: {ds.name} has no factor grid: {scored}{ignored}")
    if ds.factor_sizes is not None:
        print(f"scoring {', '.join(names)} ({'quick' if quick else 'full'} sample counts; DCI in the background)")
    results = score_codes(codes, ds, names, seed=seed, quick=quick, report=said_done)
    baseline = None
    if args.baseline == "random":
        floor_codes, _ = encode_dataset(
            random_encoder(trained, seed, ds),
            ds.images,
            cfg.eval.batch_size,
            trained.device,
            score_amp,
            trained.channels_last,
        )
        print("scoring the untrained encoder's codes the same way")
        baseline = score_codes(floor_codes, ds, names, seed=seed, quick=quick, report=said_done)
    if inception is not None:
        n_fid = args.fid_samples or (FID_SAMPLES_QUICK if quick else FID_SAMPLES)
        steps = picture_settings(cfg.eval, quick)[2]
        print(f"FID: {min(n_fid, len(ds))} images against their DDIM reconstructions ({steps} steps)")
        results["fid"] = fid_of_samples(trained, ds, inception, n_fid, steps, seed, cfg.eval.batch_size)
    elif requested is None:  # only a full evaluation asks for everything the paper reports
        print(HOW_TO_PROVIDE)
    notes = degenerate_scores(results, codes)
    table = format_table(results, baseline, ds.name, notes)
    print(table)
    if quick:
        print("note: --quick uses small sample counts: the numbers are noisy")

    def listed(values):
        return None if values is None else list(values)

    record = {
        **results,
        "data": {
            "name": ds.name,
            "path": str(ds.path),
            "num_images": len(ds),
            "factor_sizes": listed(ds.factor_sizes),
            "factor_names": listed(ds.factor_names),
        },
        "step": trained.step,
        "seed": seed,
        "quick": quick,
        "checkpoint": str(trained.path),
        "baseline": None if baseline is None else {"encoder": "random", "seed": seed, **baseline},
        "degenerate": notes,
        "options": options,  # a rerun with these finds its results up to date
        "table": table,
    }
    metrics_path = out_dir / "metrics.json"
    try:  # whole or not at all: a full disk leaves no partial metrics.json that a rerun would trust
        ckpt.write_text_atomic(metrics_path, json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {metrics_path}: {e.strerror or e}") from None
    print(f"wrote {metrics_path}")

    n_images, n_values, steps = picture_settings(cfg.eval, quick)
    n, tokens = len(picture_indices(n_images, len(ds), seed)) // 2, trained.encoder.num_tokens
    samples = f"{3 * n + tokens * n_values + n * tokens} DDIM samples of {steps} steps"
    if not cfg.eval.pictures:
        print(f"pictures: off (eval.pictures = false in this run's config); --eval.pictures=true draws them: {samples}")
        return record
    print(f"pictures: {samples} (fewer: --quick, --eval.ddim_steps or --eval.pictures=false)")
    for picture in save_pictures(trained, kept, codes, out_dir, quick, seed, progress=True):
        print(f"wrote {picture}")
    return record


def said_done(name, seconds):
    print(f"  {name}: {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)
