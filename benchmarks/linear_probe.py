"""Our linear probe against scikit-learn's LogisticRegression on the same frozen Fashion-MNIST features.

Features need no trained model: a randomly initialised ResNet-18 (torchvision's width 64, grey
stem, 512-D, eval mode) or the raw standardised pixels (784-D). For each training-set size
(a seeded class-stratified subset, and the full 60,000) it reports test top-1 and wall time of:

- ours: :func:`mochi_retrieval.eval.linear_probe.fit_linear_probe` (full-batch L-BFGS, weight
  decay chosen on a held-out 20% of the train split, refit on all of it);
- scikit-learn, chosen the same way: the same standardisation, the same held-out split
  (:func:`holdout_split`), the same grid as ``C = 1 / (weight_decay * n)``, lbfgs warm-started
  from the strongest to the weakest penalty, refit on all of it;
- scikit-learn at C=1 on all of the train split (the setting quoted in issue 12);
- the former probe (mini-batch AdamW, 100 epochs, batch 1024, lr 1e-3, cosine), for reference.

At the full 60,000 the scikit-learn grid takes hours of one CPU thread. ``--run RUN_DIR
--weight-decay WD`` checks the solver there instead: the features of a trained run (its
``encoder.pt``, extracted as the training program's final evaluation does), one penalty (the
one the run's probe chose), ours and scikit-learn fitted on all 60,000: test top-1, the
objective each reaches, and their test predictions' agreement.

    python benchmarks/linear_probe.py [--features resnet18 pixels] [--sizes 1257 60000] [--no-write]
    python benchmarks/linear_probe.py --run runs/bench_fashion_mnist/mochi_seed0 --weight-decay 1e-4
"""
from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import append_results, markdown_table

from mochi_retrieval.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from mochi_retrieval.encoders import create_encoder
from mochi_retrieval.eval.linear_probe import DEFAULT_TOL, DEFAULT_WEIGHT_DECAYS, fit_linear_probe, holdout_split

logger = logging.getLogger("benchmarks.linear_probe")
FM_MEAN, FM_STD = 0.2860, 0.3530


def features(kind: str, root: str, cache: Path) -> dict[str, torch.Tensor]:
    """{"train": (60000, D), "train_y", "test": (10000, D), "test_y"} float32 / int64, cached in ``cache``."""
    path = cache / f"fmnist_{kind}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    out: dict[str, torch.Tensor] = {}
    torch.manual_seed(0)
    enc = create_encoder("resnet18", in_channels=1, small_images=False).eval() if kind == "resnet18" else None
    for split in ("train", "test"):
        x, y = load_fashion_mnist(root, split)
        x = (x.float() / 255 - FM_MEAN) / FM_STD
        if enc is None:
            out[split] = x.flatten(1)
        else:
            with torch.no_grad():
                out[split] = torch.cat([enc(b.unsqueeze(1)) for b in x.split(500)])
        out[f"{split}_y"] = y
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def subset(y: torch.Tensor, n: int, seed: int = 1) -> torch.Tensor:
    """A seeded class-stratified subset of about n indices (all of them when n >= len(y))."""
    if n >= len(y):
        return torch.arange(len(y))
    return holdout_split(y, n / len(y), seed)[1]


def sklearn_probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, grid, tol: float):
    """Held-out choice over ``grid`` (weight decays) by our rule, then a refit.

    Returns (test top-1, chosen weight decay, test top-1 at C=1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr)
    xtr, xte = scaler.transform(xtr), scaler.transform(xte)
    fit_idx, val_idx = (i.numpy() for i in holdout_split(torch.from_numpy(ytr), 0.2))
    clf = LogisticRegression(max_iter=5000, tol=tol, warm_start=True)
    scores = {}
    for wd in sorted(grid, reverse=True):
        clf.set_params(C=1 / (wd * len(fit_idx)))
        acc = clf.fit(xtr[fit_idx], ytr[fit_idx]).score(xtr[val_idx], ytr[val_idx])
        scores[wd] = (acc, -log_loss(ytr[val_idx], clf.predict_proba(xtr[val_idx]), labels=clf.classes_))
    best = max(scores, key=scores.get)  # our rule: best held-out top-1, ties to the lower held-out loss
    final = LogisticRegression(C=1 / (best * len(xtr)), max_iter=5000, tol=tol).fit(xtr, ytr)
    c1 = LogisticRegression(C=1.0, max_iter=5000, tol=tol).fit(xtr, ytr)
    return final.score(xte, yte), best, c1.score(xte, yte)


def former_probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor) -> float:
    """The mini-batch AdamW probe this library shipped before issue 12 (100 epochs), for reference."""
    mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp(min=1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=1e-4)
    total = 100 * math.ceil(len(xtr) / 1024)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for _ in range(100):
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 1024):
            j = order[i : i + 1024]
            loss = F.cross_entropy(layer(xtr[j]), ytr[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (layer(xte).argmax(1) == yte).float().mean().item()


def timed(fn, *args):
    """(fn(*args), CPU seconds of this process). On a shared machine the CPU time of a one-thread run is
    the wall time it would take on an idle core; wall time also counts the waits for other jobs."""
    start = time.process_time()
    out = fn(*args)
    return out, time.process_time() - start


def run_one(feats: dict[str, torch.Tensor], n: int, tol: float, skip_former: bool) -> list[object]:
    idx = subset(feats["train_y"], n)
    xtr, ytr, xte, yte = feats["train"][idx], feats["train_y"][idx], feats["test"], feats["test_y"]
    probe, t_ours = timed(fit_linear_probe, xtr, ytr, 10)
    ours = (probe.predict(xte) == yte).double().mean().item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's FutureWarnings about defaults
        (sk, sk_wd, sk_c1), t_sk = timed(sklearn_probe, xtr.double().numpy(), ytr.numpy(), xte.double().numpy(),
                                         yte.numpy(), DEFAULT_WEIGHT_DECAYS, tol)
    former = "-" if skip_former else f"{former_probe(xtr, ytr, xte, yte):.4f}"
    logger.info("n=%d ours %.4f (%.1f CPU s), sklearn %.4f (%.1f CPU s)", len(idx), ours, t_ours, sk, t_sk)
    return [len(idx), f"{ours:.4f}", f"{probe.weight_decay:.0e}", f"{t_ours:.1f}", f"{sk:.4f}", f"{sk_wd:.0e}",
            f"{t_sk:.1f}", f"{100 * (ours - sk):+.2f}", f"{sk_c1:.4f}", former]


def run_features(run: Path) -> dict[str, torch.Tensor]:
    """Features of a trained run folder, as its final evaluation extracts them (full splits)."""
    from mochi_retrieval.config import load_config
    from mochi_retrieval.eval.models import load_model
    from mochi_retrieval.training import ImageEvaluator

    model = load_model(run)
    cfg = load_config(run / "config.yaml")
    feats = ImageEvaluator(cfg, torch.device("cpu"))._features(model.encoder, None)
    return {"train": feats.train, "train_y": feats.train_labels, "test": feats.test, "test_y": feats.test_labels}


def _objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, wd: float) -> float:
    """Mean cross-entropy + wd/2 ||W||^2 in float64 (the probe's objective)."""
    logits = x @ w.T + b
    logits = logits - logits.max(1, keepdims=True)
    ce = np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y]
    return float(ce.mean() + 0.5 * wd * (w**2).sum())


def fixed_penalty(feats: dict[str, torch.Tensor], wd: float, tol: float) -> list[object]:
    """Ours and scikit-learn at one penalty on all of the train split: top-1, objective, agreement, CPU s."""
    from sklearn.linear_model import LogisticRegression

    xtr, ytr, xte, yte = feats["train"], feats["train_y"], feats["test"], feats["test_y"]
    probe, t_ours = timed(fit_linear_probe, xtr, ytr, 10, [wd])
    mean, std = probe.mean.numpy(), probe.std.numpy()
    x, xt = (xtr.double().numpy() - mean) / std, (xte.double().numpy() - mean) / std
    clf = LogisticRegression(C=1 / (wd * len(x)), max_iter=20_000, tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, t_sk = timed(clf.fit, x, ytr.numpy())
    ours_pred, sk_pred = probe.predict(xte).numpy(), clf.predict(xt)
    y = ytr.numpy()
    return [len(x), f"{wd:.0e}", f"{(ours_pred == yte.numpy()).mean():.4f}", f"{(sk_pred == yte.numpy()).mean():.4f}",
            f"{_objective(x, y, probe.weight.numpy(), probe.bias.numpy(), wd):.6f}",
            f"{_objective(x, y, clf.coef_, clf.intercept_, wd):.6f}", f"{(ours_pred == sk_pred).mean():.4f}",
            f"{t_ours:.0f}", f"{t_sk:.0f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", nargs="+", default=["resnet18"], choices=["resnet18", "pixels"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1257, 60000])
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--cache", type=Path, default=Path("runs/bench_linear_probe"))
    p.add_argument("--sklearn-tol", type=float, default=DEFAULT_TOL)
    p.add_argument("--skip-former", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--run", type=Path, help="a trained run folder: the solvers at --weight-decay on its features")
    p.add_argument("--weight-decay", type=float, help="the one penalty for --run")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.run is not None:
        if args.weight_decay is None or args.weight_decay <= 0:
            p.error("--run needs --weight-decay > 0 (the penalty the run's probe chose)")
        row = fixed_penalty(run_features(args.run), args.weight_decay, args.sklearn_tol)
        table = markdown_table(["train images", "weight decay", "ours top-1", "sklearn top-1", "ours objective",
                                "sklearn objective", "same test predictions", "ours CPU s", "sklearn CPU s"], [row])
        print(table)
        if not args.no_write:
            note = (f"Features of the trained run `{args.run}` (its encoder.pt, full train and test splits, as its "
                    f"final evaluation extracts them), standardised with the train statistics; one penalty, "
                    f"C = 1 / (wd * n), both fitted on all of the train split (sklearn lbfgs, tol "
                    f"{args.sklearn_tol:g}, max_iter 20000). Objective: mean cross-entropy + wd/2 ||W||^2 on the "
                    "train split, float64.")
            title = "linear_probe: ours vs scikit-learn at one penalty, 60,000 trained features"
            append_results(title, f"{note}\n\n{table}")
        return
    header = ["train images", "ours top-1", "ours wd", "ours CPU s", "sklearn top-1", "sklearn wd", "sklearn CPU s",
              "ours - sklearn (points)", "sklearn C=1 top-1", "former probe top-1"]
    sections = []
    for kind in args.features:
        feats = features(kind, args.root, args.cache)
        rows = [run_one(feats, n, args.sklearn_tol, args.skip_former) for n in args.sizes]
        title = f"{kind} features, {feats['train'].shape[1]}-D"
        sections.append(f"{title}\n\n{markdown_table(header, rows)}")
        print(sections[-1], "\n")
    if not args.no_write:
        note = (f"Fashion-MNIST test split (10,000). Grid: {len(DEFAULT_WEIGHT_DECAYS)} weight decays "
                f"{DEFAULT_WEIGHT_DECAYS[-1]:.0e}..{DEFAULT_WEIGHT_DECAYS[0]:.0e} (C = 1 / (wd * n)), 20% held out; "
                f"sklearn lbfgs tol {args.sklearn_tol:g}. Times are CPU seconds of one thread "
                f"(OMP_NUM_THREADS={torch.get_num_threads()}): the machine was shared, so wall times were longer.")
        append_results("linear_probe: ours vs scikit-learn LogisticRegression", note + "\n\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
