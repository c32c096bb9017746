"""Checkpoint files: how a checkpoint is stored, whatever it holds (encdiff/ckpt_contents.py says
what each stage's holds).

One safetensors file per checkpoint: tensors under prefixes (`model.`, `ema.`, `vq.`, `opt.`, ...),
and string metadata: `step`, `stage`, `config` (the resolved TOML), `versions`, JSON extras
(optimiser param groups, scaler state) and `checksum`, a SHA-256 over every tensor's bytes, so a
truncated or bit-flipped file is detected. Nothing is ever unpickled. Writes are atomic
(temporary file, fsync, rename) and the last K checkpoints of a stage are kept; a write that fails
(a full disk) leaves no file behind and raises an OSError that says why, and on a full disk how much
space the file needs (DiskFull).
"""

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from encdiff import runtime
from encdiff.errors import UserError

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.safetensors$")


def checkpoint_name(step):
    return f"ckpt_{step:08d}.safetensors"


def tensors_checksum(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        # view as bytes: works for every dtype (bf16 has no numpy equivalent)
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# flattening state into tensors + JSON


def prefixed(prefix, state_dict):
    # safetensors needs contiguous, unshared storage: channels_last weights are copied here
    return {f"{prefix}.{k}": v.detach().contiguous().clone() for k, v in state_dict.items()}


def unprefixed(prefix, tensors):
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_to_tensors(opt, prefix):
    """Optimiser state as tensors plus its param groups as JSON (no pickle). A hyper-parameter held
    in a tensor (the learning rate of a fused optimiser) is stored as its number."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{prefix}.{idx}.{key}"] = t.detach().contiguous().clone()
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, json.dumps(groups)


def optimizer_from_tensors(opt, prefix, tensors, groups_json):
    state = {}
    for name, t in unprefixed(prefix, tensors).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    # hyper-parameters the optimiser holds in tensors stay those tensors (a captured step reads them)
    held = [{k: v for k, v in g.items() if torch.is_tensor(v)} for g in opt.param_groups]
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups_json)})
    for group, kept in zip(opt.param_groups, held):
        for key, t in kept.items():
            t.fill_(float(group[key]))
            group[key] = t
    # moments in the parameter's own layout (channels-last): a fused optimiser walks both tensors'
    # memory in step, so a contiguous moment beside a channels-last weight would pair wrong elements
    for param, param_state in opt.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ---------------------------------------------------------------------------------------------
# files


def save_checkpoint(path, tensors, *, step, stage, config_toml, extra=None):
    """Atomically write a checkpoint: temporary file, fsync, rename; the old file stays intact."""
    path = Path(path)
    meta = {
        "step": str(step),
        "stage": stage,
        "config": config_toml,
        "versions": json.dumps(runtime.versions()),
        "checksum": tensors_checksum(tensors),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    # about the file's size, for the message of a full disk: the tensors' bytes and the JSON header
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    size += len(json.dumps(meta)) + sum(len(k) + 72 for k in tensors)
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), size)


class DiskFull(OSError):
    """No space (or quota) left for a file: errno ENOSPC/EDQUOT, and strerror says how much it needs,
    so that a caller printing `e.strerror` says it too."""


def write_atomic(path, write, size):
    """write(tmp) a temporary file beside `path`, fsync, rename it to `path`: a reader (evaluate.py
    while training runs) sees the old file or the new one, never part of one. On failure nothing
    is left behind and the error is an OSError (safetensors raises its own type for I/O errors);
    `size`, the bytes the file takes, goes in the message of a full disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)  # first: the space it took counts as free in the message
        raise as_os_error(e, path, size) from None
    finally:
        tmp.unlink(missing_ok=True)


def as_os_error(e, path, size):
    """The error of a failed write as an OSError: safetensors' I/O errors carry the errno only in their
    text ("... (os error 28)"); a full disk becomes a DiskFull that says how much space the file needs.
    Anything else (not an I/O error) is returned as it is."""
    code = e.errno if isinstance(e, OSError) else None
    found = re.search(r"\(os error (\d+)\)", str(e))
    if code is None and found is not None:
        code = int(found.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        message = f"{os.strerror(code)}: {path.name} needs {mib(size)}, {mib(free)} free in {path.parent}"
        return DiskFull(code, message, str(path))
    if isinstance(e, OSError) or code is None:
        return e
    return OSError(code, os.strerror(code), str(path))


def mib(n):
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def write_text_atomic(path, text):
    """A text file (metrics.json) written like a checkpoint: whole or not at all."""
    data = text.encode()
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), len(data))


def read_metadata(path):
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({e})") from None


def checkpoint_metadata(path):
    """The metadata of an encdiff checkpoint file, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    meta = read_metadata(path)
    for key in ("step", "stage", "config", "checksum"):
        if key not in meta:
            raise UserError(f"{path}: not an encdiff checkpoint (metadata has no '{key}')")
    return meta


def load_checkpoint(path, device="cpu", verify=True):
    """(tensors, metadata) of a checkpoint, verified against its checksum."""
    meta = checkpoint_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: corrupt checkpoint ({e})") from None
    if verify and tensors_checksum(tensors) != meta["checksum"]:
        raise UserError(f"{path}: corrupt checkpoint (checksum mismatch: the file was truncated or altered)")
    return tensors, meta


def list_checkpoints(stage_dir):
    """Checkpoint paths of a stage directory, oldest first."""
    d = Path(stage_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if CKPT_RE.match(p.name))


def newest_step(stage_dir):
    """The step of a stage directory's newest checkpoint by its file name (0 without one): cheap, for
    plans; latest_good_checkpoint is the one that verifies."""
    paths = list_checkpoints(stage_dir)
    return int(CKPT_RE.match(paths[-1].name).group(1)) if paths else 0


def latest_good_checkpoint(stage_dir, device="cpu"):
    """Newest checkpoint that verifies, or None; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(stage_dir)):
        try:
            tensors, meta = load_checkpoint(path, device)
            return path, tensors, meta
        except UserError as e:
            if not os.path.lexists(path):  # pruned since the listing by a run that wrote a newer one: list again
                return latest_good_checkpoint(stage_dir, device)
            warnings.warn(f"skipping {e}", stacklevel=2)
    return None


def prune_checkpoints(stage_dir, keep_last):
    for path in list_checkpoints(stage_dir)[:-keep_last]:
        path.unlink(missing_ok=True)


def load_stage_checkpoint(path, stage="encdiff"):
    """A checkpoint file, or a run directory / stage directory -> (file, tensors, metadata) of its
    newest good checkpoint: a corrupt newest one is skipped with a warning, as train.py does."""
    p = Path(path)
    if p.is_file():
        return (p, *load_checkpoint(p))
    if not p.exists():
        raise UserError(f"checkpoint not found: {path}")
    for d in (p / stage, p):
        if list_checkpoints(d):
            found = latest_good_checkpoint(d)
            if found is None:
                raise UserError(f"{d}: every checkpoint there is corrupt")
            return found
    raise UserError(f"{path}: no {stage} checkpoint (ckpt_*.safetensors) in this directory")
