"""Linear probe: multinomial logistic regression on frozen, cached features, fitted to convergence.

The features are computed once (:func:`mochi_retrieval.eval.features.extract_features`) and
standardised with the training split's mean and standard deviation. The classifier minimises

    mean cross-entropy(x W^T + b, y) + weight_decay / 2 * ||W||^2      (the bias is not penalised)

with full-batch L-BFGS and a strong-Wolfe line search, until the largest gradient entry is below
``tol``. This is the objective of scikit-learn's ``LogisticRegression(C=...)`` with
``C = 1 / (weight_decay * N)``, solved as well as lbfgs solves it, so the reported number is the
features' linear separability, not the optimiser's budget (mini-batch SGD for a fixed number of
epochs under-reported it by 2 to 10 points).

The regularisation strength is chosen as CLIP's and solo-learn's offline probes choose it: a
seeded, class-stratified held-out part of the training split (``holdout_fraction``) scores each
value of ``weight_decays`` (fitted from the strongest to the weakest, each fit warm-started from
the previous one); the best held-out top-1 wins (ties go to the lower held-out loss), and the
probe is refitted on the whole training split with it. The path stops early once ``patience``
consecutive weaker values have not beaten the best (weak penalties are the slowest fits, and past
the peak they only overfit the fit part further; ``patience=None`` scores the whole grid). Test
data are never looked at before the final score. Everything runs on the features' device and is
deterministic for a given ``seed``.

Example::

    feats = extract_features(model.encode_images, train_ds, test_ds, num_classes=10)
    acc = linear_probe_top1(feats)                         # top-1 on feats.test, in [0, 1]
    probe = fit_linear_probe(feats.train, feats.train_labels, 10)
    probe.weight_decay, probe.holdout_top1                 # what was chosen, and why
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mochi_retrieval.eval.errors import EvalInputError
from mochi_retrieval.eval.features import Features

logger = logging.getLogger(__name__)

#: L2 strengths tried on the held-out split (per-sample scale: ``C = 1 / (weight_decay * N)``).
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(2, -15, -1))  # 1e1 .. 1e-7
DEFAULT_MAX_ITER = 1000
DEFAULT_TOL = 1e-5
#: Weaker values scored past the best before the path stops (1.5 decades on the default grid).
DEFAULT_PATIENCE = 3
_LEGACY_KWARGS = ("batch_size", "lr", "weight_decay")


@dataclass
class LinearProbe:
    """A fitted probe. ``weight`` (C, D) and ``bias`` (C,) act on standardised features;
    ``mean`` and ``std`` (1, D) are the training split's statistics.

    ``holdout_top1`` maps each weight decay tried to its held-out top-1 (empty when only one
    value was given, or the training split was too small to hold any out; shorter than the grid
    when the path stopped early).
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    weight_decay: float
    holdout_top1: dict[float, float] = field(default_factory=dict)

    def logits(self, features: Tensor) -> Tensor:
        """(M, D) raw features -> (M, C) logits."""
        x = (features.to(self.mean) - self.mean) / self.std
        return torch.addmm(self.bias, x, self.weight.T)

    def predict(self, features: Tensor) -> Tensor:
        """(M, D) raw features -> (M,) int64 predicted classes."""
        return self.logits(features).argmax(1)


def check_probe_inputs(features: Tensor, labels: Tensor, num_classes: int, split: str = "train") -> None:
    """Raise :class:`EvalInputError` naming the problem with a (N, D) feature matrix and its (N,) labels."""
    if features.ndim != 2 or labels.ndim != 1:
        raise EvalInputError(f"{split} features must be (N, D) and labels (N,), got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
    if len(features) != len(labels):
        raise EvalInputError(f"{split} features and labels differ in length: {len(features)} vs {len(labels)}")
    if len(features) == 0:
        raise EvalInputError(f"{split} split is empty")
    if not torch.isfinite(features).all():
        bad = int((~torch.isfinite(features)).any(1).sum())
        raise EvalInputError(f"{split} features hold NaN or infinite values in {bad} of {len(features)} rows")
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= num_classes:
        raise EvalInputError(f"{split} labels must be integers in [0, {num_classes}), got "
                             f"{labels.dtype} in [{labels.min().item()}, {labels.max().item()}]")
    if split == "train" and len(labels.unique()) < 2:
        raise EvalInputError(f"train labels hold a single class ({labels[0].item()}): a linear probe needs "
                             "at least two")


def standardise_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """(N, D) -> mean, std (1, D); constant columns get std 1 (they stay constant, at 0)."""
    mean = features.mean(0, keepdim=True)
    std = features.std(0, keepdim=True) if len(features) > 1 else torch.ones_like(mean)
    return mean, torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))


def holdout_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Class-stratified, seeded split of ``range(N)``: (fit indices, held-out indices), both sorted.

    Each class with at least two members gives ``round(fraction * n_c)`` of them (at least one,
    never all) to the held-out part.
    """
    g = torch.Generator().manual_seed(seed)
    cpu = labels.cpu()
    held = []
    for c in cpu.unique().tolist():
        members = (cpu == c).nonzero().squeeze(1)
        if len(members) < 2:
            continue
        n = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=g)[:n]])
    mask = torch.zeros(len(cpu), dtype=torch.bool)
    if held:
        mask[torch.cat(held)] = True
    return (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)


def fit_logistic_regression(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL, init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise mean CE + weight_decay/2 ||W||^2 with full-batch L-BFGS (strong Wolfe).

    Args:
        x: (N, D) standardised features, on the device to fit on. y: (N,) int64.
        init: (W (C, D), b (C,)) to warm-start from; zeros otherwise.
    Returns:
        W (C, D), b (C,), detached, on ``x``'s device and dtype.
    """
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    if init is not None:
        w.copy_(init[0]), b.copy_(init[1])
    w.requires_grad_(True), b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        closure()  # the gradient at the final point (the line search's last trial may lie elsewhere)
    grad = max(w.grad.abs().max().item(), b.grad.abs().max().item())
    n_iter = opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0)
    if grad > tol:
        logger.warning("linear probe (weight decay %.1e): stopped after %d L-BFGS iterations with gradient "
                       "%.1e > tol %.1e", weight_decay, n_iter, grad, tol)
    logger.debug("L-BFGS, weight decay %.1e: %d iterations, max |grad| %.1e", weight_decay, n_iter, grad)
    return w.detach(), b.detach()


def _score(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> tuple[float, float]:
    """(top-1, mean cross-entropy) of the linear map (W, b) on (N, D) x and (N,) y."""
    logits = torch.addmm(b, x, w.T)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def select_weight_decay(
    x: Tensor, y: Tensor, num_classes: int, weight_decays: Sequence[float], holdout_fraction: float,
    seed: int, max_iter: int, tol: float, patience: int | None = DEFAULT_PATIENCE,
) -> tuple[float, dict[float, float], tuple[Tensor, Tensor] | None]:
    """Score each weight decay, strongest first, on a held-out part of the (N, D) standardised train
    features; stop after ``patience`` consecutive values that do not beat the best (None: never).

    Returns:
        (best weight decay, {weight decay: held-out top-1}, the best fit's (W, b) to warm-start from).
    """
    fit_idx, val_idx = holdout_split(y, holdout_fraction, seed)
    if len(weight_decays) == 1 or len(val_idx) == 0 or len(y[fit_idx].unique()) < 2:
        return float(weight_decays[0]), {}, None
    fit_idx, val_idx = fit_idx.to(x.device), val_idx.to(x.device)
    xf, yf, xv, yv = x[fit_idx], y[fit_idx], x[val_idx], y[val_idx]
    scores: dict[float, float] = {}
    best, best_key, best_fit, params, since_best = None, (-1.0, 0.0), None, None, 0
    for wd in sorted((float(v) for v in weight_decays), reverse=True):
        params = fit_logistic_regression(xf, yf, num_classes, wd, max_iter, tol, init=params)
        acc, loss = _score(xv, yv, *params)
        scores[wd] = acc
        if (acc, -loss) > best_key:
            best, best_key, best_fit, since_best = wd, (acc, -loss), params, 0
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                break
    logger.info("linear probe held-out top-1 (%d fit / %d held out) per weight decay: %s", len(fit_idx),
                len(val_idx), ", ".join(f"{wd:.0e}: {a:.4f}" for wd, a in scores.items()))
    return best, scores, best_fit


def fit_linear_probe(
    features: Tensor, labels: Tensor, num_classes: int, weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    holdout_fraction: float = 0.2, max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL, seed: int = 0,
    dtype: torch.dtype = torch.float64, patience: int | None = DEFAULT_PATIENCE,
) -> LinearProbe:
    """Standardise, choose the weight decay on a held-out part, refit on all of (N, D) ``features``.

    Args:
        features: (N, D) raw train features, on the device to fit on. labels: (N,) int64 in [0, C).
        weight_decays: L2 strengths to try (one value: no held-out selection).
        holdout_fraction: share of each class held out to choose the weight decay.
        max_iter: L-BFGS iterations per fit. tol: stop when every gradient entry is below it.
        seed: seeds the held-out split (the only randomness).
        patience: weaker values scored past the best before the search stops (None: the whole grid).
        dtype: precision of the fit. float64 (default) lets the line search resolve the loss to the
            tolerance; in float32 L-BFGS stalls near a gradient of 1e-5 on 50k samples.
    Raises:
        EvalInputError: mismatched lengths, NaN/inf features, labels out of range, a single class,
            an empty grid or a held-out fraction outside (0, 1).
    """
    check_probe_inputs(features, labels, num_classes)
    if not weight_decays or min(weight_decays) < 0:
        raise EvalInputError(f"weight_decays must be a non-empty list of values >= 0, got {list(weight_decays)}")
    if not 0 < holdout_fraction < 1:
        raise EvalInputError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise EvalInputError(f"patience must be a positive integer or None, got {patience!r}")
    features = features.to(dtype)
    mean, std = standardise_stats(features)
    x, y = (features - mean) / std, labels.to(features.device)
    wd, scores, init = select_weight_decay(x, y, num_classes, weight_decays, holdout_fraction, seed, max_iter, tol,
                                           patience)
    w, b = fit_logistic_regression(x, y, num_classes, wd, max_iter, tol, init=init)
    return LinearProbe(w, b, mean, std, wd, scores)


def linear_probe_top1(
    feats: Features, epochs: int | None = None, device: str | torch.device = "cpu", *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, holdout_fraction: float = 0.2,
    max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL, seed: int = 0,
    patience: int | None = DEFAULT_PATIENCE, **legacy: float,
) -> float:
    """Fit on ``feats.train`` (see :func:`fit_linear_probe`) and return top-1 in [0, 1] on ``feats.test``.

    ``epochs`` and the keywords ``batch_size``, ``lr``, ``weight_decay`` of the former mini-batch
    probe are accepted and ignored, with a ``DeprecationWarning``.
    """
    unknown = set(legacy) - set(_LEGACY_KWARGS)
    if unknown:
        raise TypeError(f"linear_probe_top1() got unexpected keyword arguments {sorted(unknown)}")
    if epochs is not None or legacy:
        warnings.warn("linear_probe_top1: epochs, batch_size, lr and weight_decay are ignored; the probe is "
                      "full-batch L-BFGS (see max_iter, tol, weight_decays)", DeprecationWarning, stacklevel=2)
    check_probe_inputs(feats.test, feats.test_labels, feats.num_classes, "test")
    start = time.perf_counter()
    probe = fit_linear_probe(feats.train.to(device), feats.train_labels.to(device), feats.num_classes,
                             weight_decays, holdout_fraction, max_iter, tol, seed, patience=patience)
    with torch.no_grad():
        pred = probe.predict(feats.test.to(device)).cpu()
    acc = (pred == feats.test_labels).float().mean().item()
    logger.info("linear probe top-1: %.4f (weight decay %.0e, C = %.3g; %.1f s)", acc, probe.weight_decay,
                1 / (probe.weight_decay * len(feats.train)) if probe.weight_decay > 0 else math.inf,
                time.perf_counter() - start)
    return acc
