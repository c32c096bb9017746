"""What one training update costs on a GPU, predicted on any machine, GPU or not.

    python benchmarks/step_trace.py                                   # stage 2, per-GPU batch 128, H200
    python benchmarks/step_trace.py --stage vqvae --batch 256 --card H100
    python benchmarks/step_trace.py --batch 1024 --top 20 --json trace.json
    python benchmarks/step_trace.py --config config.toml --encdiff.model_channels=32   # any config

train.py's step of a stage (encdiff/steps.py, the config's model at the given per-GPU batch) is
built, moved to the meta device (shapes without data, so any batch costs the same few seconds) and
its second update (forward, backward, optimiser, EMA, non-finite guard) is recorded ATen op by ATen
op, under the rules a CUDA device applies that a CPU does not:
  - autocast's CUDA op lists (matmuls and convolutions in the low precision; norms, upsampling,
    pow, exp and the losses in fp32; sum and softmax accumulate in fp32);
  - the attention kernel that `auto` picks on CUDA (kernels.dispatch.AUTO_RULE), and sdpa's flash
    kernel for bf16/fp16 (the memory-efficient one for fp32);
  - group_norm's copy of a channels-last input to NCHW (CUDA has no channels-last group norm
    kernel, pytorch issue 111824), and cuDNN's copy of an NCHW input to a channels-last weight.
For each op: kernel launches (a multi-tensor op launches one per chunk of tensors, as CUDA's
multi_tensor_apply does), bytes read and written, FLOPs. The report gives them per part of the
model and per kind of op, the costliest ops, and time bounds on a named card:
  compute      every FLOP at the card's tensor-core peak;
  unfused      each op on its own, max(its FLOPs, its bytes) per op (eager, or a CUDA graph of it);
  fused        elementwise ops, casts, copies and norms fused into their neighbours (what a whole-
               step torch.compile could reach at best): only tensors that pass between a fusible
               op and a matmul, attention, optimiser or the step's persistent state cost bytes;
  graph replay the unfused / fused time plus 1, 2 or 3 us of device time per launched kernel.
These are predictions, not measurements: benchmarks/train_bench.py --profile measures on a GPU.
Ops that CUDA runs inside another op (cuBLAS workspaces, cuDNN's own transposes) are not seen.
"""

import collections
import copy
import json
import math
import os
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import kernels.dispatch  # noqa: E402
from encdiff import dist  # noqa: E402
from encdiff.config import build_config, split_args  # noqa: E402
from encdiff.errors import ArgumentParser, UserError, exit_on_user_error  # noqa: E402
from encdiff.models.unet import Attention, Stage  # noqa: E402
from encdiff.runtime import LOW_DTYPES, versions  # noqa: E402
from encdiff.steps import EncDiffStep, build_step  # noqa: E402

META = torch.device("meta")
# Peaks (dense, per second) and the copy bandwidth a kernel can reach. H100: SXM5's data sheet
# (989 TFLOP/s bf16, 495 TF32, 3.35 TB/s) with the copy bandwidth at the 88% of the data sheet that
# the H200 measured; H200: the same tensor cores, 4.8 TB/s on the sheet, 4,234 GB/s measured by
# benchmarks/attn_bench.py (RESULTS.md, "Attention kernels").
CARDS = {
    "H100": {"bf16_flops": 989e12, "tf32_flops": 495e12, "bandwidth": 2.95e12},
    "H200": {"bf16_flops": 989e12, "tf32_flops": 495e12, "bandwidth": 4.234e12},
}
LAUNCH_US = (1, 2, 3)  # device time per kernel node in a graph replay, the range of the bounds

# ---------------------------------------------------------------------------------------------
# CUDA's rules on meta tensors

# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp), by the name the Python call has
LOW_PRECISION = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
    "prelu", "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "linear",
    "addbmm", "baddbmm", "bmm", "chain_matmul", "scaled_dot_product_attention",
}  # fmt: skip
FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "cosine_similarity",
    "nll_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "binary_cross_entropy_with_logits",
    "dist", "pdist", "cdist", "renorm", "logsumexp", "interpolate", "upsample_nearest2d", "upsample_bilinear2d",
}  # fmt: skip
FP32_ACCUMULATE = {"sum", "prod", "softmax", "log_softmax", "cumsum", "cumprod"}  # dtype=fp32 unless given


class Autocast:
    """torch.autocast while the trace runs: the state the rules read (meta tensors have no autocast
    of their own, and torch.autocast refuses device 'meta')."""

    stack = []  # (enabled, dtype), innermost last

    def __init__(self, device_type="cuda", dtype=None, enabled=True, cache_enabled=None):
        self.state = (enabled, dtype or (self.stack[-1][1] if self.stack else torch.bfloat16))

    def __enter__(self):
        Autocast.stack.append(self.state)

    def __exit__(self, *exc):
        Autocast.stack.pop()

    @classmethod
    def dtype(cls):
        """The low precision in force, or None."""
        return cls.stack[-1][1] if cls.stack and cls.stack[-1][0] else None


@contextmanager
def autocast_on_meta():
    """torch.autocast is Autocast inside the block (the models enter it too, e.g. to turn it off)."""
    real, torch.autocast = torch.autocast, Autocast
    try:
        yield
    finally:
        torch.autocast = real


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in (dtype, torch.float64):
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _sdpa_kernel(q, k, v, *args, **kwargs):
    """The kernel CUDA's sdpa picks here: flash for bf16/fp16 (head dim a multiple of 8, at most
    256), the memory-efficient one otherwise."""
    d = q.shape[-1]
    if q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, q.requires_grad)[0]


class CudaRules(TorchFunctionMode):
    """Applies CUDA's autocast lists, its sdpa kernel choice and its layout copies to the Python-level
    calls, and labels each autograd node with the part of the model that made it (`label()`), so
    that the backward's ops can be attributed too."""

    def __init__(self, label):
        super().__init__()
        self.label = label

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        low = Autocast.dtype()
        if low is not None and name in LOW_PRECISION:
            args, kwargs = _cast(args, low), {k: _cast(v, low) for k, v in kwargs.items()}
        elif low is not None and name in FP32:
            args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        elif low is not None and name in FP32_ACCUMULATE and kwargs.get("dtype") is None:
            if isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.bfloat16, torch.float16):
                kwargs["dtype"] = torch.float32
        if name == "group_norm" and not args[0].is_contiguous():
            args = (args[0].contiguous(), *args[1:])  # CUDA's group_norm: input.contiguous()
        if name in ("conv2d", "convolution") and _channels_last(args[1]) and not _channels_last(args[0]):
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])  # cuDNN's choice
        if name == "scaled_dot_product_attention" and args[0].device.type == "meta":
            out = _sdpa_kernel(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            node = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
            if node is not None and "part" not in node.metadata:
                node.metadata["part"] = self.label()
        return out


def _channels_last(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@contextmanager
def cuda_attention_rule(model):
    """Every `auto` attention layer runs what AUTO_RULE picks on CUDA for its sequence lengths."""

    def pick(module, args):
        x = args[0]
        keys = args[1].shape[1] if len(args) > 1 and args[1] is not None else x.shape[1]
        module.backend = kernels.dispatch.auto_candidates("cuda", keys, x.shape[1])[0]

    layers = [m for m in model.modules() if isinstance(m, Attention) and m.backend == "auto"]
    hooks = [m.register_forward_pre_hook(pick) for m in layers]
    try:
        yield
    finally:
        for h, m in zip(hooks, layers):
            h.remove()
            m.backend = "auto"


# ---------------------------------------------------------------------------------------------
# which part of the model an op belongs to


# Python code outside any module, by (file, function), innermost frame first
CODE_PARTS = (
    ("torch/optim/", None, "optimiser"),
    ("encdiff/optim.py", "apply", "EMA"),
    ("encdiff/optim.py", "step", "non-finite guard"),
    ("encdiff/optim.py", "update", "non-finite guard"),
    ("encdiff/diffusion.py", None, "diffusion loss"),
    ("encdiff/models/vq_loss.py", None, "loss"),
)


class Parts:
    """The part label of the op running now: the innermost labelled module, else the code around it."""

    def __init__(self, st):
        self.modules = module_labels(st)
        self.stack = []
        self.hooks = []

    def __enter__(self):
        def push(module, args):
            label = self.modules.get(module)
            if label is Stage:  # a U-Net level: named by its input's resolution
                label = f"U-Net {args[0].shape[-2]}x{args[0].shape[-1]}"
            if label is not None:
                self.stack.append(label)

        def pop(module, args, out):
            if module in self.modules:
                self.stack.pop()

        self.hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(push),
            torch.nn.modules.module.register_module_forward_hook(pop),
        ]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def __call__(self):
        if self.stack:
            return self.stack[-1]
        frame = sys._getframe(1)
        while frame is not None:
            path = frame.f_code.co_filename.replace(os.sep, "/")
            for where, function, part in CODE_PARTS:
                if where in path and function in (None, frame.f_code.co_name):
                    return part
            frame = frame.f_back
        return "data + noise"


def module_labels(st):
    """{module: part label} of a step's model (Stage: named per resolution when it runs)."""
    m = st.model
    if isinstance(st, EncDiffStep):
        labels = {m.encoder: "concept encoder", m.unet: "U-Net embedding + head"}
        for stage in (*m.unet.input_blocks, m.unet.middle_block, *m.unet.output_blocks):
            labels[stage] = Stage
        return labels
    labels = {getattr(m, name): part for name, part in (("encoder", "VQ encoder"), ("decoder", "VQ decoder"))}
    for name, part in (("quant_conv", "VQ encoder"), ("quantizer", "quantiser"), ("post_quant_conv", "VQ decoder")):
        if hasattr(m, name):
            labels[getattr(m, name)] = part
    labels[st.loss_fn] = "loss"
    return labels


# ---------------------------------------------------------------------------------------------
# the record of ops

NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "lift_fresh",
    "is_same_size", "set_", "_local_scalar_dense", "record_stream", "_record_function_enter_new",
    "_record_function_exit", "_unsafe_view",
}  # fmt: skip
SYNCS = {"_local_scalar_dense", "nonzero", "item"}
KINDS = {
    "matmul / conv": {"mm", "addmm", "bmm", "baddbmm", "addbmm", "convolution", "convolution_backward"},
    "norm": {
        "native_group_norm", "native_group_norm_backward", "native_layer_norm", "native_layer_norm_backward",
        "native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
        "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
    },
    "copy": {
        "clone", "copy_", "_to_copy", "cat", "stack", "constant_pad_nd", "index_select", "embedding", "index",
        "gather", "slice_backward", "select_backward", "embedding_dense_backward", "index_add_", "index_put_",
        "_unsafe_index", "new_zeros",
    },
    "reduction": {"sum", "mean", "var_mean", "linalg_vector_norm", "argmin", "argmax", "amax", "max", "min", "std"},
    "fill": {"zeros", "zeros_like", "ones_like", "full", "full_like", "fill_", "zero_", "ones", "scalar_tensor"},
    "random": {"randn", "randint", "rand", "uniform_", "normal_", "randperm", "bernoulli_", "native_dropout"},
}  # fmt: skip
FUSIBLE = {"pointwise", "cast", "copy", "fill", "norm", "reduction"}
# CUDA's multi_tensor_apply: at most this many tensors per launch by the number of lists, 320
# blocks of 65,536 elements per launch
MTA_TENSORS, MTA_BLOCKS, MTA_CHUNK = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}, 320, 65536


def kind_of(name, args, out):
    if name.startswith("_fused_adam") or name.startswith("_fused_sgd"):
        return "optimiser"
    if name.startswith("_foreach_"):
        if name.startswith("_foreach_copy") and args[0][0].dtype != args[1][0].dtype:
            return "cast"
        return "multi-tensor"
    if "attention" in name or name.startswith("short_kv_attention"):
        return "attention"
    if name == "nearest_code":
        return "codebook search"
    if name == "_to_copy" and isinstance(out, torch.Tensor) and out.dtype != args[0].dtype:
        return "cast"
    return next((kind for kind, names in KINDS.items() if name in names), "pointwise")


def tensors_in(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from tensors_in(v)


def nbytes(t):
    """Bytes a kernel touches in t: its elements, or fewer when it is an expanded view."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def multi_tensor_launches(lists):
    """Kernel launches of a multi-tensor op over these tensor lists (CUDA's multi_tensor_apply)."""
    depth = min(len(lists), 5)
    launches, tensors, blocks = 0, 0, 0
    for t in lists[0]:
        tensors += 1
        for _ in range(math.ceil(t.numel() / MTA_CHUNK)):
            blocks += 1
            if blocks == MTA_BLOCKS:
                launches, blocks = launches + 1, 0
        if tensors == MTA_TENSORS[depth]:
            launches, tensors, blocks = launches + (blocks > 0), 0, 0
    return launches + (blocks > 0 or tensors > 0)


def flops_of(func, name, args, kwargs, out):
    if func._overloadpacket in flop_registry:
        return flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
    if name == "nearest_code":  # per vector and code: C products, the sums, the comparison
        (n, c), k = args[0].shape, args[1].shape[0]
        return n * k * (2 * c + 3)
    if name.startswith("short_kv_attention"):  # the fused kernel: QK^T and PV; backward 5 such products
        q, k = args[1:3] if name.endswith("bwd") else args[:2]
        per = 2 * 2 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
        return per * (5 / 2 if name.endswith("bwd") else 1)
    return 0


class Recorder(TorchDispatchMode):
    """One row per kernel-launching ATen op: name, kind, part, launches, bytes read / written (with
    the storages, for the fusion estimate), FLOPs and whether they run in the low precision."""

    def __init__(self, parts):
        super().__init__()
        self.parts = parts
        self.ops, self.calls, self.syncs, self.storages = [], 0, 0, []
        self.backward_part = "loss"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls += 1
        namespace, name = func.namespace, func._overloadpacket.__name__
        self.syncs += name in SYNCS
        if namespace == "prim" or name in NO_KERNEL or func.is_view or _returns_views(func):
            return out
        node = torch._C._current_autograd_node()
        if node is not None:
            self.backward_part = node.metadata.get("part", self.backward_part)
            part = self.backward_part
        else:
            part = self.parts()
        schema = func._schema
        written = [
            a
            for arg, a in zip(schema.arguments, args)
            if arg.alias_info is not None and arg.alias_info.is_write and a is not None
        ]
        fresh = [
            t for r, t in zip(schema.returns, out if isinstance(out, (tuple, list)) else (out,)) if not r.alias_info
        ]
        reads = [(self.storage(t), nbytes(t)) for t in tensors_in([*args, *kwargs.values()])]
        writes = [(self.storage(t), nbytes(t)) for t in tensors_in([*written, *fresh])]
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        launches = multi_tensor_launches(lists) + name.startswith("_foreach_norm") if lists else 1
        kind = kind_of(name, args, out)
        low = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors_in(args))
        self.ops.append(
            {
                "name": name if namespace == "aten" else f"{namespace}::{name}",
                "kind": kind,
                "part": part,
                "backward": node is not None,
                "launches": launches,
                "reads": reads,
                "writes": writes,
                "flops": float(flops_of(func, name, args, kwargs, out)),
                "low_precision": low,
            }
        )
        return out

    def storage(self, t):
        """A key of t's storage, unique for the whole trace (the storage is kept, so its address is
        never reused by a later one)."""
        storage = t.untyped_storage()
        self.storages.append(storage)
        return storage._cdata


def _returns_views(func):
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


# ---------------------------------------------------------------------------------------------
# building the step on the meta device


def to_meta(obj, seen=None):
    """Swap every tensor a built step holds for a meta tensor of the same shape, strides and dtype,
    in place (the same Python objects, so the optimiser, the EMA and the model still share them)."""
    seen = {} if seen is None else seen  # id -> the object, kept alive so that no id is reused
    if isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            to_meta(v, seen)
        return
    if id(obj) in seen:
        return
    seen[id(obj)] = obj
    if isinstance(obj, torch.nn.Module):
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            obj.to(META)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
        seen.update((id(t), t) for t in (*obj.parameters(), *obj.buffers()))
    elif isinstance(obj, torch.Tensor):
        torch.utils.swap_tensors(obj, obj.detach().to(META).requires_grad_(obj.requires_grad))
    elif isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            to_meta([v for v in group.values() if isinstance(v, torch.Tensor)], seen)
        to_meta(list(obj.state.values()), seen)
    elif type(obj).__module__.startswith("encdiff.") and hasattr(obj, "__dict__"):
        to_meta(list(vars(obj).values()), seen)


def prime_optimizers(st):
    """Make each optimiser's state (moments, step counts) with one zero-gradient step, as the first
    update would: the trace records the second, the steady state."""
    for opt in st.optimizers():
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


@contextmanager
def meta_kernels():
    """The fused optimisers (the EMA is a fused SGD step) have no meta kernel: they only update their
    inputs in place, so an empty one is exact for shapes (registered for the trace only)."""
    lib = torch.library.Library("aten", "IMPL")
    for op in ("_fused_adamw_", "_fused_adam_", "_fused_sgd_"):
        for overload in (op, f"{op}.tensor_lr"):
            lib.impl(overload, lambda *args, **kwargs: None, "Meta", allow_override=True)
    try:
        yield
    finally:
        lib._destroy()


def trace_config(files=(), overrides=(), stage="encdiff", batch=128):
    """The config of a trace: the user's, compile and the CUDA graph off (the trace is of the ops
    a step issues), perf.precision 'auto' as on CUDA (bf16)."""
    cfg = build_config(list(files), [*overrides, (f"{stage}.batch_size", str(batch))])
    cfg.perf.compile, cfg.perf.cuda_graph = "off", False
    return cfg


def trace_step(cfg, stage):
    """Record the second update of `stage` under cfg (global batch = per-GPU batch, one GPU) -> Recorder."""
    if cfg.perf.precision == "auto":
        cfg.perf.precision = "bf16"  # as on CUDA
    d = dist.Dist(0, 0, 1, torch.device("cpu"))
    images = torch.zeros(getattr(cfg, stage).batch_size, 64, 64, 3, dtype=torch.uint8)  # (N, 64, 64, 3)
    with torch.random.fork_rng(devices=[]), meta_kernels():
        st = build_step(stage, cfg, d, images)
        prime_optimizers(st)
        to_meta(st)
        st.d = dist.Dist(0, 0, 1, META)
        st.order.device, st.order._epoch = META, None
        with autocast_on_meta():
            st.prepare(1, verbose=False)
            low = LOW_DTYPES.get(cfg.perf.precision)
            st.amp = Autocast("cuda", dtype=low, enabled=low is not None)
            with Parts(st) as parts, cuda_attention_rule(st.model), CudaRules(parts), Recorder(parts) as rec:
                st(1)
    return rec


# ---------------------------------------------------------------------------------------------
# how far the low-precision step is from the fp32 one


def numerics(cfg, batch=16, seed=0):
    """-> (relative distance of stage 2's bf16 gradient from its fp32 one under CUDA autocast's own
    policy: norms in fp32, every weight cast at its op; the same under this project's: norms in
    their input's precision, weights cast in one pass). One forward + backward of the config's
    model on real CPU tensors, the CUDA rules applied as in the trace."""
    from encdiff.low_precision import LowPrecisionWeights
    from encdiff.models.encdiff import EncDiff, build_diffusion, build_encoder, build_unet
    from encdiff.models.layers import GroupNorm, LayerNorm

    e = cfg.encdiff
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EncDiff(build_encoder(e), build_unet(e, cfg.vqvae.embed_dim), build_diffusion(e))
        with torch.no_grad():  # off the zero init, or the output layers block every gradient
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model = model.to(memory_format=torch.channels_last)
        x = (torch.rand(batch, 3, 64, 64) * 2 - 1).contiguous(memory_format=torch.channels_last)
        z0, noise = torch.randn(batch, cfg.vqvae.embed_dim, 16, 16), torch.randn(batch, cfg.vqvae.embed_dim, 16, 16)
        t = torch.randint(0, e.timesteps, (batch,))
    autocast_policy = copy.deepcopy(model)
    for m in autocast_policy.modules():  # torch's norms: autocast runs them in fp32
        m.__class__ = {GroupNorm: nn.GroupNorm, LayerNorm: nn.LayerNorm}.get(type(m), type(m))

    def gradient(m, call, low):
        m.zero_grad(set_to_none=True)
        with autocast_on_meta(), Autocast("cuda", dtype=torch.bfloat16, enabled=low), CudaRules(lambda: ""):
            call(x, z0, t, noise).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    fp32 = gradient(model, model, False)
    ours = gradient(model, LowPrecisionWeights(model, torch.bfloat16), True)
    theirs = gradient(autocast_policy, autocast_policy, True)
    return ((theirs - fp32).norm() / fp32.norm()).item(), ((ours - fp32).norm() / fp32.norm()).item()


# ---------------------------------------------------------------------------------------------
# the report


def fusion(ops):
    """-> (bytes the fusible ops move when fused into their neighbours, kernels launched then).
    A tensor costs nothing where its producer and its consumer are both fusible; a fusible op's
    output is written only if a non-fusible op reads it or nothing does (it is kept: state, grads)."""
    fusible = [op["kind"] in FUSIBLE for op in ops]
    producer, readers = {}, collections.defaultdict(list)
    for i, op in enumerate(ops):
        for key, _ in op["reads"]:
            if key in producer:
                readers[(key, producer[key])].append(i)
        for key, _ in op["writes"]:
            producer[key] = i
    group = list(range(len(ops)))  # union-find of the fusible ops a tensor joins

    def root(i):
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    moved, producer = 0, {}
    for i, op in enumerate(ops):
        if not fusible[i]:
            for key, _ in op["writes"]:
                producer[key] = i
            continue
        for key, b in op["reads"]:
            p = producer.get(key)
            if p is not None and fusible[p]:
                group[root(i)] = root(p)
            else:
                moved += b
        for key, b in op["writes"]:
            consumers = readers.get((key, i), [])
            if not consumers or not all(fusible[c] for c in consumers):
                moved += b
            producer[key] = i
    launches = sum(op["launches"] for i, op in enumerate(ops) if not fusible[i])
    return moved, launches + len({root(i) for i in range(len(ops)) if fusible[i]})


def op_bytes(op):
    return sum(b for _, b in op["reads"]) + sum(b for _, b in op["writes"])


def op_time(op, card):
    peak = card["bf16_flops"] if op["low_precision"] else card["tf32_flops"]
    return max(op["flops"] / peak, op_bytes(op) / card["bandwidth"])


def summarize(rec, card_name, batch, top=10):
    """The report of a recorded update on a card of CARDS: totals, time bounds, parts, kinds, top ops."""
    card, ops = CARDS[card_name], rec.ops
    moved, flops, launches = sum(map(op_bytes, ops)), sum(op["flops"] for op in ops), sum(op["launches"] for op in ops)
    fusible_bytes, fused_launches = fusion(ops)
    kept = [op for op in ops if op["kind"] not in FUSIBLE]
    compute = sum(op["flops"] / (card["bf16_flops"] if op["low_precision"] else card["tf32_flops"]) for op in ops)
    unfused = sum(op_time(op, card) for op in ops)
    fused = sum(op_time(op, card) for op in kept) + fusible_bytes / card["bandwidth"]
    bounds = {"compute": compute, "unfused": unfused, "fused": fused}
    for us in LAUNCH_US:
        bounds[f"unfused + {us} us/kernel"] = unfused + launches * us * 1e-6
    for us in LAUNCH_US:
        bounds[f"fused + {us} us/kernel"] = fused + fused_launches * us * 1e-6
    totals = {
        "kernel_ops": len(ops),
        "launches": launches,
        "casts": sum(op["kind"] == "cast" for op in ops),
        "aten_calls": rec.calls,
        "host_syncs": rec.syncs,
        "gb_unfused": moved / 1e9,
        "gb_fused": (fusible_bytes + sum(map(op_bytes, kept))) / 1e9,
        "launches_fused": fused_launches,
        "gflop": flops / 1e9,
        "gflop_per_image": flops / 1e9 / batch,
        "low_precision_bytes_share": sum(op_bytes(op) for op in ops if op["low_precision"]) / max(moved, 1),
    }
    return {
        "card": card_name,
        "batch": batch,
        "totals": totals,
        "bounds_ms": {k: v * 1e3 for k, v in bounds.items()},
        "img_s": {k: batch / v for k, v in bounds.items()},
        "parts": breakdown(ops, "part", card),
        "kinds": breakdown(ops, "kind", card),
        "top": top_ops(ops, card, top),
    }


def breakdown(ops, key, card):
    rows = collections.defaultdict(lambda: {"ops": 0, "launches": 0, "casts": 0, "gb": 0.0, "gflop": 0.0, "ms": 0.0})
    for op in ops:
        r = rows[op[key]]
        r["ops"] += 1
        r["launches"] += op["launches"]
        r["casts"] += op["kind"] == "cast"
        r["gb"] += op_bytes(op) / 1e9
        r["gflop"] += op["flops"] / 1e9
        r["ms"] += op_time(op, card) * 1e3
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms"]))


def top_ops(ops, card, n):
    rows = collections.defaultdict(lambda: {"count": 0, "ms": 0.0, "gb": 0.0})
    for op in ops:
        r = rows[(op["name"], op["part"])]
        r["count"] += 1
        r["ms"] += op_time(op, card) * 1e3
        r["gb"] += op_bytes(op) / 1e9
    ranked = sorted(rows.items(), key=lambda kv: -kv[1]["ms"])[:n]
    return [{"op": name, "part": part, **r} for (name, part), r in ranked]


def format_report(report, stage, precision):
    t, b = report["totals"], report["bounds_ms"]
    lines = [
        f"{stage}, per-GPU batch {report['batch']}, {precision}, predicted for one {report['card']} "
        f"(the CUDA rules on meta tensors; a prediction, not a measurement)",
        f"kernel-launching ops {t['kernel_ops']:,} ({t['launches']:,} launches; {t['casts']:,} of the ops casts), "
        f"ATen calls with views {t['aten_calls']:,}, host syncs {t['host_syncs']}",
        f"{t['gflop_per_image']:.2f} GFLOP per image; {t['gb_unfused']:.2f} GB read + written unfused, "
        f"{t['gb_fused']:.2f} GB fused ({t['launches_fused']:,} launches); "
        f"{100 * t['low_precision_bytes_share']:.0f}% of the bytes in ops with low-precision inputs",
        "",
        "| bound | ms per step | img/s |",
        "|---|---:|---:|",
        *[f"| {name} | {ms:.2f} | {report['img_s'][name]:,.0f} |" for name, ms in b.items()],
    ]
    for title, rows in (("part", report["parts"]), ("kind", report["kinds"])):
        lines += [
            "",
            f"| {title} | ops | launches | casts | GB | GFLOP | unfused ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {r['ops']:,} | {r['launches']:,} | {r['casts']:,} | {r['gb']:.2f} | {r['gflop']:.1f} "
            f"| {r['ms']:.2f} |"
            for name, r in rows.items()
        ]
    lines += ["", "| costliest ops | part | count | GB | unfused ms |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['part']} | {r['count']} | {r['gb']:.2f} | {r['ms']:.2f} |" for r in report["top"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    files, overrides, rest = split_args(argv)
    p = ArgumentParser(prog="step_trace.py", description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="encdiff", choices=("encdiff", "vqvae"))
    p.add_argument("--batch", type=int, help="per-GPU batch (default: 128 for encdiff, 256 for vqvae)")
    p.add_argument("--card", default="H200", choices=sorted(CARDS))
    p.add_argument("--top", type=int, default=10, help="how many of the costliest ops to list")
    p.add_argument("--json", metavar="PATH", help="write the report to this file")
    p.add_argument(
        "--numerics",
        type=int,
        metavar="BATCH",
        help="also: how far stage 2's bf16 gradient is from fp32's, autocast's policy against this project's "
        "(real CPU tensors at this batch)",
    )
    args = p.parse_args(rest)
    if args.batch is None:
        args.batch = 128 if args.stage == "encdiff" else 256
    if args.batch < 1 or args.top < 0 or (args.numerics is not None and args.numerics < 1):
        raise UserError("--batch and --numerics must be >= 1, --top >= 0")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: the folder does not exist")
    return args, files, overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, files, overrides = parse_args(argv)
    cfg = trace_config(files, overrides, args.stage, args.batch)
    rec = trace_step(cfg, args.stage)
    report = summarize(rec, args.card, args.batch, args.top)
    print(format_report(report, args.stage, cfg.perf.precision))
    if args.numerics:
        autocast_error, ours = numerics(cfg, args.numerics)
        report["numerics"] = {"batch": args.numerics, "autocast_policy": autocast_error, "this_project": ours}
        print(
            f"\nbf16 gradient vs fp32 (stage 2, batch {args.numerics}, relative L2): CUDA autocast's policy "
            f"{autocast_error:.3e}, this project's {ours:.3e}"
        )
    if args.json:
        meta = {
            **versions(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["step_trace.py", *argv]),
            "stage": args.stage,
            "precision": cfg.perf.precision,
            "perf": vars(cfg.perf),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, **report}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
