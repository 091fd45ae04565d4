"""The linear probe against scikit-learn's LogisticRegression on fixed synthetic features, closed-form
cases (separable data, features that carry no information), the held-out split, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mochi_retrieval.eval.errors import EvalInputError
from mochi_retrieval.eval.features import Features
from mochi_retrieval.eval.linear_probe import (
    DEFAULT_WEIGHT_DECAYS,
    fit_linear_probe,
    fit_logistic_regression,
    holdout_split,
    linear_probe_top1,
    standardise_stats,
)

sklearn = pytest.importorskip("sklearn", reason="scikit-learn (the dev extra) is the reference")


def _synthetic(n_train: int, n_test: int = 4000, seed: int = 0):
    """10 overlapping classes in 64-D (about 70% linear top-1): (train x, y, test x, y) as tensors."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n_train + n_test, n_features=64, n_informative=24, n_redundant=8,
                               n_classes=10, n_clusters_per_class=1, class_sep=1.5, flip_y=0.02, random_state=seed)
    x = torch.from_numpy(x * 3 + 5).float()  # off-centre and scaled, so standardisation matters
    y = torch.from_numpy(y)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _sklearn_chosen_the_same_way(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor) -> tuple[np.ndarray, float]:
    """sklearn lbfgs on the same standardised features, C from the same grid on the same held-out split,
    refit on all. Returns (test predictions, chosen weight decay)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    mean, std = standardise_stats(xtr.double())
    xtr, xte = ((xtr - mean) / std).numpy(), ((xte - mean) / std).numpy()
    fit, val = (i.numpy() for i in holdout_split(ytr, 0.2))
    scores = {}
    for wd in DEFAULT_WEIGHT_DECAYS:
        clf = LogisticRegression(C=1 / (wd * len(fit)), tol=1e-6, max_iter=10_000).fit(xtr[fit], ytr[fit])
        scores[wd] = (clf.score(xtr[val], ytr[val]), -log_loss(ytr[val], clf.predict_proba(xtr[val])))
    chosen = max(scores, key=scores.get)  # best held-out top-1, ties to the lower held-out loss
    clf = LogisticRegression(C=1 / (chosen * len(xtr)), tol=1e-6, max_iter=10_000).fit(xtr, ytr)
    return clf.predict(xte), chosen


@pytest.mark.parametrize("n_train", [1000, 8000])
def test_matches_sklearn_with_c_chosen_on_held_out(n_train: int) -> None:
    xtr, ytr, xte, yte = _synthetic(n_train)
    probe = fit_linear_probe(xtr, ytr, 10)
    ours = (probe.predict(xte) == yte).double().mean().item()
    sk_pred, sk_wd = _sklearn_chosen_the_same_way(xtr, ytr, xte)
    ref = float((sk_pred == yte.numpy()).mean())
    assert abs(ours - ref) <= 0.005, (ours, ref, probe.weight_decay, sk_wd)


def test_the_path_stops_after_patience_values_that_do_not_beat_the_best() -> None:
    """The early stop scores a prefix of the whole path (the same fits, warm-started alike), ends
    exactly ``patience`` values past its best, and with the default chooses what the whole grid chooses."""
    xtr, ytr, _, _ = _synthetic(3000)
    whole = fit_linear_probe(xtr, ytr, 10, patience=None)
    assert list(whole.holdout_top1) == sorted(DEFAULT_WEIGHT_DECAYS, reverse=True)
    for patience in (1, 3):
        early = fit_linear_probe(xtr, ytr, 10, patience=patience)
        tried = list(early.holdout_top1)
        assert tried == list(whole.holdout_top1)[: len(tried)]
        assert [early.holdout_top1[wd] for wd in tried] == [whole.holdout_top1[wd] for wd in tried]
        assert len(tried) < len(DEFAULT_WEIGHT_DECAYS), "the synthetic held-out curve has a peak inside the grid"
        best_at = tried.index(early.weight_decay)
        assert len(tried) - 1 - best_at == patience
        assert all(early.holdout_top1[wd] <= early.holdout_top1[early.weight_decay] for wd in tried[best_at:])
    # On this curve (a local peak at 3e-1, the best at 3e-3) one value of patience stops at the local
    # peak; the default's three reach the whole grid's choice.
    assert fit_linear_probe(xtr, ytr, 10).weight_decay == whole.weight_decay


def _objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, wd: float) -> float:
    logits = x @ w.T + b
    logits = logits - logits.max(1, keepdims=True)
    ce = np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y]
    return float(ce.mean() + 0.5 * wd * (w**2).sum())


@pytest.mark.parametrize("wd", [1e-1, 1e-3, 1e-5])
def test_reaches_sklearns_optimum(wd: float) -> None:
    """At a fixed penalty our L-BFGS reaches scikit-learn's objective value (C = 1 / (wd * N))."""
    from sklearn.linear_model import LogisticRegression

    xtr, ytr, _, _ = _synthetic(2000)
    mean, std = standardise_stats(xtr.double())
    x = (xtr.double() - mean) / std
    w, b = fit_logistic_regression(x, ytr, 10, wd)
    clf = LogisticRegression(C=1 / (wd * len(x)), tol=1e-8, max_iter=10_000).fit(x.numpy(), ytr.numpy())
    ours = _objective(x.numpy(), ytr.numpy(), w.numpy(), b.numpy(), wd)
    ref = _objective(x.numpy(), ytr.numpy(), clf.coef_, clf.intercept_, wd)
    assert ours <= ref + 1e-6, (ours, ref)
    assert (x.numpy() @ w.numpy().T + b.numpy()).argmax(1).tolist() == clf.predict(x.numpy()).tolist()


def test_separable_data_is_classified_perfectly() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:4] * 8
    ytr, yte = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (200,), generator=g)
    xtr, xte = centres[ytr] + torch.randn(400, 16, generator=g), centres[yte] + torch.randn(200, 16, generator=g)
    assert linear_probe_top1(Features(xtr, ytr, xte, yte, 4)) == 1.0


def test_uninformative_features_give_the_class_prior() -> None:
    """Constant features: W = 0 and softmax(b) = the class frequencies (the closed-form optimum)."""
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    probe = fit_linear_probe(torch.full((100, 5), 3.0), y, 3)
    assert probe.weight.abs().max() < 1e-6
    torch.testing.assert_close(probe.bias.softmax(0), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_deterministic_and_seeded() -> None:
    xtr, ytr, _, _ = _synthetic(600)
    a, b = fit_linear_probe(xtr, ytr, 10), fit_linear_probe(xtr, ytr, 10)
    assert torch.equal(a.weight, b.weight) and a.holdout_top1 == b.holdout_top1
    assert fit_linear_probe(xtr, ytr, 10, seed=1).holdout_top1 != a.holdout_top1


def test_holdout_split_is_stratified_and_disjoint() -> None:
    y = torch.tensor([0] * 100 + [1] * 10 + [2] * 1)
    fit, val = holdout_split(y, 0.2, seed=3)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(111))
    assert torch.bincount(y[val], minlength=3).tolist() == [20, 2, 0]  # a singleton class stays in fit
    assert torch.equal(holdout_split(y, 0.2, seed=3)[1], val)


def test_legacy_keywords_warn_and_still_work() -> None:
    xtr, ytr, xte, yte = _synthetic(500, 200)
    with pytest.warns(DeprecationWarning, match="ignored"):
        acc = linear_probe_top1(Features(xtr, ytr, xte, yte, 10), epochs=100, batch_size=64, lr=1e-2)
    assert 0.3 < acc <= 1.0
    with pytest.raises(TypeError, match="momentum"):
        linear_probe_top1(Features(xtr, ytr, xte, yte, 10), momentum=0.9)


@pytest.mark.parametrize("make, match", [
    (lambda x, y: (x[:-1], y), "differ in length: 99 vs 100"),
    (lambda x, y: (x, torch.zeros_like(y)), "single class"),
    (lambda x, y: (x.index_fill(0, torch.tensor([3, 7]), float("nan")), y), "NaN or infinite values in 2 of 100"),
    (lambda x, y: (x, y + 1), r"labels must be integers in \[0, 3\)"),
    (lambda x, y: (x[:0], y[:0]), "empty"),
])
def test_bad_input_names_the_problem(make, match: str) -> None:
    x, y = torch.randn(100, 4), torch.arange(100) % 3
    with pytest.raises(EvalInputError, match=match):
        fit_linear_probe(*make(x, y), 3)


def test_bad_settings_and_test_split() -> None:
    x, y = torch.randn(100, 4), torch.arange(100) % 3
    with pytest.raises(EvalInputError, match="holdout_fraction"):
        fit_linear_probe(x, y, 3, holdout_fraction=1.0)
    with pytest.raises(EvalInputError, match="weight_decays"):
        fit_linear_probe(x, y, 3, weight_decays=[])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(EvalInputError, match="patience"):
            fit_linear_probe(x, y, 3, patience=bad)
    with pytest.raises(EvalInputError, match="test features and labels differ"):
        linear_probe_top1(Features(x, y, x, y[:5], 3))
