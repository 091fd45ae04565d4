"""Recipe ablations of the Fashion-MNIST CPU config: one training run per variant, one table.

Each variant is a label and dotted overrides, applied after the shared budget
overrides (e.g. a short screening budget). Reports kNN (full test split, full
training split as memory), linear top-1 when the probe is on, the monitors over
the last epoch (proxy accuracy on real negatives, q.k, hardest negative, share
of same-class entries in the hard pool, the loss and its change over the last
epoch), the kNN monitor per epoch, and wall seconds (training + evaluation, on
whatever machine state the run met).

    python benchmarks/studies/fashion_mnist_ablations.py --budget train.epochs=3 eval.linear_probe=false \\
        --variant baseline "" --variant crop0.5 "data.crop_scale=[0.5,1.0]"

Variants can train in separate invocations (one per core, ``--no-write``) and be gathered into one table
by a last invocation with ``--gather-only``, which takes each variant's finished run from its folder when
the run's resolved config is the same and trains nothing: a variant without one stops the gather with its
name (``--reuse`` trains those instead). The variants' overrides should pin every value they were trained
with that the config might change later; otherwise the gather names them.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, fashion_mnist

from common import append_results, markdown_table  # noqa: E402
from fashion_mnist import CONFIG, monitors_text, reusable, train_run  # noqa: E402

from mochi_retrieval.config import load_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", nargs="*", default=[], help="overrides shared by every variant")
    p.add_argument("--variant", nargs=2, action="append", metavar=("LABEL", "OVERRIDES"), required=True,
                   help="a label and its overrides (one shell word, space-separated; '' = the config as is)")
    p.add_argument("--out", default="runs/ablations_fashion_mnist")
    p.add_argument("--title", default="fashion_mnist: recipe ablations")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--reuse", action="store_true",
                   help="take a variant's finished run from its folder when its resolved config is the same")
    p.add_argument("--gather-only", action="store_true",
                   help="--reuse, and train nothing: stop, naming them, when variants have no matching run")
    args = p.parse_args()
    args.reuse = args.reuse or args.gather_only
    for _, extra in args.variant:  # fail on a bad key before hours of training
        load_config(CONFIG, [*args.budget, *shlex.split(extra)])
    if args.gather_only:
        missing = [label for label, extra in args.variant
                   if reusable([*args.budget, *shlex.split(extra)], Path(args.out) / label) is None]
        if missing:
            raise SystemExit(f"--gather-only: no finished run with the same config for {', '.join(missing)} "
                             f"under {args.out}")
    rows = []
    for label, extra in args.variant:
        overrides, out = [*args.budget, *shlex.split(extra)], Path(args.out) / label
        r = (reusable(overrides, out) if args.reuse else None) or train_run(overrides, out)
        linear = r.get("linear_top1")
        rows.append([label, f"`{extra}`" if extra else "(config)", f"{r['knn_top1']:.4f}",
                     "-" if linear is None else f"{linear:.4f}", monitors_text(r["monitors"]),
                     " ".join(f"{v:.3f}" for v in r["monitors"].get("knn_monitor", [])), f"{r['wall_s']:.0f}"])
        print(markdown_table(["variant", "overrides", "kNN", "linear", "monitors", "kNN monitor", "wall s"],
                             [rows[-1]]), flush=True)
    table = markdown_table(["variant", "overrides", "kNN top-1", "linear top-1", "monitors over the last epoch",
                            "kNN monitor per epoch (10k train)", "wall s"], rows)
    print(table)
    if not args.no_write:
        budget = " ".join(args.budget) or "(the config's budget)"
        append_results(args.title, f"shared overrides: `{budget}`; one seed each (seed {load_config(CONFIG).seed} "
                                   f"unless overridden). Wall s: training + evaluation on this shared machine, "
                                   f"not an idle-machine number.\n\n{table}")


if __name__ == "__main__":
    main()
