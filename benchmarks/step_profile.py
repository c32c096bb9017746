"""What one training step spends its time on, from a torch.profiler trace (train_bench.py --profile).

Per profiled step: wall ms; kernels launched (on CUDA the device kernels, a CUDA graph's included;
on the CPU the outermost ATen ops, the calls Python makes into torch); busy ms, the union of those
intervals (on CUDA the GPU-busy time; on the CPU the time inside torch, the rest being Python);
host syncs (on CUDA the runtime's stream, device and event synchronisations, which every `.item()`,
`nonzero` or blocking copy makes; on the CPU the outermost `.item()` and `nonzero` calls, Python
reading a tensor); then the ten kernels costing the most time over all profiled steps.
"""

from torch.autograd import DeviceType

STEP_LABEL = "train_bench step "
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
CPU_SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")
NOT_KERNELS = ("Memcpy", "Memset", "cudaLaunch", "cuda")  # device-side copies, runtime calls


def union_ms(intervals):
    """Total length (ms) of the union of (start_ns, end_ns) intervals."""
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e6


def outermost_cpu_ops(events):
    """ATen ops on the CPU not inside another ATen op of their thread: the calls made from Python
    (or from the autograd engine)."""
    ops = sorted(
        (e for e in events if e.device_type() == DeviceType.CPU and e.name().startswith("aten::")),
        key=lambda e: (e.start_thread_id(), e.start_ns(), -e.duration_ns()),
    )
    outer, thread, end = [], None, -1
    for e in ops:
        if e.start_thread_id() != thread or e.start_ns() >= end:
            outer.append(e)
            thread, end = e.start_thread_id(), e.end_ns()
    return outer


def kernels_of(events, on_cuda):
    if on_cuda:
        return [e for e in events if e.device_type() == DeviceType.CUDA and not e.name().startswith(NOT_KERNELS)]
    return outermost_cpu_ops(events)


def syncs_of(events, on_cuda):
    if on_cuda:
        return [e for e in events if e.name() in CUDA_SYNCS]
    return [e for e in outermost_cpu_ops(events) if e.name() in CPU_SYNCS]


def summarize(events, on_cuda, top=10):
    """-> (per-step rows, the `top` kernels by total time) from the kineto events of a profile whose
    steps ran inside record_function(STEP_LABEL + str(i)) ranges, each followed by a device sync."""
    marks = sorted((e for e in events if e.name().startswith(STEP_LABEL)), key=lambda e: e.start_ns())
    kernels = kernels_of(events, on_cuda)
    syncs = syncs_of(events, on_cuda)
    rows = []
    for i, mark in enumerate(marks):
        lo = mark.start_ns()
        hi = marks[i + 1].start_ns() if i + 1 < len(marks) else max([mark.end_ns(), *(k.end_ns() for k in kernels)])
        mine = [k for k in kernels if lo <= k.start_ns() < hi]
        rows.append(
            {
                "step": int(mark.name()[len(STEP_LABEL) :]),
                "wall_ms": mark.duration_ns() / 1e6,
                "kernels": len(mine),
                "busy_ms": union_ms([(k.start_ns(), k.end_ns()) for k in mine]),
                "host_syncs": sum(mark.start_ns() <= s.start_ns() < mark.end_ns() for s in syncs),
            }
        )
    totals = {}
    for k in kernels:
        if marks and marks[0].start_ns() <= k.start_ns():
            name = k.name()
            ms, n = totals.get(name, (0.0, 0))
            totals[name] = (ms + k.duration_ns() / 1e6, n + 1)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return rows, [{"kernel": name, "total_ms": ms, "calls": n} for name, (ms, n) in ranked]


def format_summary(stage, rows, top, on_cuda):
    unit = "kernels" if on_cuda else "ATen calls"
    busy = "GPU-busy ms" if on_cuda else "busy ms"
    out = [
        f"### {stage}: per step",
        "",
        f"| step | wall ms | {unit} | {busy} | host syncs |",
        "|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r['step']} | {r['wall_ms']:.2f} | {r['kernels']} | {r['busy_ms']:.2f} | {r['host_syncs']} |" for r in rows
    ]
    out += [
        "",
        f"{stage}: the {len(top)} most expensive {unit} over these steps",
        "",
        "| kernel | total ms | calls |",
        "|---|---:|---:|",
    ]
    out += [f"| `{t['kernel'][:90]}` | {t['total_ms']:.2f} | {t['calls']} |" for t in top]
    return "\n".join(out) + "\n"
