"""``python -m mochi_retrieval.eval``: judge an embedding model from the command line.

Modes (combine ``--knn`` and ``--linear``; retrieval and detection run alone)::

    # retrieval on a BEIR folder: recall@k, MRR@10, nDCG@10
    python -m mochi_retrieval.eval --recall@k 1,10,100 --model PATH --data DIR [--split test] [--output r.json]
    # image classification from frozen features (Fashion-MNIST idx folder or ImageFolder train/ + val/)
    python -m mochi_retrieval.eval --knn --linear --model RUN_DIR --data /usr/share/datasets/fashion-mnist
    # detection transfer on a VOC-format folder
    python -m mochi_retrieval.eval --detection --model RUN_DIR --data VOC_ROOT [--detection-config YAML]

Every mode prints a table and, with ``--output FILE.json``, writes the flat
results dict there; retrieval also draws the recall@k curve (``--plot``,
by default next to the JSON file). Bad input ends with ``error: ...`` on
stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from mochi_retrieval.eval.errors import EvalInputError
from mochi_retrieval.eval.linear_probe import DEFAULT_MAX_ITER

logger = logging.getLogger("mochi_retrieval.eval")


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,10,100, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"cut-offs must be positive integers, got {text!r}")
    return sorted(set(ks))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mochi_retrieval.eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("modes")
    mode.add_argument("--recall@k", dest="recall_at_k", type=_parse_ks, nargs="?", const=[1, 10, 100],
                      metavar="K1,K2,...", help="retrieval on a BEIR folder with these recall cut-offs")
    mode.add_argument("--knn", action="store_true", help="weighted kNN top-1 (k=200, T=0.1)")
    mode.add_argument("--linear", action="store_true", help="linear probe top-1 on frozen features")
    mode.add_argument("--detection", action="store_true", help="Faster R-CNN transfer on a VOC-format folder")
    p.add_argument("--model", required=True, help="HF / sentence-transformers folder or a run folder of our trainer")
    p.add_argument("--data", required=True, help="BEIR folder, Fashion-MNIST idx folder, ImageFolder root or VOC root")
    p.add_argument("--split", default="test", help="BEIR qrels split (default: test)")
    p.add_argument("--output", type=Path, help="write the results as a flat JSON object")
    p.add_argument("--plot", type=Path, help="recall@k curve PNG (default: next to --output)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    p.add_argument("--max-length", type=int, help="text models: maximum tokens per text")
    p.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto", help="search backend")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-temperature", type=float, default=0.1)
    p.add_argument("--linear-max-iter", type=int, default=DEFAULT_MAX_ITER,
                   help="linear probe: L-BFGS iterations per fit (the probe stops earlier once converged)")
    p.add_argument("--linear-epochs", type=int, help=argparse.SUPPRESS)  # the former SGD probe's; ignored
    p.add_argument("--image-size", type=int,
                   help="image modes: resize to this side (default: the run's data.image_size)")
    p.add_argument("--limit", type=int, help="image modes: use only the first N train and test items")
    p.add_argument("--detection-config", type=Path, default=Path("configs/voc_detection.yaml"))
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def format_table(results: dict[str, float], title: str) -> str:
    """A two-column text table of ``results``."""
    width = max([len(k) for k in results] + [len("metric")])
    lines = [title, f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in results.items()]
    return "\n".join(lines)


def plot_recall_curve(curve: Tensor, ks: Sequence[int], path: Path, title: str) -> None:
    """Save mean recall@k for k = 1..len(curve) as a PNG, marking the requested ks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the recall@k plot needs matplotlib (a core dependency): pip install matplotlib") from e
    ks = [k for k in ks if k <= len(curve)]
    x = torch.arange(1, len(curve) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(x.numpy(), curve.numpy(), lw=1.5)
    ax.scatter(ks, [curve[k - 1].item() for k in ks], zorder=3)
    for k in ks:
        ax.annotate(f"{curve[k - 1].item():.3f}", (k, curve[k - 1].item()), textcoords="offset points", xytext=(4, -10))
    if len(curve) > 10:
        ax.set_xscale("log")
    ax.set(xlabel="k", ylabel="recall@k", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _run_retrieval(args: argparse.Namespace) -> dict[str, float]:
    from mochi_retrieval.data.beir import load_beir
    from mochi_retrieval.eval.models import load_model
    from mochi_retrieval.eval.retrieval import RetrievalEvaluator

    data = load_beir(args.data, args.split)
    evaluator = RetrievalEvaluator.from_beir(data, recall_ks=args.recall_at_k, batch_size=args.batch_size,
                                             backend=args.backend, device=args.device,
                                             show_progress=not args.no_progress)
    model = load_model(args.model, args.device, args.max_length)
    if model.modality != "text":
        raise EvalInputError(f"--recall@k needs a text model, but {args.model} holds an image encoder")
    result = evaluator.evaluate(model.encode_texts)
    plot = args.plot or (args.output.with_name(args.output.stem + "_recall.png") if args.output else None)
    if plot is not None:
        try:
            plot_recall_curve(result.recall_curve, evaluator.recall_ks, plot,
                              f"{Path(args.model).name} on {Path(args.data).name}")
            logger.info("wrote recall@k curve to %s", plot)
        except ImportError as e:
            if args.plot is not None:  # asked for explicitly: fail clearly
                raise EvalInputError(str(e)) from None
            logger.warning("skipping the recall@k plot: %s", e)
    return result.metrics


def _run_classification(args: argparse.Namespace) -> dict[str, float]:
    from mochi_retrieval.eval.features import extract_features, load_classification_data
    from mochi_retrieval.eval.knn import knn_top1
    from mochi_retrieval.eval.linear_probe import linear_probe_top1
    from mochi_retrieval.eval.models import load_model

    model = load_model(args.model, args.device)
    if model.modality != "image":
        raise EvalInputError(f"--knn/--linear need an image model, but {args.model} holds a text encoder")
    size = args.image_size or model.config.data.image_size
    train, test, n_classes = load_classification_data(args.data, model.encoder, size, args.limit)
    feats = extract_features(model.encode_images, train, test, n_classes, args.batch_size, not args.no_progress)
    results: dict[str, float] = {}
    if args.knn:
        results["knn_top1"] = knn_top1(feats.train, feats.train_labels, feats.test, feats.test_labels,
                                       k=args.knn_k, temperature=args.knn_temperature, num_classes=n_classes)
    if args.linear:
        if args.linear_epochs is not None:
            logger.warning("--linear-epochs is ignored: the linear probe is full-batch L-BFGS (see --linear-max-iter)")
        results["linear_top1"] = linear_probe_top1(feats, device=args.device, max_iter=args.linear_max_iter)
    return results


def _run_detection(args: argparse.Namespace) -> dict[str, float]:
    from mochi_retrieval.eval.detection import load_detection_config, run_detection_transfer
    from mochi_retrieval.eval.models import load_model

    cfg = load_detection_config(args.detection_config)
    model = load_model(args.model, "cpu")
    return run_detection_transfer(model.encoder, args.data, cfg, device=args.device, progress=not args.no_progress)


def run(args: argparse.Namespace) -> dict[str, float]:
    """Run the chosen mode(s); returns the flat results dict."""
    if args.recall_at_k is not None:
        return _run_retrieval(args)
    if args.detection:
        return _run_detection(args)
    return _run_classification(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = [args.recall_at_k is not None, args.knn or args.linear, args.detection]
    if sum(chosen) != 1:
        parser.error("choose one mode: --recall@k, --knn and/or --linear, or --detection")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("mochi_retrieval").setLevel(logging.INFO)
    try:
        results = run(args)
    except (EvalInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results, f"{Path(args.model).name} on {Path(args.data).name}"))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("wrote %s", args.output)
    return 0
