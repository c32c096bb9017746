"""Which factor does each code carry? The diagnostic behind the CPU preset's choices (RESULTS.md);
the measure is encdiff.metrics.code_factor_nmi, this is its command line.

    python benchmarks/code_factor_nmi.py runs/cpu              # latest stage-2 checkpoint of a run
    python benchmarks/code_factor_nmi.py CKPT --json nmi.json

For every code (the encoder's scalar i) and factor j: I(code_i binned; factor_j) / H(factor_j),
over the whole factor grid, codes in 20 equal-width bins. 1 means the code determines the factor,
0 that it says nothing about it. Printed: one row per code (best first), then each factor's best
code. A factor whose best value stays low is not encoded at all (the question the metrics cannot
answer: FactorVAE and DCI say how disentangled, not what is missing).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encdiff.errors import UserError, exit_on_user_error  # noqa: E402
from encdiff.metrics import code_factor_nmi  # noqa: E402


def format_table(nmi, factor_names, code_std):
    lines = [f"{'code':>4} {'std':>6}  " + " ".join(f"{n[:10]:>10}" for n in factor_names) + "  best"]
    for i in np.argsort(-nmi.max(1)):  # the most informative codes first
        lines.append(
            f"{i:>4} {code_std[i]:6.2f}  "
            + " ".join(f"{v:10.2f}" for v in nmi[i])
            + f"  {factor_names[int(nmi[i].argmax())]}"
        )
    lines.append(f"{'best':>11}  " + " ".join(f"{v:10.2f}" for v in nmi.max(0)))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a stage-2 checkpoint or a run directory")
    p.add_argument("--bins", type=int, default=20, help="equal-width bins per code (default 20)")
    p.add_argument("--batch", type=int, default=256, help="images per forward of the encoder (default 256)")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args(argv)
    if args.bins < 2 or args.batch < 1:
        raise UserError(f"--bins {args.bins} must be >= 2 and --batch {args.batch} >= 1")

    from encdiff.ckpt_contents import load_trained  # torch only when run
    from encdiff.evaluation import encode_dataset, open_eval_dataset

    trained = load_trained(args.checkpoint)
    ds = open_eval_dataset(trained)
    if not getattr(ds, "factor_sizes", None):
        raise UserError(f"{ds.name}: no factor grid, so there is nothing to compare the codes with")
    codes, _ = encode_dataset(trained.encoder, ds.images, args.batch, trained.device)
    factors = np.stack(np.unravel_index(np.arange(len(ds)), ds.factor_sizes), 1)  # (N, F): row-major grid
    nmi = code_factor_nmi(codes, factors, ds.factor_sizes, args.bins)
    names = list(ds.factor_names)
    print(format_table(nmi, names, codes.std(0)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "factors": names,
                    "nmi": nmi.round(4).tolist(),
                    "best": dict(zip(names, nmi.max(0).round(4).tolist())),
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
