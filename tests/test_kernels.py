"""kernels/: the fused Triton attention (through the interpreter on the CPU, natively on CUDA),
the backend dispatch, and the benchmark's CPU path."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import kernels
from encdiff.errors import UserError
from kernels import BackendUnavailable, cross_attention
from kernels.dispatch import AUTO_RULE, BACKENDS, auto_candidates
from kernels.reference import reference_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |x - ref| / max |ref| against float64; low precision allows for p and ds rounded to 16 bits
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def fused_inputs(B, Lq, Lk, heads, d, dtype, device=DEVICE, seed=0):
    """q, k, v as slices of fused projections: q the middle third of a (B, Lq, 3C) qkv output,
    k and v the halves of a (B, Lk, 2C) kv output. Returns the two parents and the three views."""
    g = torch.Generator().manual_seed(seed)
    C = heads * d
    qkv = torch.randn(B, Lq, 3 * C, generator=g).to(device, dtype)
    kv = torch.randn(B, Lk, 2 * C, generator=g).to(device, dtype)
    return qkv, kv, qkv[..., C : 2 * C], kv[..., :C], kv[..., C:]


def float64_reference(q, k, v, heads, do):
    """Output and gradients of the reference in float64."""
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o = reference_attention(q64, k64, v64, heads)
    o.backward(do.double())
    return o, q64.grad, k64.grad, v64.grad


def assert_close(name, x, ref, dtype):
    assert torch.isfinite(x).all(), f"{name}: non-finite values (an element the kernel never wrote?)"
    err = ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-3)).item()
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def poisoned(like):
    return torch.full(like.shape, float("nan"), dtype=like.dtype, device=like.device)


def check_launchers(B, Lq, Lk, heads, d, dtype, seed):
    """Run the forward and backward launchers into NaN-filled outputs and compare with float64."""
    _, _, q, k, v = fused_inputs(B, Lq, Lk, heads, d, dtype, seed=seed)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    o = cross_attention.attention_forward(q, k, v, heads, out=poisoned(q))
    dq, dk, dv = cross_attention.attention_backward(do, q, k, v, heads, dq=poisoned(q), dk=poisoned(k), dv=poisoned(v))
    for name, x, ref in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), float64_reference(q, k, v, heads, do)):
        assert_close(name, x, ref, dtype)


# Every query length with every key length; the head dims rotate so each appears three times.
LQ, LK, HEAD_DIMS = (1, 37, 257), (1, 5, 20, 64), (8, 16, 32, 64)
FP32_CASES = [(Lq, Lk, HEAD_DIMS[(i + j) % 4]) for i, Lq in enumerate(LQ) for j, Lk in enumerate(LK)]


@pytest.mark.parametrize("Lq,Lk,d", FP32_CASES)
def test_triton_fp32_matches_float64(Lq, Lk, d):
    check_launchers(2, Lq, Lk, 2, d, torch.float32, seed=Lq * 1000 + Lk * 10 + d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Lq,Lk,d", [(37, 20, 8), (257, 5, 64), (1, 64, 16), (37, 1, 32)])
def test_triton_half_precision_matches_float64(dtype, Lq, Lk, d):
    check_launchers(2, Lq, Lk, 2, d, dtype, seed=Lq + Lk + d)


def test_triton_autograd_through_fused_projections():
    """The public path: gradients reach the fused qkv and kv tensors through the slices."""
    qkv, kv, *_ = fused_inputs(2, 37, 20, 2, 16, torch.float32, seed=7)
    qkv.requires_grad_()
    kv.requires_grad_()
    C = 32
    o = kernels.attention(qkv[..., C : 2 * C], kv[..., :C], kv[..., C:], 2, backend="triton")
    do = torch.randn_like(o)
    o.backward(do)
    ref_o, dq, dk, dv = float64_reference(qkv[..., C : 2 * C], kv[..., :C], kv[..., C:], 2, do)
    assert_close("o", o, ref_o, torch.float32)
    assert_close("d qkv", qkv.grad, torch.cat([torch.zeros_like(dq), dq, torch.zeros_like(dq)], -1), torch.float32)
    assert_close("d kv", kv.grad, torch.cat([dk, dv], -1), torch.float32)


def test_triton_any_batch_and_row_strides():
    """q batch-minor (a transposed (Lq, B, C) tensor), k and v broadcast over the batch (stride 0)."""
    g = torch.Generator().manual_seed(3)
    B, Lq, Lk, heads, d = 3, 37, 5, 2, 8
    q = torch.randn(Lq, B, heads * d, generator=g).to(DEVICE).transpose(0, 1)  # (B, Lq, C), strides (C, B*C, 1)
    k = torch.randn(1, Lk, heads * d, generator=g).to(DEVICE).expand(B, -1, -1)  # (B, Lk, C), batch stride 0
    v = torch.randn(1, Lk, heads * d, generator=g).to(DEVICE).expand(B, -1, -1)  # (B, Lk, C), batch stride 0
    do = torch.randn(B, Lq, heads * d, generator=g).to(DEVICE)
    o = cross_attention.attention_forward(q, k, v, heads, out=poisoned(q))
    dq, dk, dv = cross_attention.attention_backward(do, q, k, v, heads)
    for name, x, ref in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), float64_reference(q, k, v, heads, do)):
        assert_close(name, x, ref, torch.float32)


def test_triton_backward_is_deterministic_and_takes_stride0_grads():
    _, _, q, k, v = fused_inputs(2, 257, 20, 2, 8, torch.float32, seed=11)
    q, k, v = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = []
    for _ in range(2):
        o = kernels.attention(q, k, v, 2, backend="triton")
        grads.append(torch.autograd.grad(o.sum(), (q, k, v)))  # sum(): a stride-0 output gradient
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    ref = float64_reference(q, k, v, 2, torch.ones_like(q))
    for name, x, r in zip(("dq", "dk", "dv"), grads[0], ref[1:]):
        assert_close(name, x, r, torch.float32)


def test_triton_empty_query_set():
    _, _, q, k, v = fused_inputs(2, 0, 5, 2, 8, torch.float32)
    assert cross_attention.attention_forward(q, k, v, 2).shape == (2, 0, 16)
    dq, dk, dv = cross_attention.attention_backward(torch.zeros_like(q), q, k, v, 2, dk=poisoned(k), dv=poisoned(v))
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


# ----------------------------------------------------------------------------------------------
# dispatch


def test_available_backends_say_why():
    _, _, q, k, v = fused_inputs(1, 16, 20, 2, 8, torch.float32)
    why = kernels.available_backends(q, k, v, 2)
    assert set(why) == set(BACKENDS)
    assert why["sdpa"] is None and why["sdpa_math"] is None and why["math"] is None
    if DEVICE == "cpu":
        assert why["triton"] is None  # the interpreter, which conftest switched on
        assert "CUDA" in why["sdpa_flash"] and "CUDA" in why["sdpa_efficient"]
        assert why["xformers"] is not None
    _, _, q, k, v = fused_inputs(1, 16, 65, 2, 8, torch.float32)
    assert "65 keys" in kernels.available_backends(q, k, v, 2)["triton"]
    _, _, q, k, v = fused_inputs(1, 16, 20, 2, 8, torch.float32)
    q = torch.randn(1, 16, 32, device=DEVICE)[..., ::2]  # (1, 16, 16) with last-dimension stride 2
    assert "stride 2" in kernels.available_backends(q, k, v, 2)["triton"]


def test_auto_rule():
    """As measured on an H200: the fused kernel for short keys and long query sets on CUDA (the
    16x16 cross-attention), sdpa elsewhere; the CPU never gets the interpreter."""
    assert auto_candidates("cuda", 20, 256)[0] == "triton"
    assert auto_candidates("cuda", 64, 1024)[0] == "triton"
    assert auto_candidates("cuda", 20, 64)[0] == "sdpa" and "triton" not in auto_candidates("cuda", 20, 64)
    assert "triton" not in auto_candidates("cuda", 65, 256) and auto_candidates("cuda", 256, 256)[0] == "sdpa"
    assert auto_candidates("cpu", 20, 256)[0] == "sdpa" and "triton" not in auto_candidates("cpu", 20, 256)
    assert all(name in BACKENDS for *_, names in AUTO_RULE for name in names)
    if DEVICE == "cpu":
        for Lk in (20, 256):
            _, _, q, k, v = fused_inputs(1, 16, Lk, 2, 8, torch.float32)
            assert kernels.choose_backend(q, k, v, 2) == "sdpa"


@pytest.mark.parametrize("Lq,Lk,heads,d", [(37, 20, 2, 16), (64, 64, 4, 8)], ids=["cross", "self"])
def test_every_runnable_backend_matches_math(Lq, Lk, heads, d):
    _, _, q, k, v = fused_inputs(2, Lq, Lk, heads, d, torch.float32, seed=5)
    q, k, v = [t.clone().requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)
    ref = float64_reference(q, k, v, heads, do)
    runnable = [name for name, why in kernels.available_backends(q, k, v, heads).items() if why is None]
    assert "sdpa" in runnable and "math" in runnable
    for backend in runnable + ["auto"]:
        o = kernels.attention(q, k, v, heads, backend=backend)
        outs = (o, *torch.autograd.grad(o, (q, k, v), do))
        for name, x, r in zip(("o", "dq", "dk", "dv"), outs, ref):
            assert_close(f"{backend} {name}", x, r, torch.float32)


def test_forced_backend_that_cannot_run_raises_its_reason():
    _, _, q, k, v = fused_inputs(1, 4, 65, 2, 8, torch.float32)
    with pytest.raises(BackendUnavailable, match="'triton' cannot run: 65 keys"):
        kernels.attention(q, k, v, 2, backend="triton")
    with pytest.raises(BackendUnavailable, match="triton attention cannot run: 65 keys"):
        cross_attention.attention_forward(q, k, v, 2)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        kernels.attention(q, k, v, 2, backend="flash")
    if DEVICE == "cpu":
        with pytest.raises(BackendUnavailable, match="'sdpa_flash' cannot run: needs CUDA"):
            kernels.attention(q, k, v, 2, backend="sdpa_flash")


@pytest.mark.parametrize(
    "shapes,heads,match",
    [
        (((2, 4, 16), (2, 5, 16), (2, 5, 8)), 2, "expects q"),
        (((2, 4, 16), (3, 5, 16), (3, 5, 16)), 2, "expects q"),
        (((4, 16), (5, 16), (5, 16)), 2, "expects q"),
        (((2, 4, 16), (2, 0, 16), (2, 0, 16)), 2, "at least one key"),
        (((2, 4, 16), (2, 5, 16), (2, 5, 16)), 3, "heads=3"),
    ],
)
def test_bad_inputs_raise_value_error(shapes, heads, match):
    q, k, v = [torch.randn(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        kernels.attention(q, k, v, heads)


def test_mixed_dtypes_raise_value_error():
    with pytest.raises(ValueError, match="dtype"):
        kernels.attention(torch.randn(2, 4, 16), torch.randn(2, 5, 16).half(), torch.randn(2, 5, 16), 2)


def test_bad_output_buffer_raises_value_error():
    _, _, q, k, v = fused_inputs(1, 4, 5, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        cross_attention.attention_forward(q, k, v, 2, out=torch.empty(1, 4, 8, device=DEVICE))


def test_custom_ops_live_in_the_kernels_namespace():
    assert callable(torch.ops.kernels.short_kv_attention_fwd) and callable(torch.ops.kernels.short_kv_attention_bwd)


def test_kernels_import_without_encdiff():
    """kernels/ is a standalone package: it imports, and runs attention, with encdiff unimportable;
    importing it (to read kernels.BACKENDS, as the config check does) loads no kernel. The backend
    is forced to triton because dispatch turns a failed import of cross_attention into "triton
    unavailable" rather than an error."""
    code = (
        "import sys; sys.modules['encdiff'] = None\n"  # None in sys.modules: any import of it fails
        "import torch, kernels\n"
        "assert 'triton' not in sys.modules and 'kernels.dispatch' not in sys.modules, 'kernels imports lazily'\n"
        "q = torch.randn(1, 4, 16)\n"
        "assert kernels.attention(q, q, q, 2, backend='triton').shape == q.shape"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------------------------
# torch.compile


def _sliced_attention(qkv, kv, backend):
    C = kv.shape[-1] // 2
    return kernels.attention(qkv[..., :C], kv[..., :C], kv[..., C:], 2, backend=backend)


@pytest.mark.parametrize(
    "backend,compiler",
    [
        ("auto", "aot_eager"),
        # inductor's C++ build of the forward and backward: 15-35 s on a cold cache (test_models' too)
        pytest.param("auto", "inductor", marks=pytest.mark.slow),
        ("triton", "aot_eager"),
    ],
)
def test_compiles_without_graph_breaks(backend, compiler):
    """fullgraph=True fails on any graph break: the Triton path must be an opaque op to dynamo, and
    AOTAutograd traces the forward and backward that inductor compiles."""
    torch._dynamo.reset()
    qkv = torch.randn(2, 37, 48, device=DEVICE, requires_grad=True)
    kv = torch.randn(2, 20, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(_sliced_attention, fullgraph=True, backend=compiler)
    o = compiled(qkv, kv, backend)
    got = (o, *torch.autograd.grad(o.square().sum(), (qkv, kv)))
    o = _sliced_attention(qkv, kv, "math")
    want = (o, *torch.autograd.grad(o.square().sum(), (qkv, kv)))
    for name, x, r in zip(("o", "d qkv", "d kv"), got, want):
        assert_close(name, x, r.double(), torch.float32)


# ----------------------------------------------------------------------------------------------
# benchmark


def _load_bench():
    spec = importlib.util.spec_from_file_location("attn_bench", os.path.join(ROOT, "benchmarks", "attn_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_shape_arithmetic():
    bench = _load_bench()
    site, B = bench.parse_shape("1024,256,20,8,8")
    assert B == 1024 and site[1:] == (256, 20, 8, 8)
    with pytest.raises(UserError, match="--shape"):
        bench.parse_shape("1024,256,20")
    # 16x16 cross-attention at batch 1: q and o are 256 x 64, k and v 20 x 64, two bytes each
    assert bench.min_bytes(1, 256, 20, 64, 2)["fwd"] == (2 * 256 * 64 + 2 * 20 * 64) * 2
    assert bench.model_flops(1, 256, 20, 64)["fwd"] == 2 * 2 * 256 * 20 * 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_bench_quick_without_cuda(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench = _load_bench()
    assert bench.main(["--quick", "--json", str(out)]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    checks = json.loads(out.read_text())["checks"]
    assert {c["site"] for c in checks} == {site[0] for site in bench.SITES}
    assert {"triton", "sdpa"} <= {c["backend"] for c in checks} and all(c["ok"] for c in checks)


# ----------------------------------------------------------------------------------------------
# CUDA only


U_NET_SITES = [
    (px * px, Lk, ch // 8) for px, ch in ((16, 64), (8, 128), (4, 256), (2, 256)) for Lk in (20, px * px) if Lk <= 64
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("Lq,Lk,d", U_NET_SITES + [(257, 1, 8), (37, 5, 64)])
def test_gpu_triton_matches_float64(dtype, Lq, Lk, d):
    check_launchers(32, Lq, Lk, 8, d, dtype, seed=Lq + Lk + d)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic():
    _, _, q, k, v = fused_inputs(256, 256, 20, 8, 8, torch.bfloat16, seed=1)
    do = torch.randn_like(q)
    first = cross_attention.attention_backward(do, q, k, v, 8)
    for _ in range(3):
        again = cross_attention.attention_backward(do, q, k, v, 8)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
def test_gpu_auto_picks_the_fused_kernel_for_short_keys():
    _, _, q, k, v = fused_inputs(4, 256, 20, 8, 8, torch.bfloat16)
    assert kernels.choose_backend(q, k, v, 8) == "triton"
    _, _, q, k, v = fused_inputs(4, 256, 256, 8, 8, torch.bfloat16)
    assert kernels.choose_backend(q, k, v, 8) == "sdpa"


@pytest.mark.gpu
def test_gpu_inductor_compiles_the_fused_kernel():
    torch._dynamo.reset()
    qkv = torch.randn(8, 256, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(8, 20, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    o = torch.compile(_sliced_attention, fullgraph=True)(qkv, kv, "triton")
    got = (o, *torch.autograd.grad(o.float().square().sum(), (qkv, kv)))
    o = _sliced_attention(qkv, kv, "math")
    want = (o, *torch.autograd.grad(o.float().square().sum(), (qkv, kv)))
    for name, x, r in zip(("o", "d qkv", "d kv"), got, want):
        assert_close(name, x, r.double(), torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# the nearest codebook entry (kernels/codebook_search.py)


def codes_inputs(N, K, C, seed, device=DEVICE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, generator=g).to(device, dtype), torch.randn(K, C, generator=g).to(device, dtype)


@pytest.mark.parametrize("N,K,C", [(1, 1, 3), (300, 100, 3), (129, 2048, 3), (70, 65, 16)])
def test_nearest_code_kernel_matches_the_reference(N, K, C):
    """Ragged N and K (not multiples of the blocks), the released 2,048 x 3 codebook, 16 channels."""
    z, e = codes_inputs(N, K, C, seed=N + K)
    got = kernels.nearest_code(z, e, backend="triton")
    assert got.dtype == torch.int64 and got.shape == (N,)
    assert torch.equal(got.cpu(), kernels.nearest_code_reference(z, e).cpu())


def test_nearest_code_breaks_ties_as_argmin():
    """Exactly equal distances (small integers, exact in fp32): the lowest index, also across blocks
    of the codebook (entries 3, 70 and 130 are one vector)."""
    e = torch.randint(-4, 5, (150, 3)).float()
    e[70] = e[3]
    e[130] = e[3]
    z = torch.cat([e[3:4], e[3:4] + 0.5, torch.randint(-4, 5, (64, 3)).float()]).to(DEVICE)
    e = e.to(DEVICE)
    got = kernels.nearest_code(z, e, backend="triton")
    assert got[0].item() == 3
    assert torch.equal(got.cpu(), kernels.nearest_code_reference(z, e).cpu())
    assert torch.equal(kernels.nearest_code_reference(z, e).cpu(), torch.cdist(z, e).argmin(1).cpu())


def test_nearest_code_reads_strided_and_half_precision_inputs():
    z, e = codes_inputs(90, 40, 6, seed=3)
    wide = torch.cat([z, z], 1)[:, ::2]  # (90, 6) with row stride 12, column stride 2
    assert torch.equal(kernels.nearest_code(wide, e, backend="triton"), kernels.nearest_code_reference(wide, e))
    z16, e16 = z.bfloat16(), e.bfloat16()
    assert torch.equal(kernels.nearest_code(z16, e16, backend="triton"), kernels.nearest_code_reference(z16, e16))


def test_nearest_code_dispatch_and_bad_inputs():
    z, e = codes_inputs(8, 5, 3, seed=0, device="cpu")
    assert torch.equal(kernels.nearest_code(z, e), kernels.nearest_code_reference(z, e))  # auto: the reference on CPU
    meta = kernels.nearest_code(z.to("meta"), e.to("meta"))  # auto: the kernel's shapes on meta tensors
    assert meta.shape == (8,) and meta.dtype == torch.int64
    for bad, match in (((z[0], e), "expects"), ((z, e[:, :2]), "expects"), ((z.long(), e), "bf16"),
                       ((z, e[:0]), "K >= 1")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            kernels.nearest_code(*bad)
    with pytest.raises(ValueError, match="backend"):
        kernels.nearest_code(z, e, backend="cuda")
    with pytest.raises(BackendUnavailable, match="channels"):
        kernels.nearest_code(torch.randn(4, 17), torch.randn(3, 17), backend="triton")


def test_nearest_code_compiles_as_one_opaque_op():
    torch._dynamo.reset()
    z, e = codes_inputs(50, 30, 3, seed=1)
    got = torch.compile(lambda a, b: kernels.nearest_code(a, b, backend="triton"), fullgraph=True, backend="aot_eager")(
        z, e
    )
    assert torch.equal(got.cpu(), kernels.nearest_code_reference(z, e).cpu())


@pytest.mark.gpu
def test_gpu_nearest_code_at_the_released_size():
    z, e = codes_inputs(256 * 256, 2048, 3, seed=5, device="cuda")
    got, want = kernels.nearest_code(z, e), kernels.nearest_code_reference(z, e)
    # TF32 or a fused multiply-add may round a near-tie the other way: nearly every index agrees,
    # and where one differs the two distances are equal to fp32 rounding
    differ = (got != want).nonzero().flatten()
    assert len(differ) <= 10
    d = lambda idx: (z[differ] - e[idx[differ]]).double().square().sum(1)  # noqa: E731
    torch.testing.assert_close(d(got), d(want), rtol=1e-5, atol=1e-6)
