"""Time the whole metric suite on a Shapes3D-sized grid, every metric at its defaults.

    python benchmarks/metrics_bench.py                 # compute_all, as evaluate.py runs it
    python benchmarks/metrics_bench.py --n-jobs 2      # cap DCI's tree-fitting processes
    python benchmarks/metrics_bench.py --sequential    # each metric alone, one after another

The codes are synthetic: a noisy copy of each of the 6 factors (scaled to [0, 1]) plus pure-noise
dimensions, 20 in all, for the 480,000 rows of the Shapes3D grid (10, 10, 10, 8, 4, 15).
Target: under 3 minutes in all on 16 cores.
"""

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from encdiff import metrics  # noqa: E402

SHAPES3D_SIZES = (10, 10, 10, 8, 4, 15)


def synthetic_codes(sizes, num_codes=20, noise=0.05, seed=0):
    """(prod(sizes), num_codes) float32: noisy identity codes for the factors, then noise dims."""
    rs = np.random.RandomState(seed)
    grid = np.indices(sizes).reshape(len(sizes), -1).T  # (N, K) factor values in row-major order
    codes = rs.normal(size=(math.prod(sizes), num_codes)).astype(np.float32)
    codes[:, : len(sizes)] = grid / (np.array(sizes) - 1) + noise * codes[:, : len(sizes)]
    return codes


def timed(fn, times, name):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name] = time.perf_counter() - start
        return out

    return wrapper


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-jobs", type=int, default=None, help="DCI processes (default: all cores)")
    parser.add_argument("--metrics", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--sequential", action="store_true", help="time each metric alone, in turn")
    parser.add_argument("--quick", action="store_true", help="small sample counts (smoke test)")
    args = parser.parse_args()

    codes = synthetic_codes(SHAPES3D_SIZES)
    names = metrics.metric_names(args.metrics)
    print(
        f"codes {codes.shape} {codes.dtype}, factor sizes {SHAPES3D_SIZES}, "
        f"{os.cpu_count()} cores, n_jobs={args.n_jobs}, "
        f"{'sequential' if args.sequential else 'compute_all'}"
    )

    times = {}
    start = time.perf_counter()
    if args.sequential:
        results = {}
        for name in names:
            kwargs = dict(metrics.QUICK[name]) if args.quick else {}
            if name == "dci":
                kwargs["n_jobs"] = args.n_jobs
            fn = timed(metrics.METRICS[name], times, name)
            results[name] = fn(codes, SHAPES3D_SIZES, **kwargs)
    else:
        # compute_all looks the functions up in METRICS, so timing wrappers there see every call.
        for name in names:
            metrics.METRICS[name] = timed(metrics.METRICS[name], times, name)
        results = metrics.compute_all(codes, SHAPES3D_SIZES, metrics=names, quick=args.quick, n_jobs=args.n_jobs)
    total = time.perf_counter() - start

    for name in names:
        scores = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results[name].items())
        print(f"{name:>24s} {times[name]:7.1f} s   {scores}")
    note = "" if args.sequential else "   (DCI overlaps the rest)"
    print(f"{'total':>24s} {total:7.1f} s{note}")


if __name__ == "__main__":
    main()
