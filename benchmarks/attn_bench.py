"""Benchmark the attention backends at every attention site of the default EncDiff U-Net.

    python benchmarks/attn_bench.py                         # all sites, batch 128 and 1024, bf16
    python benchmarks/attn_bench.py --quick                 # fewer repetitions
    python benchmarks/attn_bench.py --shape 1024,256,20,8,8 --dtype fp16 --json out.json

A shape is B,Lq,Lk,heads,d. Every backend's output and gradients are first checked against `math`;
then forward and forward+backward are timed with CUDA events (L2 flushed before each run, median
of many runs). Reported: ms, GB/s of the minimum bytes (inputs read once, outputs written once),
that as a fraction of the device's copy bandwidth measured in this run, TFLOP/s (model FLOPs: two
matmuls forward, four backward), and the speedup over sdpa and xformers; also each call's time as a
replay of a CUDA graph, the GPU's time without any host overhead. A Markdown table goes to
stdout, everything to --json PATH. Without CUDA it says so, runs the check through the Triton
interpreter at small shapes, and exits 0 (1 if a check fails).
"""

import argparse
import json
import os
import statistics
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton when kernels imports it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from encdiff.runtime import versions  # noqa: E402
from encdiff.errors import UserError, exit_on_user_error  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}  # max |x - ref| / max |ref|
# Default U-Net: 64/128/256/256 channels at 16/8/4/2 px, 8 heads, 20 concept tokens.
SITES = [
    (f"{kind} {px}x{px}", px * px, px * px if kind == "self" else 20, 8, ch // 8)
    for px, ch in ((16, 64), (8, 128), (4, 256), (2, 256))
    for kind in ("cross", "self")
]
BATCHES = (128, 1024)
CPU_BATCH, CPU_HEADS = 1, 2  # the interpreter is slow: without CUDA every site is checked this small


def parse_shape(text):
    try:
        B, Lq, Lk, heads, d = (int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--shape {text!r}: expected five integers B,Lq,Lk,heads,d")
    if min(B, Lq, Lk, heads, d) < 1:
        raise UserError(f"--shape {text!r}: every value must be >= 1")
    return (f"custom {text}", Lq, Lk, heads, d), B


def make_inputs(B, Lq, Lk, heads, d, dtype, device, layout):
    """q, k, v as the model produces them: with layout 'fused', slices of one qkv projection
    (self-attention, Lq == Lk) or q plus slices of one kv projection (cross-attention)."""
    C = heads * d
    new = lambda *shape: torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    if layout == "separate":
        return new(B, Lq, C), new(B, Lk, C), new(B, Lk, C)
    if Lq == Lk:
        q, k, v = new(B, Lq, 3 * C).split(C, dim=-1)  # 3 x (B, L, C), row stride 3C
        return q, k, v
    k, v = new(B, Lk, 2 * C).split(C, dim=-1)  # 2 x (B, Lk, C), row stride 2C
    return new(B, Lq, C), k, v


def min_bytes(B, Lq, Lk, C, itemsize):
    """Bytes a perfect kernel moves: forward reads q, k, v and writes o; backward reads q, k, v, do
    and writes dq, dk, dv (the softmax is recomputed, nothing else is stored)."""
    fwd = (2 * B * Lq * C + 2 * B * Lk * C) * itemsize
    bwd = (3 * B * Lq * C + 4 * B * Lk * C) * itemsize
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}


def model_flops(B, Lq, Lk, C):
    fwd = 4 * B * Lq * Lk * C  # q k^T and p v, 2 FLOPs per multiply-add
    return {"fwd": fwd, "fwd+bwd": 3 * fwd}  # backward: dv, dp, dq, dk


def forward_and_grads(name, q, k, v, heads, do):
    o = kernels.attention(q, k, v, heads, backend=name)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def relative_error(outs, refs):
    return max(
        ((x.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)).item()
        for x, r in zip(outs, refs)
    )


def check_backends(site, B, dtype, device, layout):
    """Compare every runnable backend's output and gradients with `math`: {backend: relative error,
    or the first line of what it raised}."""
    _, Lq, Lk, heads, d = site
    q, k, v = make_inputs(B, Lq, Lk, heads, d, dtype, device, layout)
    do = torch.randn_like(q)
    refs = forward_and_grads("math", q, k, v, heads, do)
    runnable = [n for n, why in kernels.available_backends(q, k, v, heads).items() if why is None and n != "math"]
    errors = {}
    for name in runnable:
        try:
            errors[name] = relative_error(forward_and_grads(name, q, k, v, heads, do), refs)
        except RuntimeError as e:  # a library kernel refusing what its own checks let through
            errors[name] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return errors


# ----------------------------------------------------------------------------------------------
# CUDA timing


def cuda_time_ms(fn, warmup, reps, flush=None):
    """Median milliseconds of fn() over reps CUDA-event-timed runs after warm-up. Zeroing `flush`
    (larger than L2) before each run makes every run read from DRAM; the sleep after it lets the
    CPU queue the whole run first, so the time is the GPU's, without Python or launch overhead
    (which torch.compile and CUDA graphs remove in training)."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
            torch.cuda._sleep(1_000_000)  # ~0.5 ms of GPU idling while the CPU queues the run
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graph_time_ms(fn, reps):
    """Median milliseconds of one replay of fn() recorded in a CUDA graph: the GPU's time alone, with
    no Python or launch overhead at all (as in a captured training step). None when fn cannot be
    captured (the reason is returned instead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        return None, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    graph.replay()
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), None


def copy_bandwidth_gbs(reps):
    """Device-to-device copy of 1 GiB: bytes read plus bytes written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=reps)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def time_backends(site, B, dtype, layout, names, warmup, reps, flush):
    """One row per (backend, mode) with ms, GB/s and TFLOP/s."""
    _, Lq, Lk, heads, d = site
    q, k, v = make_inputs(B, Lq, Lk, heads, d, dtype, "cuda", layout)
    do = torch.randn_like(q)
    nbytes = min_bytes(B, Lq, Lk, heads * d, q.element_size())
    flops = model_flops(B, Lq, Lk, heads * d)
    rows = []
    for name in names:

        def fwd():
            with torch.no_grad():
                kernels.attention(q, k, v, heads, backend=name)

        timed = {"fwd": fwd, "fwd+bwd": lambda: forward_and_grads(name, q, k, v, heads, do)}
        for mode, fn in timed.items():
            ms = cuda_time_ms(fn, warmup, reps, flush)
            ms_graph, graph_error = graph_time_ms(fn, reps)
            rows.append(
                dict(
                    site=site[0],
                    batch=B,
                    Lq=Lq,
                    Lk=Lk,
                    heads=heads,
                    d=d,
                    backend=name,
                    mode=mode,
                    ms=ms,
                    gbs=nbytes[mode] / (ms * 1e-3) / 1e9,
                    tflops=flops[mode] / (ms * 1e-3) / 1e12,
                    ms_graph=ms_graph,
                    graph_error=graph_error,
                )
            )
    return rows


def add_comparisons(rows, copy_gbs):
    """Fraction of copy bandwidth, speedup over sdpa and xformers, and whether auto picked it."""
    by_key = {(r["site"], r["batch"], r["mode"], r["backend"]): r for r in rows}
    for r in rows:
        r["copy_fraction"] = r["gbs"] / copy_gbs
        for base in ("sdpa", "xformers"):
            other = by_key.get((r["site"], r["batch"], r["mode"], base))
            r[f"vs_{base}"] = other["ms"] / r["ms"] if other else None


def markdown_table(rows):
    head = (
        "| site | batch | mode | backend | auto | ms | ms in a CUDA graph | GB/s | % copy BW | TFLOP/s | x sdpa | "
        "x xformers |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in rows:
        graphed = "-" if r["ms_graph"] is None else f"{r['ms_graph']:.4f}"
        lines.append(
            f"| {r['site']} | {r['batch']} | {r['mode']} | {r['backend']} | {'*' if r['auto'] else ''} | "
            f"{r['ms']:.4f} | {graphed} | {r['gbs']:.0f} | {100 * r['copy_fraction']:.1f} | {r['tflops']:.2f} | "
            f"{fmt(r['vs_sdpa'])} | {fmt(r['vs_xformers'])} |"
        )
    return "\n".join(lines)


def summarize(rows, dtype):
    """Fastest backend per site and mode, auto's pick against sdpa, and the issue's targets."""
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["site"], r["batch"], r["mode"]), []).append(r)
    for (site, batch, mode), group in groups.items():
        best = min(group, key=lambda r: r["ms"])
        auto = next((r for r in group if r["auto"]), None)
        sdpa = next((r for r in group if r["backend"] == "sdpa"), None)
        if auto is None:
            verdict, auto_name = "  <-- AUTO'S BACKEND FAILED ITS CHECK", "-"
        else:
            slower = sdpa is not None and auto["ms"] > 1.02 * sdpa["ms"]  # 2%: room for run-to-run noise
            verdict, auto_name = ("  <-- AUTO SLOWER THAN SDPA" if slower else ""), auto["backend"]
        lines.append(f"{site:>14} B={batch:<5} {mode:8} fastest {best['backend']:15} auto {auto_name:15}{verdict}")
    target = [r for r in rows if r["site"] == "cross 16x16" and r["batch"] == 1024 and r["mode"] == "fwd+bwd"]
    triton = next((r for r in target if r["backend"] == "triton"), None)
    others = [r["ms"] for r in target if r["backend"] in ("sdpa", "xformers")]
    if triton and others and dtype == torch.bfloat16:
        speedup = min(others) / triton["ms"]
        lines.append(
            f"target cross 16x16 B=1024 bf16 fwd+bwd: {speedup:.2f}x the best of sdpa/xformers (want >= 2), "
            f"{100 * triton['copy_fraction']:.0f}% of copy bandwidth (want >= 70)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def run_checks(cases, dtype, device, layout):
    """Print one line per (site, batch, backend); return the results and whether all passed. A
    library backend that raises is reported and left out of the timing; it fails the run only
    when it is the fused kernel."""
    results, ok = [], True
    for site, B in cases:
        for name, err in check_backends(site, B, dtype, device, layout).items():
            if isinstance(err, str):
                passed, verdict = False, f"raised: {err}"
                ok &= name != "triton"
            else:
                passed = err <= TOLERANCE[dtype]
                verdict = f"rel. error {err:.1e} {'ok' if passed else 'FAIL'}"
                ok &= passed
            results.append(dict(site=site[0], batch=B, backend=name, error=err, ok=passed))
            print(f"check {site[0]:>14} B={B:<5} {name:15} {verdict}")
    return results, ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer warm-up runs and repetitions")
    ap.add_argument(
        "--shape", action="append", default=[], help="B,Lq,Lk,heads,d (repeatable); replaces the U-Net sites"
    )
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of q, k, v (default bf16)")
    ap.add_argument(
        "--layout",
        choices=("fused", "separate"),
        default="fused",
        help="fused: q, k, v are strided slices of fused projections; separate: contiguous tensors",
    )
    ap.add_argument("--json", metavar="PATH", help="write every number to this file")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    cases = [parse_shape(s) for s in args.shape] or [(site, B) for site in SITES for B in BATCHES]
    report = {"device": None, "dtype": args.dtype, "layout": args.layout, **versions()}

    if not torch.cuda.is_available():
        print(
            "CUDA is not available: no timing. Checking every runnable backend against math through the "
            f"Triton interpreter (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}) at each site's lengths "
            f"and head dim, batch {CPU_BATCH}, {CPU_HEADS} heads."
        )
        report["device"] = "cpu"
        small = {((name, Lq, Lk, CPU_HEADS, d), CPU_BATCH): None for (name, Lq, Lk, _, d), _ in cases}
        report["checks"], ok = run_checks(list(small), dtype, "cpu", args.layout)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print("all checks passed" if ok else "SOME CHECKS FAILED")
        return 0 if ok else 1

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs compare true fp32 everywhere
    report["device"] = torch.cuda.get_device_name()
    warmup, reps = (3, 20) if args.quick else (10, 100)
    report["checks"], ok = run_checks(cases, dtype, "cuda", args.layout)
    report["copy_gbs"] = copy_gbs = copy_bandwidth_gbs(reps)
    print(
        f"{report['device']}: copy bandwidth {copy_gbs:.0f} GB/s; torch {report['torch']}, "
        f"triton {report['triton']}, xformers {report['xformers']}, commit {report['commit']}, "
        f"{args.dtype}, layout {args.layout}"
    )
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # larger than any L2 so far
    failed = {(c["site"], c["batch"], c["backend"]) for c in report["checks"] if not c["ok"]}
    rows = []
    for site, B in cases:
        q, k, v = make_inputs(B, *site[1:], dtype, "cuda", args.layout)
        runnable = [
            n
            for n, why in kernels.available_backends(q, k, v, site[3]).items()
            if why is None and (site[0], B, n) not in failed
        ]
        auto = kernels.choose_backend(q, k, v, site[3])
        del q, k, v
        site_rows = time_backends(site, B, dtype, args.layout, runnable, warmup, reps, flush)
        for r in site_rows:
            r["auto"] = r["backend"] == auto
        rows += site_rows
        torch.cuda.empty_cache()
    add_comparisons(rows, copy_gbs)
    report["rows"] = rows
    print(markdown_table(rows))
    print(summarize(rows, dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
