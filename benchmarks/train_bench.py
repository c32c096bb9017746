"""Images/s of both training stages under every speed switch, measured against the released choices.

    python benchmarks/train_bench.py                                # default model, batch 128 (CUDA)
    python benchmarks/train_bench.py --quick --json out.json        # few steps; on the CPU the small model
    python benchmarks/train_bench.py --batch 512 --stages encdiff --configs baseline,bf16,all
    python benchmarks/train_bench.py --small --encdiff.model_channels=32     # config overrides, as train.py
    python benchmarks/train_bench.py --small --skip "compile default,compile blocks,compile max-autotune-no-cudagraphs"
    torchrun --nproc_per_node=8 benchmarks/train_bench.py --scaling          # images/s per rank, 1 vs 8 ranks

For stage 1 (VQ autoencoder) and stage 2 (concept encoder + latent U-Net) at one per-GPU batch:
the released choices as the baseline (fp32, eager, math attention, NCHW, gradient checkpointing on,
latents recomputed by the frozen VQ encoder every step, a DataLoader collating batches from host
memory), then each speed switch alone, then all of them together. Every configuration builds fresh
models (random weights and random images of the right shape: speed does not depend on them), runs
warm-up steps, the first timed alone (time to first step = compile time), then timed steps between
torch.cuda.synchronize calls (wall time on the CPU), and reads the peak memory (CUDA: allocated by
torch; CPU: the process's peak RSS during that configuration). A configuration that cannot run (a
backend missing, a compile failure, out of memory) is a `skipped` row with its reason. The table
goes to stdout; `--json PATH` gets every number, rewritten after each row so a killed run keeps
what it measured. `--budget S` skips the rows that would start after S seconds.

The step is train.py's step: both build it from encdiff/steps.py (models, optimiser, EMA, batch
order, latent cache, CUDA graph); only the release's DataLoader baseline feeds it other batches.
"""

import copy
import gc
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import step_profile  # noqa: E402
from encdiff import dist  # noqa: E402
from encdiff.config import ARCH_KEYS, build_config, split_args  # noqa: E402
from encdiff.errors import ArgumentParser, UserError, exit_on_user_error  # noqa: E402
from encdiff.images import uint8_to_model  # noqa: E402
from encdiff.models.encdiff import build_encoder, build_unet, build_vq, count_params  # noqa: E402
from encdiff.runtime import set_cuda_flags, versions  # noqa: E402
from encdiff.runlog import Window, peak_memory_mb  # noqa: E402
from encdiff.steps import build_step as build_stage_step  # noqa: E402

STAGES = ("vqvae", "encdiff")
STAGE_TITLES = {"vqvae": "stage 1: VQ autoencoder", "encdiff": "stage 2: concept encoder + latent U-Net"}

# The released choices. data.on_device = false means, here, the release's torch DataLoader; tf32 =
# false turns TF32 off for convolutions too (torch's own default leaves cuDNN's on), so fp32 is fp32.
BASELINE = {
    "perf.precision": "fp32",
    "perf.compile": "off",
    "perf.attention": "math",
    "perf.channels_last": False,
    "encdiff.grad_checkpoint": True,
    "perf.cache_latents": False,
    "data.on_device": False,
    "perf.fused_adam": False,
    "perf.tf32": False,
    "perf.cuda_graph": False,
}
SWITCHES = {  # row name -> what it changes from the baseline
    "bf16": {"perf.precision": "bf16"},
    "channels_last": {"perf.channels_last": True},
    "compile default": {"perf.compile": "default", "perf.compile_scope": "model"},
    "compile blocks": {"perf.compile": "default", "perf.compile_scope": "blocks"},
    "compile max-autotune-no-cudagraphs": {"perf.compile": "max-autotune-no-cudagraphs", "perf.compile_scope": "model"},
    "attention auto": {"perf.attention": "auto"},
    "attention triton": {"perf.attention": "triton"},
    "attention sdpa": {"perf.attention": "sdpa"},
    "attention xformers": {"perf.attention": "xformers"},
    "fused AdamW": {"perf.fused_adam": True},
    "TF32": {"perf.tf32": True},
    "cached latents": {"perf.cache_latents": True},
    "dataset on device": {"data.on_device": True},
    "grad checkpointing off": {"encdiff.grad_checkpoint": False},
    "CUDA graph": {"perf.cuda_graph": True, "perf.fused_adam": True, "data.on_device": True},
}
# "all": these switches together, less those that cannot run here; the trainer's defaults on CUDA.
# Not channels-last: CUDA's group_norm copies a channels-last input to NCHW and back (RESULTS.md,
# "The step's budget"); "all + channels_last" measures it on top.
ALL_ON = (
    "bf16",
    "compile default",
    "attention auto",
    "fused AdamW",
    "TF32",
    "cached latents",
    "dataset on device",
    "grad checkpointing off",
    "CUDA graph",
)
ROWS = ("baseline", *SWITCHES, "all", "all + channels_last")
# The headline pair first, then the cheap eager rows, so a --budget cuts the compiles.
RUN_ORDER = (
    "baseline",
    "all",
    "all + channels_last",
    *[n for n in SWITCHES if not n.startswith("compile")],
    "compile default",
    "compile blocks",
    "compile max-autotune-no-cudagraphs",
)
STAGE2_ONLY = {
    "attention auto": "the VQ autoencoder's one attention block always runs torch SDPA",
    "attention triton": "the VQ autoencoder's one attention block always runs torch SDPA",
    "attention sdpa": "the VQ autoencoder's one attention block always runs torch SDPA",
    "attention xformers": "the VQ autoencoder's one attention block always runs torch SDPA",
    "cached latents": "stage 2 only",
    "grad checkpointing off": "stage 2 only (the U-Net's transformer blocks)",
}
# The targets: stage 2 with every switch at least 10x the baseline of the same run at per-GPU batch
# 128 and at least 20,000 img/s at 1024; stage 1 at least 10,000 img/s at batch 256
TARGETS = (
    ("encdiff", 128, "speedup", 10.0, "{:.2f}x the baseline", ">= 10x"),
    ("encdiff", 1024, "img_s", 20_000, "{:.0f} img/s", ">= 20,000"),
    ("vqvae", 256, "img_s", 10_000, "{:.0f} img/s", ">= 10,000"),
)


def parse_args(argv):
    """-> (args, config files, config overrides); `--config FILE` and `--section.key=value` shape the model."""
    files, overrides, rest = split_args(argv)
    p = ArgumentParser(prog="train_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, help="per-GPU batch of both stages (default: 128 on CUDA, 8 on the CPU)")
    p.add_argument(
        "--quick", action="store_true", help="few steps; no max-autotune; on the CPU the small model and no compile"
    )
    p.add_argument("--small", action="store_true", help="the small model of configs/smoke.toml")
    p.add_argument(
        "--warmup", type=int, help="warm-up steps, the first timed alone (default 5; --quick 3 on CUDA, 2 on the CPU)"
    )
    p.add_argument("--steps", type=int, help="timed steps (default 20; --quick 10 on CUDA, 3 on the CPU)")
    p.add_argument("--stages", default="vqvae,encdiff", help="comma-separated: vqvae, encdiff")
    p.add_argument("--configs", help=f"comma-separated rows to run (default all): {', '.join(ROWS)}")
    p.add_argument("--skip", default="", help='comma-separated switches not to run, and to leave out of "all"')
    p.add_argument("--workers", type=int, help="DataLoader workers of the baseline (default: 4 on CUDA, 0 on the CPU)")
    p.add_argument("--budget", type=float, help="seconds: rows that would start later are skipped")
    p.add_argument(
        "--scaling",
        action="store_true",
        help="under torchrun: images/s per rank at 1 and N ranks, with the trainer's [perf] settings",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="profile the trainer's step (the config's [perf] settings) "
        "instead of the table: a torch.profiler trace per stage in DIR, and per step wall ms, kernels, "
        "busy ms, host syncs and the ten most expensive kernels",
    )
    p.add_argument("--json", metavar="PATH", help="write every number to this file")
    args = p.parse_args(rest)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in STAGES]
    if bad or not args.stages:
        raise UserError(f"--stages: unknown stage {bad[0] if bad else '(none)'!r}; choose from {', '.join(STAGES)}")
    if args.configs is not None:
        args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in args.configs if c not in ROWS]
        if bad or not args.configs:
            raise UserError(f"--configs: unknown row {bad[0] if bad else '(none)'!r}; choose from {', '.join(ROWS)}")
    args.skip = [c.strip() for c in args.skip.split(",") if c.strip()]
    bad = [c for c in args.skip if c not in SWITCHES]
    if bad:
        raise UserError(f"--skip: {bad[0]!r} is not a switch; choose from {', '.join(SWITCHES)}")
    for name in ("batch", "warmup", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    return args, files, overrides


# ---------------------------------------------------------------------------------------------
# configuration


def as_cli(value):
    """A value as build_config reads it from the command line."""
    return value if isinstance(value, str) else json.dumps(value)


def small_model_overrides():
    """The model shape of configs/smoke.toml (its shape keys, and the sampler's steps that its
    shorter schedule needs): the small model of the CPU tests."""
    smoke = build_config([ROOT / "configs" / "smoke.toml"])
    keys = [(stage, key) for stage, names in ARCH_KEYS.items() for key in names] + [("eval", "ddim_steps")]
    return [(f"{table}.{key}", as_cli(getattr(getattr(smoke, table), key))) for table, key in keys]


def make_config(files, overrides, settings=None):
    """Defaults < files < overrides < this row's settings, validated like train.py's."""
    rows = [(key, as_cli(value)) for key, value in (settings or {}).items()]
    return build_config(files, [*overrides, *rows])


def row_settings(name, without=()):
    """The settings of row `name`; "all" is every ALL_ON switch but those in `without`."""
    if name == "baseline":
        return dict(BASELINE)
    if name in ("all", "all + channels_last"):
        settings = {**BASELINE, **{k: v for s in ALL_ON if s not in without for k, v in SWITCHES[s].items()}}
        return {**settings, **(SWITCHES["channels_last"] if name != "all" else {})}
    return {**BASELINE, **SWITCHES[name]}


def known_skip(name, stage, device, args):
    """(status, reason) for a row that is not run, or None."""
    quick = args.quick
    if stage == "vqvae" and name in STAGE2_ONLY:
        return "n/a", STAGE2_ONLY[name]
    if name in args.skip:
        return "skipped", "--skip"
    on_cpu = device.type != "cuda"
    if on_cpu and name in ("fused AdamW", "TF32", "CUDA graph"):
        return "skipped", "CUDA only (the trainer ignores it on the CPU)"
    if on_cpu and name == "attention triton":
        return "skipped", "the Triton kernel runs on the CPU only through its interpreter (tests, not timing)"
    if quick and name == "compile max-autotune-no-cudagraphs":
        return "skipped", "--quick: autotuning takes minutes (run without --quick)"
    if quick and on_cpu and name in ("compile default", "compile blocks"):
        return "skipped", "--quick on the CPU: Inductor's C++ build takes minutes (run without --quick)"
    return None


# ---------------------------------------------------------------------------------------------
# data


class IndexedImages(torch.utils.data.Dataset):
    """(image (64, 64, 3) uint8, index) pairs from a host tensor, one item at a time, as the release reads."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


class LoaderFeed:
    """The released data path: a DataLoader collates each batch on the host, then it is copied over."""

    def __init__(self, images, batch, workers, device, channels_last, seed):
        self.device, self.channels_last = device, channels_last
        self.loader = torch.utils.data.DataLoader(
            IndexedImages(images),
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        self.batches = iter(self.loader)

    def __call__(self, step):
        try:
            x, idx = next(self.batches)
        except StopIteration:  # next epoch
            self.batches = iter(self.loader)
            x, idx = next(self.batches)
        x = x.to(self.device, non_blocking=True)  # (b, 64, 64, 3) uint8
        return idx, uint8_to_model(x, self.channels_last)

    def close(self):
        self.loader = self.batches = None  # the workers shut down with them


def make_feed(cfg, d, images, batch, workers):
    """None: the step's own data path (train.py's); else the release's DataLoader."""
    if cfg.data.on_device:
        return None
    return LoaderFeed(images, batch, workers, d.device, cfg.perf.channels_last, cfg.run.seed + d.rank)


def random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=g)  # (N, 64, 64, 3)


# ---------------------------------------------------------------------------------------------
# one training step of each stage: train.py's, from encdiff/steps.py


def step_config(cfg, batch, d):
    """cfg with the benchmark's per-GPU batch as each stage's global batch."""
    cfg = copy.deepcopy(cfg)
    cfg.vqvae.batch_size = cfg.encdiff.batch_size = batch * d.world_size
    return cfg


def build_step(stage, cfg, d, images, vq=None):
    """train.py's step of `stage` (encdiff/steps.py), prepared from step 0."""
    st = build_stage_step(stage, cfg, d, images, vq)
    st.prepare(0)
    return st


def stepper(stage, cfg, d, images, feed):
    """-> step(i) of `stage` under cfg, fed by `feed` (None: the step's own data path), and the
    on-device log window train.py keeps beside it."""
    st, win = build_step(stage, cfg, d, images), Window(d.device)

    def step(i):
        out = st(i) if feed is None else st(i, feed(i))
        win.add(out[0], out[1], len(out[2]))
        return out[0]

    return step


# ---------------------------------------------------------------------------------------------
# measuring


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(cfg, stage, d, images, batch, warmup, steps, workers):
    """Fresh models for `stage` under cfg at per-GPU `batch`; -> {img_s, first_step_s, peak_mb, loss}
    of this rank. The first step includes the warm-up and capture of a CUDA graph."""
    if "torch._dynamo" in sys.modules:  # imported by the first compile: none before it to forget
        torch._dynamo.reset()  # no compiled code or recompile limits carried over from the previous row
    release_memory(d.device)
    reset_peak_memory(d.device)
    feed = make_feed(cfg, d, images, batch, workers)
    set_cuda_flags(d.device, cfg.perf.tf32)
    try:
        step = stepper(stage, step_config(cfg, batch, d), d, images, feed)
        t0 = clock(d.device)
        loss = step(0)
        first = clock(d.device) - t0
        for i in range(1, warmup):
            step(i)
        t0 = clock(d.device)
        for i in range(warmup, warmup + steps):
            loss = step(i)
        elapsed = clock(d.device) - t0
    finally:
        if feed is not None:
            feed.close()
    loss = loss.item()
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss is {loss}")
    return {"img_s": steps * batch / elapsed, "first_step_s": first, "peak_mb": peak_memory_mb(d.device), "loss": loss}


def first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# the table of switches


def plan_rows(selected):
    return [n for n in RUN_ORDER if selected is None or n in selected]


def run_table(args, files, overrides, d, settings, write):
    """Every selected row of every stage, both stages row by row (so a --budget cuts the same rows
    of each); `write(rows)` after each one."""
    rows, t_start = [], time.perf_counter()
    images = random_images(settings["num_images"], seed=0)
    done = {stage: {} for stage in args.stages}

    def run_row(stage, name):
        row = {
            "stage": stage,
            "config": name,
            "status": "ok",
            "reason": None,
            "error": False,
            "img_s": None,
            "speedup": None,
            "first_step_s": None,
            "peak_mb": None,
            "loss": None,
        }
        if name.startswith("all"):
            row["without"] = all_without(stage, d.device, args, done[stage])
        row["settings"] = row_settings(name, row.get("without", ()))
        skip = known_skip(name, stage, d.device, args)
        if skip is None and args.budget is not None and time.perf_counter() - t_start > args.budget:
            skip = ("skipped", f"--budget {args.budget:g} s spent")
        if skip is not None:
            row["status"], row["reason"] = skip
            return row
        cfg = make_config(files, overrides, row["settings"])
        t_row = time.perf_counter()
        try:
            row.update(
                measure(
                    cfg, stage, d, images, settings["batch"], settings["warmup"], settings["steps"], settings["workers"]
                )
            )
        except Exception as e:  # a row that cannot run is reported, never ends the run
            row["status"], row["reason"], row["error"] = "skipped", first_line(e), True
        row["row_s"] = time.perf_counter() - t_row
        return row

    def emit(row, replaces=None):
        done[row["stage"]][row["config"]] = row
        if replaces is None:
            rows.append(row)
        else:
            rows[rows.index(replaces)] = row
        print(progress_line(row), flush=True)
        add_speedups(rows)
        write(rows)

    for name in plan_rows(args.configs):
        for stage in args.stages:
            emit(run_row(stage, name))
    # "all" failed: once more without the switches that failed alone, if any did
    for stage in args.stages:
        failed = done[stage].get("all")
        if (
            failed is not None
            and failed["error"]
            and all_without(stage, d.device, args, done[stage]) != failed["without"]
        ):
            emit(run_row(stage, "all"), replaces=failed)
    return rows


def all_without(stage, device, args, done):
    """The ALL_ON switches that "all" leaves out: those known not to run here, and those that failed alone."""

    def left_out(s):
        skip = known_skip(s, stage, device, args)
        return (skip is not None and skip[0] == "skipped") or done.get(s, {}).get("error", False)

    return [s for s in ALL_ON if left_out(s)]


def progress_line(row):
    if row["status"] != "ok":
        return f"{row['stage']:>7} | {row['config']:34} | {row['status']}: {row['reason']}"
    return (
        f"{row['stage']:>7} | {row['config']:34} | {row['img_s']:9.1f} img/s | first step {row['first_step_s']:7.2f} s"
        f" | peak {row['peak_mb']:8.0f} MB | loss {row['loss']:.4f}"
    )


def add_speedups(rows):
    base = {r["stage"]: r["img_s"] for r in rows if r["config"] == "baseline" and r["status"] == "ok"}
    for r in rows:
        r["speedup"] = r["img_s"] / base[r["stage"]] if r["img_s"] and r["stage"] in base else None


def markdown_tables(rows):
    """One table per stage, rows in the order of ROWS."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        out += [
            f"### {STAGE_TITLES[stage]}",
            "",
            "| config | img/s | speedup vs baseline | first-step s | peak MB |",
            "|---|---:|---:|---:|---:|",
        ]
        by_name = {r["config"]: r for r in rows if r["stage"] == stage}
        for name in ROWS:
            r = by_name.get(name)
            if r is None:
                continue
            label = name
            if name.startswith("all") and r.get("without"):
                label += f" (without {', '.join(r['without'])})"
            if r["status"] != "ok":
                out.append(f"| {label} | {r['status']}: {r['reason']} | - | - | - |")
                continue
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            out.append(f"| {label} | {r['img_s']:.1f} | {speedup} | {r['first_step_s']:.2f} | {r['peak_mb']:.0f} |")
        out.append("")
    return "\n".join(out)


def target_lines(rows, batch, device):
    """The TARGETS this run's "all" rows speak to: on a GPU those at this run's batch; elsewhere all,
    marked as not the target's setting."""
    lines = []
    for stage, target_batch, key, want, fmt, wanted in TARGETS:
        r = next((r for r in rows if r["stage"] == stage and r["config"] == "all"), None)
        if r is None or not r[key] or (device.type == "cuda" and batch != target_batch):
            continue
        where = "" if device.type == "cuda" else f" (on {device.type} at batch {batch}: not the target's setting)"
        lines.append(
            f"target: {STAGE_TITLES[stage]}, all switches, per-GPU batch {target_batch}: "
            f"{fmt.format(r[key])} (want {wanted}): {'met' if r[key] >= want else 'NOT met'}{where}"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# a profile of the trainer's step


def run_profile(args, cfg, d, settings):
    """Each stage's step under cfg: warm-up steps, then settings["steps"] steps under torch.profiler,
    each in its own range and followed by a device sync. -> {stage: {"steps": rows, "top": kernels}}."""
    from torch.profiler import ProfilerActivity, profile, record_function

    on_cuda = d.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    images = random_images(settings["num_images"], seed=0)
    report = {}
    for stage in args.stages:
        release_memory(d.device)
        set_cuda_flags(d.device, cfg.perf.tf32)
        st = build_step(
            stage, step_config(cfg, settings["batch"], d), d, images.to(d.device) if cfg.data.on_device else images
        )
        for i in range(settings["warmup"]):
            st(i)
        clock(d.device)
        with profile(activities=activities) as prof:
            for i in range(settings["warmup"], settings["warmup"] + settings["steps"]):
                with record_function(f"{step_profile.STEP_LABEL}{i}"):
                    st(i)
                clock(d.device)
        trace = Path(args.profile) / f"trace_{stage}.json"
        prof.export_chrome_trace(str(trace))
        rows, top = step_profile.summarize(prof.profiler.kineto_results.events(), on_cuda)
        print(step_profile.format_summary(stage, rows, top, on_cuda))
        print(f"trace: {trace} (chrome://tracing or https://ui.perfetto.dev)", flush=True)
        report[stage] = {"steps": rows, "top": top, "trace": str(trace), "graph": st.graph is not None}
    return report


# ---------------------------------------------------------------------------------------------
# scaling under torchrun


def run_scaling(args, files, overrides, d, settings):
    """Images/s per rank with the config's [perf] settings: rank 0 alone (no DDP), then all ranks (DDP)."""
    cfg = make_config(files, overrides)
    images = random_images(settings["num_images"], seed=0)
    alone = dist.Dist(0, 0, 1, d.device)
    rows = []
    for stage in args.stages:
        single = None
        if d.is_main:
            single = measure(
                cfg, stage, alone, images, settings["batch"], settings["warmup"], settings["steps"], settings["workers"]
            )
        dist.barrier()  # the other ranks wait while rank 0 runs alone
        results = [single]
        if d.enabled:
            mine = measure(
                cfg, stage, d, images, settings["batch"], settings["warmup"], settings["steps"], settings["workers"]
            )
            results = [None] * d.world_size
            torch.distributed.all_gather_object(results, mine)
        if d.is_main:
            rows.append(
                {
                    "stage": stage,
                    "ranks": 1,
                    "img_s_per_rank": single["img_s"],
                    "img_s_total": single["img_s"],
                    "efficiency": 1.0,
                    "peak_mb": single["peak_mb"],
                }
            )
            if d.enabled:
                per_rank = [r["img_s"] for r in results]
                mean = sum(per_rank) / len(per_rank)
                rows.append(
                    {
                        "stage": stage,
                        "ranks": d.world_size,
                        "img_s_per_rank": mean,
                        "img_s_total": sum(per_rank),
                        "efficiency": mean / single["img_s"],
                        "per_rank": per_rank,
                        "peak_mb": max(r["peak_mb"] for r in results),
                    }
                )
    return rows, cfg


def scaling_table(rows):
    out = [
        "| stage | ranks | img/s per rank | total img/s | scaling efficiency | peak MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['stage']} | {r['ranks']} | {r['img_s_per_rank']:.1f} | {r['img_s_total']:.1f} | "
            f"{100 * r['efficiency']:.0f}% | {r['peak_mb']:.0f} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def run_settings(args, device):
    cuda = device.type == "cuda"
    batch = args.batch or (128 if cuda else 8)
    warmup = args.warmup or ((3 if cuda else 2) if args.quick else 5)
    steps = args.steps or ((10 if cuda else 3) if args.quick else 20)
    workers = args.workers if args.workers is not None else (min(4, (os.cpu_count() or 2) // 2) if cuda else 0)
    # enough images that an epoch spans several batches, so the DataLoader's epoch turns are in the timing
    return {"batch": batch, "warmup": warmup, "steps": steps, "workers": workers, "num_images": 16 * batch}


def model_sizes(cfg):
    e = cfg.encdiff
    return {
        "vqvae": count_params(build_vq(cfg.vqvae)),
        "encoder": count_params(build_encoder(e)),
        "unet": count_params(build_unet(e, cfg.vqvae.embed_dim)),
    }


def main(argv=None):
    args, files, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not args.scaling:
        raise UserError("the table of switches runs in one process; under torchrun use --scaling")
    if args.profile and args.scaling:
        raise UserError("--profile and --scaling are separate runs: choose one")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: the folder does not exist")
    probe = make_config(files, overrides)  # config mistakes stop here, before any work
    d = dist.setup(probe.run.device)
    small = args.small or (args.quick and d.device.type != "cuda")
    overrides = [*(small_model_overrides() if small else []), *overrides]
    settings = run_settings(args, d.device)
    cfg = make_config(files, overrides)
    meta = {
        "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        **versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "model": "small (configs/smoke.toml)" if small else "default",
        "params": model_sizes(cfg),
        "world_size": d.world_size,
        **settings,
    }
    header = (
        f"device {meta['device']} ({meta['cpu_threads']} CPU threads), torch {meta['torch']}, triton {meta['triton']}, "
        f"xformers {meta['xformers']}, commit {meta['commit']}, {meta['date']}\n"
        f"command: {meta['command']}\n"
        f"model {meta['model']}: VQ {meta['params']['vqvae']:,}, encoder {meta['params']['encoder']:,}, "
        f"U-Net {meta['params']['unet']:,} parameters; per-GPU batch {settings['batch']}, "
        f"{settings['warmup']} warm-up + {settings['steps']} timed steps, "
        f"baseline DataLoader workers {settings['workers']}"
    )

    def write_json(report):
        if args.json and d.is_main:
            tmp = Path(f"{args.json}.tmp")
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            tmp.replace(args.json)

    if args.profile:
        print(header, flush=True)
        report = run_profile(args, cfg, d, settings)
        write_json({"meta": meta, "perf": vars(cfg.perf), "profile": report})
        return 0

    if args.scaling:
        rows, cfg = run_scaling(args, files, overrides, d, settings)
        if d.is_main:
            print(header)
            print(f"[perf] {json.dumps(vars(cfg.perf))}, data.on_device {cfg.data.on_device}")
            print(scaling_table(rows))
            write_json({"meta": meta, "perf": vars(cfg.perf), "scaling": rows})
        dist.cleanup()
        return 0

    print(header, flush=True)
    rows = run_table(args, files, overrides, d, settings, lambda rows: write_json({"meta": meta, "rows": rows}))
    print()
    print(header)
    if d.device.type != "cuda":
        print(
            "CPU: `dataset on device` is train.py's in-memory batch gather (no DataLoader); peak MB is the "
            "process's peak RSS during the configuration"
        )
    print(markdown_tables(rows))
    targets = target_lines(rows, settings["batch"], d.device)
    for line in targets:
        print(line)
    write_json({"meta": meta, "rows": rows, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
