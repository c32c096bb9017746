"""Typed configuration: one dataclass per TOML table, defaults < files < command line.

    cfg = parse_args(["--config", "config.toml", "--config", "configs/cpu.toml", "--encdiff.steps=500"])

Unknown tables or keys, wrong types and invalid values raise UserError naming the key and where it
came from, before any data is read or any model is built. `to_toml(cfg)` writes the resolved
config; `from_toml_text` reads it back to an identical Config.
"""

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import kernels
from encdiff.errors import UserError

STAGES = ("vqvae", "encdiff")
DATASET_NAMES = ("synth3d", "shapes3d", "mpi3d", "cars3d", "dsprites", "h5", "celeba", "imagefolder")
ATTENTION_BACKENDS = ("auto", *kernels.BACKENDS)
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("blocks", "model")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
METRIC_NAMES = ("factor_vae", "dci", "mig", "sap", "beta_vae", "modularity_explicitness")


@dataclass
class RunConfig:
    out_dir: str = "runs/synth3d"
    seed: int = 0
    resume: str = "auto"  # "auto": continue from the latest checkpoint in out_dir; "never"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    device: str = "auto"  # "auto" (cuda if present), "cuda" or "cpu"
    log_every: int = 100  # also the only place the step synchronises with the host
    ckpt_every: int = 5000
    keep_last: int = 3
    image_every: int = 10000  # PNG grids of reconstructions / samples
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT"])  # checkpoint, exit 128 + signal
    stop_check_every: int = 10  # steps between the ranks' agreement on a stop signal (a host sync)
    max_nonfinite: int = 20  # non-finite steps in a row (skipped) before training stops
    init_timeout: float = 300.0  # seconds for the ranks to connect; then a rank exits (torchrun can restart)
    collective_timeout: float = 0.0  # seconds a step waits for the other ranks, then fails (a cut link); 0: torch's
    max_hours: float = 24.0  # CPU: refuse a run that timed steps say takes longer (0: no limit)
    tensorboard: bool = False  # also write the log, live metrics and pictures for TensorBoard (pip install -e ".[tb]")
    seeds: list[int] = field(default_factory=list)  # several runs, one per seed, in out_dir/seed_N (empty: run.seed)
    parallel: str = "none"  # "seeds": under torchrun each process trains its own seeds, no DDP ("none": DDP)


@dataclass
class DataConfig:
    name: str = "synth3d"
    path: str = "data/synth3d.h5"
    grid: str = "full"  # synth3d only: the grid generated when the file is missing ("full" | "small")
    on_device: bool = True  # keep the dataset (or its latents) on the GPU: no data loader in the step


@dataclass
class VQVAEConfig:
    kind: str = "vq"  # "vq" (VQ autoencoder, the release), "kl" (Gaussian-latent KL autoencoder) or "pool" (fixed, CPU)
    pool_size: int = 4  # kind = "pool" only: the latent is the image average-pooled over pool_size x pool_size pixels
    kl_weight: float = 1e-6  # kind = "kl" only
    steps: int = 20000
    batch_size: int = 256  # global, split across ranks
    lr: float = 1.152e-3  # at lr_ref_batch; the used lr is lr * batch_size / lr_ref_batch (released: 4.5e-6 x 256)
    lr_ref_batch: int = 256
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    enc_res_blocks: int = 2
    dec_res_blocks: int = 3
    z_channels: int = 3
    embed_dim: int = 3
    n_embed: int = 2048
    beta: float = 0.25
    legacy_beta: bool = True  # the release's (taming legacy) weights: commitment 1, codebook beta; false: VQ-VAE's
    ema_codebook: bool = False
    use_gan: bool = False
    disc_start: int = 0
    disc_weight: float = 0.75
    lpips_path: str = ""  # LPIPS weights file you supply; empty: no perceptual term
    ckpt: str = ""  # use this VQ checkpoint and skip stage 1


LR_SCALINGS = ("linear", "sqrt", "none")


@dataclass
class EncDiffConfig:
    steps: int = 100000
    batch_size: int = 128  # global, split across ranks
    lr: float = 2.56e-4  # at lr_ref_batch; the used lr follows batch_size by lr_scaling
    lr_ref_batch: int = 128
    lr_scaling: str = "linear"  # lr * (batch_size / lr_ref_batch): "linear"; its square root: "sqrt"; "none"
    warmup_steps: int = 10000
    warmup_images: int = 0  # > 0: the warm-up lasts this many images at any batch (replaces warmup_steps)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    ema_decay: float = 0.9999
    ema_all: bool = False  # paper: EMA of encoder and U-Net; release: U-Net only
    num_tokens: int = 20
    token_dim: int = 16
    encoder_ch: int = 128
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_heads: int = 8
    dropout: float = 0.0
    timesteps: int = 1000
    schedule: str = "cosine"  # "cosine" (paper) or "linear" (release)
    loss: str = "l1"  # "l1" (every released config) or "l2" (the paper's table)
    prediction: str = "eps"  # what the U-Net predicts: "eps" (paper, release), "v" or "x0" (encdiff/diffusion.py)
    t_power: float = (
        0.0  # training timesteps drawn with density ~ (t/T)^t_power: 0 uniform (paper), > 0 favours noisy steps
    )
    grad_checkpoint: bool = False


@dataclass
class PerfConfig:
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    compile: str = "default"  # off | default | max-autotune-no-cudagraphs
    compile_scope: str = "model"  # model: the whole model in one graph | blocks: each repeated block once per shape
    channels_last: bool = False  # NCHW: CUDA's group_norm copies channels-last inputs (config.toml)
    attention: str = "auto"
    fused_adam: bool = True  # CUDA only
    tf32: bool = True
    cache_latents: bool = True  # encode the frozen VQ latents once for stage 2
    cuda_graph: bool = True  # CUDA: record each stage's update once and replay it (encdiff/steps.py)


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: list(METRIC_NAMES))
    seed: int = 0
    batch_size: int = 1024
    pictures: bool = True
    ddim_steps: int = 200
    inception_path: str = ""  # Inception weights you supply for FID; empty: FID is skipped
    precision: str = "fp32"  # the scored codes and stage 2's cached latents: fp32 (the release) | auto | bf16
    every: int = 0  # stage 2: quick metrics of the live encoder every N steps, in the background (0: off)
    every_metrics: list[str] = field(default_factory=lambda: ["factor_vae", "dci", "mig"])
    target_factor_vae: float = 0.9  # time to disentanglement: the first scores at or above both
    target_dci: float = 0.8
    stop_at_target: bool = False  # with eval.every: stage 2 ends at the first point at both targets (exit 0)
    patience: int = 1  # stop_at_target: that many points in a row at both targets


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    encdiff: EncDiffConfig = field(default_factory=EncDiffConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# reading values


def _type_name(tp):
    return getattr(tp, "__name__", str(tp)).replace("list[", "list of ").rstrip("]")


def _show(value):
    """repr(value) for a message: Python refuses to write an int of over 4300 digits."""
    try:
        return repr(value)
    except ValueError:
        what = "" if isinstance(value, int) else f"a {type(value).__name__} holding "
        return f"{what}a number of over 4300 digits"


def _coerce(value, tp, where):
    """Check a TOML value against a field's type; ints are accepted where floats are expected."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        # Every number ends up in numpy or torch (int64, or a float: float() of a larger int overflows).
        raise UserError(f"{where}: {_show(value)} is out of range (more than 64 bits)")
    origin = get_origin(tp)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list of {item_tp.__name__}, got {_show(value)}")
        return [_coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{where}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")


def _parse_cli_value(text, tp):
    """A command-line value: TOML syntax first (5, 1e-4, true, [1, 2]), else a bare string."""
    if tp is str:
        return text
    if tp is bool and text.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return text.lower() in ("true", "yes", "1", "on")
    if get_origin(tp) is list and not text.strip().startswith("["):
        text = "[" + ",".join(f'"{t.strip()}"' if get_args(tp)[0] is str else t for t in text.split(",")) + "]"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # not TOML (TOMLDecodeError is a ValueError), too many digits, too deep
        return text  # _coerce then reports the type mismatch


def _section_types(section_cls):
    return get_type_hints(section_cls)


# Keys that existed once: a stored config (a checkpoint's) still holding one reads fine; a user's
# file or command line gets the reason instead of "unknown key".
RETIRED_KEYS = {"eval.quick": "use evaluate.py --quick"}


def _apply(cfg, table, key, value, where, from_cli=False, sources=None, stored=False):
    if f"{table}.{key}" in RETIRED_KEYS:
        if stored:
            return
        raise UserError(f"{where}: {table}.{key} no longer exists ({RETIRED_KEYS[f'{table}.{key}']})")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if table not in sections:
        raise UserError(f"{where}: unknown table [{table}] (known: {', '.join(sections)})")
    section = getattr(cfg, table)
    types = _section_types(type(section))
    if key not in types:
        raise UserError(f"{where}: unknown key {table}.{key} (known: {', '.join(types)})")
    tp = types[key]
    if from_cli and isinstance(value, str):
        value = _parse_cli_value(value, tp)
    setattr(section, key, _coerce(value, tp, f"{where}: {table}.{key}"))
    if sources is not None:
        sources[f"{table}.{key}"] = where


def load_file(cfg, path, sources=None):
    """Apply one TOML file on top of cfg (later files win)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    apply_dict(cfg, loads(text, path), str(path), sources)


def loads(text, where):
    """TOML text -> dict, or one UserError naming `where`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML ({e})") from None
    except ValueError:  # tomllib's int() of a number of over 4300 digits (Python's limit)
        raise UserError(f"{where}: not valid TOML (a number of over 4300 digits)") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise UserError(f"{where}: not valid TOML (arrays or tables nested too deeply)") from None


def apply_dict(cfg, data, where, sources=None, stored=False):
    for table, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"{where}: '{table}' must be a table like [{table}], not a bare value")
        for key, value in values.items():
            _apply(cfg, table, key, value, where, sources=sources, stored=stored)


def split_args(argv, extra_flags=()):
    """Split argv into (config files, [(dotted key, raw value)], other args).

    Accepts `--config FILE` (repeatable), `--section.key=value` and `--section.key value`.
    Arguments not of those forms are returned untouched for the caller's own parser.
    """
    files, overrides, rest = [], [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            if "=" in a:
                files.append(a.split("=", 1)[1])
            elif i + 1 < len(argv):
                files.append(argv[i + 1])
                i += 1
            else:
                raise UserError("--config needs a file name")
        elif a.startswith("--") and "." in a.split("=", 1)[0] and a.split("=", 1)[0] not in extra_flags:
            if "=" in a:
                key, value = a[2:].split("=", 1)
            elif i + 1 < len(argv):
                key, value = a[2:], argv[i + 1]
                i += 1
            else:
                raise UserError(f"{a} needs a value")
            overrides.append((key, value))
        else:
            rest.append(a)
        i += 1
    return files, overrides, rest


def build_config(files=(), overrides=(), base=None):
    """base (default: the dataclass defaults) < files < overrides, validated. evaluate.py passes a
    checkpoint's stored config as the base."""
    cfg, sources = (copy.deepcopy(base) if base is not None else Config()), {}
    for f in files:
        load_file(cfg, f, sources)
    for dotted, raw in overrides:
        if dotted.count(".") != 1:
            raise UserError(f"command line: override --{dotted} must look like --section.key=value")
        table, key = dotted.split(".")
        _apply(cfg, table, key, raw, "command line", from_cli=True, sources=sources)
    validate(cfg, sources)
    return cfg


def help_text(usage):
    """`usage`, then every table with its keys and defaults (as --section.key=value takes them)."""
    lines = [
        usage.rstrip(),
        "",
        "Config keys (defaults; every key is explained in config.toml, the method in README.md):",
    ]
    for table in dataclasses.fields(Config):
        lines.append(f"  [{table.name}]")
        for f in dataclasses.fields(table.type):
            lines.append(f"    {table.name}.{f.name} = {_toml_value(getattr(getattr(Config(), table.name), f.name))}")
    return "\n".join(lines)


def parse_args(argv):
    """Config from `--config FILE ... --section.key=value ...`; anything else is an error."""
    files, overrides, rest = split_args(argv)
    if rest:
        raise UserError(f"unexpected argument {rest[0]!r} (use --config FILE and --section.key=value)")
    return build_config(files, overrides)


# ---------------------------------------------------------------------------------------------
# values


def _is_utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes of undecodable bytes
        return False
    return True


def validate(cfg, sources=None):
    """Check values (not only types); the error names the key and the file that set it."""
    sources = sources or {}

    def _check(ok, key, msg):
        if not ok:
            where = f"{sources[key]}: " if key in sources else ""
            raise UserError(f"{where}{key}: {msg}")

    def _one_of(value, choices, key):
        _check(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")

    for table in dataclasses.fields(cfg):  # a path given as bytes that are not UTF-8 (argv keeps them)
        for f in dataclasses.fields(getattr(cfg, table.name)):
            value = getattr(getattr(cfg, table.name), f.name)
            texts = value if isinstance(value, list) else [value]
            _check(
                all(_is_utf8(t) for t in texts if isinstance(t, str)),
                f"{table.name}.{f.name}",
                f"is not valid UTF-8 ({ascii(value)}); every checkpoint keeps the config as TOML text: rename it",
            )
    r, d, v, e, p, ev = cfg.run, cfg.data, cfg.vqvae, cfg.encdiff, cfg.perf, cfg.eval
    _check(r.out_dir != "", "run.out_dir", "must not be empty")
    _check(r.resume in ("auto", "never"), "run.resume", f"must be 'auto' or 'never'; got {r.resume!r}")
    _check(
        len(r.stages) > 0 and all(s in STAGES for s in r.stages),
        "run.stages",
        f"must be a non-empty subset of {list(STAGES)}; got {r.stages}",
    )
    _one_of(r.device, ("auto", "cuda", "cpu"), "run.device")
    _one_of(r.parallel, ("none", "seeds"), "run.parallel")
    _check(r.parallel == "none" or r.seeds, "run.parallel", "'seeds' needs run.seeds (e.g. --run.seeds=0,1,2)")
    _check(len(set(r.seeds)) == len(r.seeds), "run.seeds", f"must not repeat a seed; got {r.seeds}")
    for seed in r.seeds:
        _check(0 <= seed < 2**32, "run.seeds", f"each must be in [0, 2^32); got {seed}")
    _check(
        all(sig in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP") for sig in r.stop_signals),
        "run.stop_signals",
        f"must be among SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP; got {r.stop_signals}",
    )
    _check(r.max_hours >= 0, "run.max_hours", f"must be >= 0 (0: no limit); got {r.max_hours}")
    _check(
        r.collective_timeout >= 0,
        "run.collective_timeout",
        f"must be >= 0 (0: torch's default); got {r.collective_timeout}",
    )
    for k in ("stop_check_every", "max_nonfinite", "init_timeout"):
        _check(getattr(r, k) > 0, f"run.{k}", f"must be positive; got {getattr(r, k)}")
    for k in ("log_every", "ckpt_every", "keep_last", "image_every"):
        _check(getattr(r, k) > 0, f"run.{k}", f"must be positive; got {getattr(r, k)}")
    _one_of(d.name, DATASET_NAMES, "data.name")
    _check(d.path != "", "data.path", "must not be empty")
    _one_of(d.grid, ("full", "small"), "data.grid")
    for sec, name in ((v, "vqvae"), (e, "encdiff")):
        _check(sec.steps > 0, f"{name}.steps", f"must be positive; got {sec.steps}")
        _check(sec.batch_size > 0, f"{name}.batch_size", f"must be positive; got {sec.batch_size}")
        _check(sec.lr > 0, f"{name}.lr", f"must be positive; got {sec.lr}")
        _check(
            len(sec.betas) == 2 and all(0 <= b < 1 for b in sec.betas),
            f"{name}.betas",
            f"must be two numbers in [0, 1); got {sec.betas}",
        )
    _one_of(v.kind, ("vq", "kl", "pool"), "vqvae.kind")
    _check(
        v.kind != "pool" or v.embed_dim == 3,
        "vqvae.embed_dim",
        f"must be 3 with kind = 'pool' (the latent is the image); got {v.embed_dim}",
    )
    _check(
        v.pool_size > 0 and 64 % v.pool_size == 0,
        "vqvae.pool_size",
        f"must divide the 64-pixel image; got {v.pool_size}",
    )
    _check(v.kl_weight >= 0, "vqvae.kl_weight", f"must be >= 0; got {v.kl_weight}")
    _check(v.ch > 0, "vqvae.ch", f"must be positive; got {v.ch}")
    _check(
        len(v.ch_mult) > 0 and all(m > 0 for m in v.ch_mult),
        "vqvae.ch_mult",
        f"must be positive numbers; got {v.ch_mult}",
    )
    for k in ("enc_res_blocks", "dec_res_blocks", "z_channels", "embed_dim", "n_embed"):
        _check(getattr(v, k) > 0, f"vqvae.{k}", f"must be positive; got {getattr(v, k)}")
    for k in ("beta", "disc_weight", "disc_start"):
        _check(getattr(v, k) >= 0, f"vqvae.{k}", f"must be >= 0; got {getattr(v, k)}")
    _check(e.lr_ref_batch > 0, "encdiff.lr_ref_batch", f"must be positive; got {e.lr_ref_batch}")
    _check(v.lr_ref_batch > 0, "vqvae.lr_ref_batch", f"must be positive; got {v.lr_ref_batch}")
    _check(e.warmup_steps >= 0, "encdiff.warmup_steps", f"must be >= 0; got {e.warmup_steps}")
    _check(e.warmup_images >= 0, "encdiff.warmup_images", f"must be >= 0 (0: warmup_steps); got {e.warmup_images}")
    _one_of(e.lr_scaling, LR_SCALINGS, "encdiff.lr_scaling")
    _check(e.weight_decay >= 0, "encdiff.weight_decay", f"must be >= 0; got {e.weight_decay}")
    _check(0 <= e.ema_decay < 1, "encdiff.ema_decay", f"must be in [0, 1); got {e.ema_decay}")
    for k in ("num_tokens", "token_dim", "encoder_ch", "model_channels", "num_res_blocks", "num_heads", "timesteps"):
        _check(getattr(e, k) > 0, f"encdiff.{k}", f"must be positive; got {getattr(e, k)}")
    _check(
        len(e.channel_mult) > 0 and all(m > 0 for m in e.channel_mult),
        "encdiff.channel_mult",
        f"must be positive numbers; got {e.channel_mult}",
    )
    _check(
        all(0 <= a < len(e.channel_mult) for a in e.attention_levels),
        "encdiff.attention_levels",
        f"must be level indices below {len(e.channel_mult)}; got {e.attention_levels}",
    )
    for m in e.channel_mult:
        c = e.model_channels * m
        _check(
            c % 32 == 0 and c % e.num_heads == 0,
            "encdiff.model_channels",
            f"every level's channels ({c}) must be divisible by 32 and by num_heads={e.num_heads}",
        )
    _check(0 <= e.dropout < 1, "encdiff.dropout", f"must be in [0, 1); got {e.dropout}")
    _one_of(e.schedule, ("cosine", "linear"), "encdiff.schedule")
    _one_of(e.loss, ("l1", "l2"), "encdiff.loss")
    _one_of(e.prediction, ("eps", "v", "x0"), "encdiff.prediction")
    _check(0 <= e.t_power < math.inf, "encdiff.t_power", f"must be a number >= 0; got {e.t_power}")
    _one_of(p.precision, PRECISIONS, "perf.precision")
    _one_of(p.compile, COMPILE_MODES, "perf.compile")
    _one_of(p.compile_scope, COMPILE_SCOPES, "perf.compile_scope")
    _one_of(p.attention, ATTENTION_BACKENDS, "perf.attention")
    _check(
        all(m in METRIC_NAMES for m in ev.metrics),
        "eval.metrics",
        f"unknown metric in {ev.metrics}; known: {', '.join(METRIC_NAMES)}",
    )
    _one_of(ev.precision, ("fp32", "auto", "bf16"), "eval.precision")
    _check(ev.every >= 0, "eval.every", f"must be >= 0 (0: off); got {ev.every}")
    _check(
        len(ev.every_metrics) > 0 and all(m in METRIC_NAMES for m in ev.every_metrics),
        "eval.every_metrics",
        f"must be a non-empty list of {', '.join(METRIC_NAMES)}; got {ev.every_metrics}",
    )
    for key in ("target_factor_vae", "target_dci"):
        _check(0 <= getattr(ev, key) <= 1, f"eval.{key}", f"must be in [0, 1]; got {getattr(ev, key)}")
    _check(ev.patience >= 1, "eval.patience", f"must be >= 1; got {ev.patience}")
    if ev.stop_at_target:
        _check(ev.every > 0, "eval.stop_at_target", "needs eval.every > 0 (the points it stops at)")
        _check(
            {"factor_vae", "dci"} <= set(ev.every_metrics),
            "eval.stop_at_target",
            f"needs factor_vae and dci in eval.every_metrics (the targets); got {ev.every_metrics}",
        )
    _check(ev.batch_size > 0, "eval.batch_size", f"must be positive; got {ev.batch_size}")
    _check(
        0 < ev.ddim_steps <= e.timesteps,
        "eval.ddim_steps",
        f"must be between 1 and encdiff.timesteps ({e.timesteps}); got {ev.ddim_steps}",
    )
    for key, seed in (("run.seed", r.seed), ("eval.seed", ev.seed)):
        _check(0 <= seed < 2**32, key, f"must be in [0, 2^32); got {seed}")


# ---------------------------------------------------------------------------------------------
# what a checkpoint fixes

# The keys that say what a stage's training computes. A stage resumes from its checkpoint only with
# the values it was trained with (check_resumable); stage 1's keys cover the data and the seed too,
# stage 2's also the first stage it trains on. Every other key may change between runs (FREE_KEYS):
# how long, where, how often, and how fast. A test keeps the two lists covering every key once.
# ARCH_KEYS: what a stage's modules are built from (their shapes); the rest of STAGE_KEYS is how
# they are trained.
ARCH_KEYS = {
    "vqvae": (
        "kind",
        "pool_size",
        "ch",
        "ch_mult",
        "enc_res_blocks",
        "dec_res_blocks",
        "z_channels",
        "embed_dim",
        "n_embed",
    ),
    "encdiff": (
        "num_tokens",
        "token_dim",
        "encoder_ch",
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_levels",
        "num_heads",
        "timesteps",
        "schedule",
    ),
}
VQ_ARCH_KEYS = ARCH_KEYS["vqvae"]
STAGE_KEYS = {
    "vqvae": {
        "run": ("seed",),
        "data": ("name", "grid"),
        "vqvae": (
            *VQ_ARCH_KEYS,
            "kl_weight",
            "batch_size",
            "lr",
            "lr_ref_batch",
            "betas",
            "beta",
            "legacy_beta",
            "ema_codebook",
            "use_gan",
            "disc_start",
            "disc_weight",
            "lpips_path",
        ),
    },
    "encdiff": {
        "run": ("seed",),
        "data": ("name", "grid"),
        "vqvae": VQ_ARCH_KEYS,
        "encdiff": (
            *ARCH_KEYS["encdiff"],
            "batch_size",
            "lr",
            "lr_ref_batch",
            "lr_scaling",
            "warmup_steps",
            "warmup_images",
            "weight_decay",
            "betas",
            "ema_decay",
            "ema_all",
            "dropout",
            "loss",
            "prediction",
            "t_power",
        ),
    },
}
FREE_KEYS = {
    "run": (
        "out_dir",
        "resume",
        "stages",
        "device",
        "log_every",
        "ckpt_every",
        "keep_last",
        "image_every",
        "stop_signals",
        "stop_check_every",
        "max_nonfinite",
        "init_timeout",
        "collective_timeout",
        "max_hours",
        "tensorboard",
        "seeds",
        "parallel",
    ),
    "data": ("path", "on_device"),
    "vqvae": ("steps", "ckpt"),
    "encdiff": ("steps", "grad_checkpoint"),
    "perf": "*",
    "eval": "*",
}


def _differences(stored, cfg, keys):
    for table, names in keys.items():
        for name in names:
            then, now = getattr(getattr(stored, table), name), getattr(getattr(cfg, table), name)
            if then != now:
                yield f"{table}.{name}", then, now


def check_resumable(stored, cfg, stage, path):
    """A checkpoint of `stage` trained with other values of its STAGE_KEYS is one clear error."""
    for key, then, now in _differences(stored, cfg, STAGE_KEYS[stage]):
        raise UserError(
            f"{path}: this {stage} run was trained with {key} = {_toml_value(then)}, the config now says "
            f"{_toml_value(now)}; use those values to resume it, or start a new run with another "
            f"run.out_dir"
        )


def check_same_vq(stored, cfg, path):
    """The frozen first stage of stage 2 must be the one the config describes (it is rebuilt from it)."""
    for key, then, now in _differences(stored, cfg, {"vqvae": VQ_ARCH_KEYS}):
        raise UserError(
            f"{path}: checkpoint from an incompatible model config: {key} is {_toml_value(then)} "
            f"there, {_toml_value(now)} here"
        )


def keep_model_tables(cfg, stored):
    """Evaluation: the weights define the model, so [vqvae] and [encdiff] always come from the stored
    config (a `--config config.toml` would otherwise turn a small run's model into the default one).
    -> the keys whose other values were ignored."""
    ignored = []
    for table in STAGES:
        now, then = getattr(cfg, table), getattr(stored, table)
        ignored += [
            f"{table}.{f.name}" for f in dataclasses.fields(now) if getattr(now, f.name) != getattr(then, f.name)
        ]
        setattr(cfg, table, then)
    return ignored


# ---------------------------------------------------------------------------------------------
# writing


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", **{chr(i): f"\\u{i:04x}" for i in (*range(0x20), 0x7F)}}


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # repr round-trips floats exactly
    if isinstance(v, str):  # TOML takes a quote, a backslash or a control character only escaped
        return '"' + "".join(_TOML_ESCAPES.get(c, c) for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg):
    """The resolved config as TOML text; from_toml_text(to_toml(cfg)) == cfg."""
    lines = []
    for sec in dataclasses.fields(cfg):
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, sec.name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def from_toml_text(text, where="stored config"):
    cfg = Config()
    data = loads(text, where)
    apply_dict(cfg, data, where, stored=True)
    if "lr_ref_batch" not in data.get("vqvae", {}):  # stored before stage 1's lr scaled: lr was absolute
        cfg.vqvae.lr_ref_batch = cfg.vqvae.batch_size
    validate(cfg)
    return cfg
