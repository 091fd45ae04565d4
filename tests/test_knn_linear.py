"""kNN and linear probe: the maths against a brute-force reference, the Fashion-MNIST
reader, and ``--knn --linear`` end to end on tiny Fashion-MNIST and ImageFolder data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import make_run_folder, make_tiny_fashion_mnist, write_idx

from mochi_retrieval.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, load_fashion_mnist, missing_files
from mochi_retrieval.eval.cli import main
from mochi_retrieval.eval.features import Features
from mochi_retrieval.eval.knn import knn_scores, knn_top1
from mochi_retrieval.eval.linear_probe import linear_probe_top1


def _brute_force_knn(train, train_labels, test, num_classes, k, t):
    """Straight from Wu et al. 2018: cosine sims, top-k, exp(s/T) votes per class, one test point at a time."""
    train = train / train.norm(dim=1, keepdim=True)
    out = torch.zeros(len(test), num_classes)
    for m, x in enumerate(test):
        x = x / x.norm()
        sims = [(float(x @ train[i]), i) for i in range(len(train))]
        sims.sort(key=lambda p: -p[0])
        for s, i in sims[:k]:
            out[m, int(train_labels[i])] += float(np.exp(s / t))
    return out


def test_knn_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(150, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 4, (150,), generator=g)
    for k, t in [(200, 0.1), (7, 0.5), (1, 0.07)]:
        ours = knn_scores(train, labels, test, 4, k=k, temperature=t)
        ref = _brute_force_knn(train, labels, test, 4, min(k, 150), t)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def _clusters(n: int, seed: int, dim: int = 16, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 4
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_knn_and_linear_separate_clusters() -> None:
    tr, tr_y = _clusters(300, 0)
    te, te_y = _clusters(100, 1)
    assert knn_top1(tr, tr_y, te, te_y, k=20) > 0.95
    assert linear_probe_top1(Features(tr, tr_y, te, te_y, 3)) > 0.95


def test_fashion_mnist_reader_roundtrip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([0, 9, 3, 3, 1])
    write_idx(tmp_path, "train", images, labels)
    write_idx(tmp_path, "t10k", images[:2], labels[:2])
    x, y = load_fashion_mnist(tmp_path, "train")
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28) and torch.equal(x, torch.from_numpy(images))
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    ds = FashionMNIST(tmp_path, "test", transform=lambda im: np.asarray(im))
    assert len(ds) == 2 and ds[1][1] == 9 and np.array_equal(ds[0][0], images[0])


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "none")


@pytest.mark.skipif(bool(missing_files(DEFAULT_ROOT)), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_shapes() -> None:
    x, y = load_fashion_mnist(split="test")
    assert x.shape == (10_000, 28, 28) and y.shape == (10_000,) and set(y.tolist()) == set(range(10))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("run") / "run")


def test_cli_knn_linear_on_fashion_mnist_folder(run: Path, tmp_path: Path, capsys) -> None:
    data = make_tiny_fashion_mnist(tmp_path / "fm", n_train=90, n_test=30)
    out = tmp_path / "cls.json"
    assert main(["--knn", "--linear", "--model", str(run), "--data", str(data), "--output", str(out),
                 "--linear-max-iter", "200", "--knn-k", "10", "--no-progress", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"knn_top1", "linear_top1"}
    # three bars at three heights: even a random ResNet's features separate them
    assert res["knn_top1"] > 0.8 and res["linear_top1"] > 0.8
    assert "knn_top1" in capsys.readouterr().out


def test_cli_knn_on_imagefolder(run: Path, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in [("train", 12), ("val", 6)]:
        for c, value in [("dark", 30), ("light", 220)]:
            (tmp_path / "if" / split / c).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(rng.normal(value, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(tmp_path / "if" / split / c / f"{i}.png")
    out = tmp_path / "if.json"
    assert main(["--knn", "--model", str(run), "--data", str(tmp_path / "if"), "--output", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["knn_top1"] == 1.0


def test_cli_bad_image_folder(run: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "d" / "train").mkdir(parents=True)
    assert main(["--knn", "--model", str(run), "--data", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "neither a Fashion-MNIST folder (missing train-images-idx3-ubyte.gz" in err
    assert "nor an ImageFolder root (missing val/ (or test/))" in err and "Traceback" not in err
