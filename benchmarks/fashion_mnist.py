"""MoCo-v2, MoCHi, MoCHi + oracle and MoCHi + image bank on Fashion-MNIST with the CPU config, against the floors.

Reports, per seed and row: kNN (k=200, T=0.1) and linear-probe top-1 on the full
test split, wall time, and the training monitors averaged over the last epoch;
the mean and spread over seeds when there are several. Also, in the same run:

- the floors (``--floors``, on by default): kNN on raw pixels in [0, 1] and on
  standardised pixels (same protocol), a logistic regression on standardised
  pixels (our converging linear probe, :func:`fit_linear_probe`), and a randomly
  initialised network of the config's architecture (kNN and linear probe, one
  per seed: the seed sets its weights);
- training-step time of MoCHi relative to MoCo, measured side by side on the
  same batches (interleaved, median; MoCHi active; ``--timing-steps 0`` skips it);
- images/s of the data pipeline alone (two augmented views per image) against
  images/s of the training step.

Rows (``--rows``, the first five by default):

- ``moco``: plain MoCo-v2 (``mochi.enabled=false``);
- ``mochi``: MoCo-v2 + MoCHi (the config's settings);
- ``oracle``: MoCHi with same-class queue entries masked (``moco.mask_same_label=true``),
  the paper's oracle: what the false negatives cost;
- ``moco_oracle``: plain MoCo-v2 with the same mask: against ``oracle``, what MoCHi adds once its hard
  pool holds no false negatives;
- ``bank``: MoCHi + the image FAISS bank (``bank.enabled=true``);
- ``bank_oracle`` (only when named): the bank with the same-class mask (the bank then retrieves other
  classes only): against ``oracle``, what the bank adds once it brings no false negatives;
- ``copies`` (only when named): MoCHi's draws with each pair point a copy of one pool member
  (``mochi.copies_only=true``), the control that separates mixing from re-weighting the hard pool;
- label-free false-negative handling (only when named; :mod:`mochi_retrieval.false_negatives`, with the
  config's ``false_negatives`` settings), each without and with MoCHi: ``fnc_elim`` / ``fnc_elim_mochi`` (support-view
  detection, flagged entries eliminated), ``fnc_attr`` / ``fnc_attr_mochi`` (flagged entries attracted as
  positives), ``nn_pos`` / ``nn_pos_mochi`` (the queue entry nearest the key replaces it as the positive,
  NNCLR). Paired by seed against ``moco`` / ``mochi`` and the oracle rows; their step time is measured side
  by side against MoCo's (support views included);
- ``fnc_attr_oracle`` / ``fnc_elim_oracle`` (only when named): the control that separates the detector from
  the handling: the same flags kept only where labels say they are the query's class
  (``false_negatives.oracle=true``, precision 1 at the detector's ranking).

A full table is hours of CPU. ``--reuse`` takes a row from an earlier invocation's run folder
(``<out>/<row>_seed<seed>/bench.json``) when that run's resolved config equals this one's (output
folder aside), and a floor from ``<out>/floors/`` when its inputs are equal; the table says which
rows were reused. So the rows can be trained as separate processes side by side (``--rows moco
--seeds 1 --no-floors``; ``--rows`` with no value computes only the floors) and gathered by one
``--reuse`` invocation, which still measures the side-by-side step timing itself. ``--gather-only``
(implies ``--reuse``) trains nothing: rows without a matching earlier run are left out and named.

    python benchmarks/fashion_mnist.py [--seeds 0 1 2] [--rows moco mochi] [--no-floors] [--reuse] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import OneCpuProcess, append_results, interleaved_medians, markdown_table, training_step

from mochi_retrieval import train
from mochi_retrieval.config import load_config
from mochi_retrieval.config.engine import to_dict
from mochi_retrieval.data.fashion_mnist import FASHION_MNIST_STATS, load_fashion_mnist
from mochi_retrieval.eval.features import Features
from mochi_retrieval.eval.knn import knn_top1
from mochi_retrieval.eval.linear_probe import linear_probe_top1
from mochi_retrieval.training import ImageEvaluator as Evaluator
from mochi_retrieval.training import build_data, build_model
from mochi_retrieval.training.host_memory import keep_freed_host_memory

CONFIG = Path(__file__).parents[1] / "configs" / "fashion_mnist_resnet18.yaml"

ROWS: dict[str, tuple[str, list[str]]] = {
    "moco": ("MoCo-v2", ["mochi.enabled=false"]),
    "mochi": ("MoCo-v2 + MoCHi", ["mochi.enabled=true"]),
    "oracle": ("MoCHi + oracle (same class masked)", ["mochi.enabled=true", "moco.mask_same_label=true"]),
    "moco_oracle": ("MoCo-v2 + oracle (same class masked)", ["mochi.enabled=false", "moco.mask_same_label=true"]),
    "bank": ("MoCHi + image FAISS bank", ["mochi.enabled=true", "bank.enabled=true"]),
    "bank_oracle": ("MoCHi + bank + oracle", ["mochi.enabled=true", "bank.enabled=true", "moco.mask_same_label=true"]),
    "copies": ("MoCHi's draws as copies (no mixing)", ["mochi.enabled=true", "mochi.copies_only=true"]),
}
#: The false-negative rows switch the handling on; the detector's settings are the config's ``false_negatives``
#: section (override them on the command line, e.g. ``false_negatives.top_k=10``, for every row at once).
FN_ROWS = {
    "fnc_elim": ("MoCo-v2 + FNC elimination", "eliminate", False),
    "fnc_elim_mochi": ("MoCHi + FNC elimination", "eliminate", True),
    "fnc_attr": ("MoCo-v2 + FNC attraction", "attract", False),
    "fnc_attr_mochi": ("MoCHi + FNC attraction", "attract", True),
    "nn_pos": ("MoCo-v2 + nearest-neighbour positive", "nearest_positive", False),
    "nn_pos_mochi": ("MoCHi + nearest-neighbour positive", "nearest_positive", True),
}
for _key, (_name, _handling, _mochi) in FN_ROWS.items():
    ROWS[_key] = (_name, [f"mochi.enabled={str(_mochi).lower()}", f"false_negatives.handling={_handling}"])
# The control that separates the detector from the handling: attraction (elimination) at the detector's
# ranking with its flags kept only where labels say they are the query's class (precision 1).
ROWS["fnc_attr_oracle"] = ("MoCo-v2 + FNC attraction, labels filter the flags", ROWS["fnc_attr"][1] + [
    "false_negatives.oracle=true"])
ROWS["fnc_elim_oracle"] = ("MoCo-v2 + FNC elimination, labels filter the flags", ROWS["fnc_elim"][1] + [
    "false_negatives.oracle=true"])
DEFAULT_ROWS = ("moco", "mochi", "oracle", "moco_oracle", "bank")
#: Differences reported paired by seed (row, baseline): MoCHi's effect with and without false negatives in its
#: pool, what the false negatives cost, what the bank adds (with and without its false negatives), and the
#: re-weighting control against MoCHi and MoCo.
PAIRS = (("mochi", "moco"), ("oracle", "moco_oracle"), ("oracle", "mochi"), ("moco_oracle", "moco"),
         ("bank", "mochi"), ("bank_oracle", "oracle"), ("bank_oracle", "bank"), ("copies", "mochi"),
         ("copies", "moco"),
         # each false-negative handling (and its MoCHi twin) against MoCo-v2, the twin against the handling
         # alone and against MoCHi
         *((key, "moco") for key in FN_ROWS),
         ("fnc_attr_oracle", "moco"), ("fnc_attr_oracle", "fnc_attr"), ("fnc_elim_oracle", "moco"),
         ("fnc_elim_oracle", "fnc_elim"),
         *(pair for key in FN_ROWS if key.endswith("_mochi") for pair in ((key, key[: -len("_mochi")]),
                                                                          (key, "mochi"))))
#: Training monitors reported at the end of a run (means over its last epoch's log records).
# Data settings a random-init network's evaluation does not read: training augmentation and loader workers.
TRAIN_ONLY_DATA = ("crop_scale", "blur_prob", "jitter", "num_workers")
MONITORS = ("accuracy", "pos_sim", "hardest_neg_sim", "false_neg_hard_pool", "cluster_masked", "cluster_precision",
            "fn_flagged", "fn_precision", "fn_recall", "fn_mass", "fn_support_s")


def pixel_features(root: str, standardise: bool, limit: int | None = None) -> Features:
    """(N, 784) pixels in [0, 1], or standardised as the encoders see them (the first ``limit`` of each split)."""
    (tr, tr_y), (te, te_y) = load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")
    mean, std = (FASHION_MNIST_STATS[0][0], FASHION_MNIST_STATS[1][0]) if standardise else (0.0, 1.0)
    flat = lambda x: ((x[:limit].float() / 255 - mean) / std).flatten(1)  # noqa: E731
    return Features(flat(tr), tr_y[:limit].long(), flat(te), te_y[:limit].long(), 10)


def _covers(saved: object, wanted: object) -> bool:
    """Whether saved inputs hold every wanted value; a saved dict may hold more keys, at any depth (inputs
    narrowed later still match the rows saved with them)."""
    if isinstance(wanted, dict):
        return isinstance(saved, dict) and all(k in saved and _covers(saved[k], v) for k, v in wanted.items())
    return saved == wanted


def _cached_row(folder: Path, name: str, inputs: dict, compute, reuse: bool) -> tuple[list[object], bool]:
    """``compute()``'s table row, saved to ``folder/name.json`` with its inputs; with ``reuse``, the saved
    row when the inputs are equal (then True)."""
    path = folder / f"{name}.json"
    if reuse and path.exists():
        saved = json.loads(path.read_text())
        if _covers(saved["inputs"], inputs):
            return saved["row"], True
    row = compute()
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"inputs": inputs, "row": row}, indent=2) + "\n")
    return row, False


def _mark_reused(row: list[object], reused: bool) -> list[object]:
    """The wall-time cell (index 4) says when a row comes from an earlier invocation."""
    return [*row[:4], f"{row[4]} (earlier run)", *row[5:]] if reused else row


def floor_rows(cfg, seeds: list[int], overrides: list[str], cache: Path, reuse: bool) -> list[list[object]]:
    """Pixel kNN (raw, standardised), pixel logistic regression, random-init network per seed.

    Each row is saved under ``cache`` with its inputs; with ``reuse`` it is taken from there when they are equal."""
    e, rows = cfg.eval, []
    for name, std in (("raw pixels in [0, 1] (floor)", False), ("standardised pixels (floor)", True)):
        def pixels(name=name, std=std):
            start = time.perf_counter()
            feats = pixel_features(cfg.data.root, std, e.limit)
            knn = knn_top1(feats.train, feats.train_labels, feats.test, feats.test_labels, e.knn_k,
                           e.knn_temperature, 10)
            linear = "-"
            if std:  # the probe standardises per feature anyway: one logistic regression on pixels
                linear = f"{linear_probe_top1(feats):.4f}"
            return [name, "-", f"{knn:.4f}", linear, f"{time.perf_counter() - start:.0f}", "-", "-"]
        inputs = {"root": cfg.data.root, "limit": e.limit, "k": e.knn_k, "T": e.knn_temperature, "std": std}
        row, reused = _cached_row(cache, f"pixels_std{int(std)}", inputs, pixels, reuse)
        rows.append(_mark_reused(row, reused))
    for seed in seeds:
        scfg = load_config(CONFIG, [*overrides, f"seed={seed}", "eval.linear_probe=true"])

        def random_init(scfg=scfg, seed=seed):
            start = time.perf_counter()
            torch.manual_seed(seed)  # what the training program does before building the model
            model = build_model(scfg, 1, 1)
            r = Evaluator(scfg, torch.device("cpu")).final(model.encoder)
            return [f"random-init {scfg.model.encoder} (floor)", seed, f"{r['knn_top1']:.4f}",
                    f"{r['linear_top1']:.4f}", f"{time.perf_counter() - start:.0f}", "-", "-"]
        # What a random-init network's evaluation depends on: its weights (the seed drawn them, then the
        # queue and the rest) and the evaluation; not the queue, MoCHi, the training schedule or the training
        # augmentation's strengths (evaluation images are not augmented).
        inputs = {k: v for k, v in to_dict(scfg).items() if k in ("seed", "model", "data", "eval")}
        inputs["data"] = {k: v for k, v in inputs["data"].items() if k not in TRAIN_ONLY_DATA}
        row, reused = _cached_row(cache, f"random_init_seed{seed}", inputs, random_init, reuse)
        rows.append(_mark_reused(row, reused))
    return rows


#: What the side-by-side timing adds to every row: MoCHi and the false-negative handling active from step one.
TIMING = ["mochi.warmup_epochs=0", "false_negatives.start_epoch=0"]


def paired_steppers(overrides: list[str], steps: int, start: Path | None = None, rows: tuple[str, ...] = ("mochi",)):
    """(the training steps of MoCo and of each of ``rows``, the data, the batches): models from the same seed
    (and from ``start``, a training checkpoint with weights and a trained queue, when given), MoCHi and the
    false-negative handling active from the first step, all cycling through the same ``steps`` real batches
    (of the checkpoint's epoch; with as many support views as any row uses, which the others ignore)."""
    configs = {name: load_config(CONFIG, overrides + ROWS[name][1] + TIMING) for name in ("moco", *rows)}
    first = max(configs.values(), key=lambda c: c.false_negatives.extra_views)
    if first.train.keep_host_memory:  # as training does (mochi_retrieval.training.runner)
        keep_freed_host_memory()
    data = build_data(first, OneCpuProcess())
    state = torch.load(start, map_location="cpu", weights_only=False) if start is not None else None
    batches = [b for _, b in zip(range(steps), data.epoch(state["epoch"] if state else 0))]
    steps_of = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = build_model(cfg, data.steps_per_epoch, 1)
        if state is not None:
            model.load_state_dict(state["model"])
        steps_of[name] = training_step(model, cfg.train.lr, batches)
    return steps_of, data, batches


def step_timing(overrides: list[str], steps: int, start: Path | None = None,
                rows: tuple[str, ...] = ("mochi",)) -> tuple[dict[str, float], float, float, int]:
    """({row: its step time / MoCo's}, training images/s of MoCo, loader images/s, views per image), side by
    side.

    ``start``: a training checkpoint every model loads first (weights and a trained queue, whose scores
    are what the hard-pool selection sorts in a real run; without it the queue holds random keys)."""
    steps_of, data, batches = paired_steppers(overrides, steps, start, rows)
    times = interleaved_medians(steps_of, steps, torch.device("cpu"))
    batch_size = batches[0]["view_q"].shape[0]
    it = data.epoch(1)
    loader = interleaved_medians({"loader": lambda: next(it)}, steps, torch.device("cpu"))["loader"]
    views = 2 + (batches[0]["view_support"].shape[0] if "view_support" in batches[0] else 0)
    ratios = {row: times[row] / times["moco"] for row in rows}
    return ratios, batch_size / times["moco"], batch_size / loader, views


def timing_table(ratios: dict[str, float], train_ips: float, loader_ips: float, views: int = 2) -> str:
    return markdown_table(
        ["measured side by side", "value"],
        [*([f"{ROWS[row][0]} step time / MoCo step time (median)", f"{r:.3f}x"] for row, r in ratios.items()),
         ["training images/s (MoCo step)", f"{train_ips:.0f}"],
         [f"data pipeline images/s ({views} views each)", f"{loader_ips:.0f}"]])


def end_monitors(records: list[dict]) -> dict[str, float]:
    """Means of :data:`MONITORS` over the last epoch's log records, the kNN monitor curve and the loss trend."""
    logged = [r for r in records if "loss" in r]
    if not logged:
        return {}
    last_epoch = max(r["epoch"] for r in logged) - 1.0
    tail = [r for r in logged if r["epoch"] > last_epoch]
    out = {k: statistics.fmean(r[k] for r in tail if k in r) for k in MONITORS if any(k in r for r in tail)}
    out["final_loss"] = logged[-1]["loss"]
    out["loss_change_last_epoch"] = tail[-1]["loss"] - tail[0]["loss"]
    out["knn_monitor"] = [round(r["knn_monitor"], 4) for r in records if "knn_monitor" in r]
    return out


def monitors_text(m: dict) -> str:
    parts = []
    for key, short in (("accuracy", "acc"), ("pos_sim", "pos"), ("hardest_neg_sim", "hardest"),
                       ("false_neg_hard_pool", "same-class pool"), ("cluster_masked", "cluster-masked"),
                       ("cluster_precision", "their same-class share"), ("fn_flagged", "flagged"),
                       ("fn_precision", "their same-class share"), ("fn_recall", "same-class top-256 flagged"),
                       ("fn_mass", "their softmax mass"), ("fn_support_s", "support views s/step")):
        if key in m:
            parts.append(f"{short} {m[key]:.3f}" if key == "fn_support_s" else f"{short} {m[key]:.2f}")
    if "loss_change_last_epoch" in m:
        parts.append(f"loss {m['final_loss']:.2f} ({m['loss_change_last_epoch']:+.2f} in last epoch)")
    return ", ".join(parts)


def _resolved(cfg) -> dict:
    """The resolved config as a dict, without what does not change the result: the output folder, resume,
    with MoCHi off its mixing settings (``n_hard`` stays: it sizes the hard-pool monitor), and with the
    false-negative handling off its settings."""
    d = to_dict(cfg)
    d.pop("output_dir")
    d["train"].pop("resume")
    d["train"].pop("keep_host_memory")  # where freed memory goes, not what is computed
    if not d["mochi"]["enabled"]:
        d["mochi"] = {"enabled": False, "n_hard": d["mochi"]["n_hard"]}
    if d["false_negatives"]["handling"] == "none":  # its settings unused (runs from before the section match)
        d["false_negatives"] = {"handling": "none"}
    return d


def reusable(overrides: list[str], out: Path) -> dict | None:
    """The bench.json of an earlier run in ``out`` with the same resolved config, else None; its monitors are
    recomputed from the run's metrics.jsonl (so a monitor added to :data:`MONITORS` later shows too)."""
    bench, saved = out / "bench.json", out / "config.yaml"
    if not (bench.is_file() and saved.is_file()):
        return None
    if _resolved(load_config(saved)) != _resolved(load_config(CONFIG, overrides)):
        print(f"{out}: its config differs from this invocation's; not reused")
        return None
    results = json.loads(bench.read_text())
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        results["monitors"] = end_monitors([json.loads(line) for line in metrics.read_text().splitlines()])
    return results


def train_run(overrides: list[str], out: Path) -> dict:
    start = time.perf_counter()
    code = train.main([str(CONFIG), *overrides, f"output_dir={out}", "train.resume=false"])
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}")
    wall = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results["wall_s"] = wall
    results["monitors"] = end_monitors(records)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def paired_differences(summary: dict[str, dict[str, list[float]]], seeds: list[int]) -> list[list[str]]:
    """The :data:`PAIRS` whose two rows ran on every seed, seed by seed, in points."""
    out = []
    for row, base in PAIRS:
        a, b = summary.get(ROWS[row][0]), summary.get(ROWS[base][0])
        if a is None or b is None or len(a["knn"]) != len(seeds) or len(b["knn"]) != len(seeds):
            continue
        cells = []
        for metric in ("knn", "linear"):
            if len(a[metric]) != len(b[metric]) or not a[metric]:
                cells.append("-")
                continue
            d = [100 * (x - y) for x, y in zip(a[metric], b[metric])]
            cells.append(f"{statistics.fmean(d):+.2f} ± {statistics.stdev(d):.2f}" if len(d) > 1 else f"{d[0]:+.2f}")
        out.append([f"{ROWS[row][0]} − {ROWS[base][0]}", *cells])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(DEFAULT_ROWS),
                   help="variants to train (none: only the floors)")
    p.add_argument("--floors", action=argparse.BooleanOptionalAction, default=True,
                   help="pixel and random-network floors in the same run")
    p.add_argument("--timing-steps", type=int, default=15, help="side-by-side MoCHi/MoCo steps (0: skip)")
    p.add_argument("--out", default="runs/bench_fashion_mnist")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--reuse", action="store_true",
                   help="take rows and floors from earlier invocations' folders under --out when their configs match")
    p.add_argument("--gather-only", action="store_true",
                   help="--reuse, and leave out (and name) rows without a matching earlier run instead of training")
    p.add_argument("--timing-only", action="store_true", help="only the side-by-side step and loader timings")
    p.add_argument("--timing-from", type=Path, default=None,
                   help="a training checkpoint (weights, trained queue) both timed models start from")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every row, e.g. train.epochs=2")
    args = p.parse_args()
    args.reuse = args.reuse or args.gather_only
    cfg = load_config(CONFIG, args.overrides)

    side = ""
    if args.timing_steps > 0:
        timed = ("mochi", *(row for row in args.rows if row in FN_ROWS))
        side = timing_table(*step_timing(args.overrides, args.timing_steps, args.timing_from, timed))
        if args.timing_from is not None:
            side = f"both models start from `{args.timing_from}`\n\n{side}"
        print(side)
    if args.timing_only:
        if not args.no_write:
            append_results("fashion_mnist: step timing only", f"{args.timing_steps} interleaved steps each\n\n{side}")
        return
    rows = floor_rows(cfg, args.seeds, args.overrides, Path(args.out) / "floors", args.reuse) if args.floors else []
    summary: dict[str, dict[str, list[float]]] = {}
    missing: list[str] = []
    for seed in args.seeds:
        for key in args.rows:
            name, extra = ROWS[key]
            out = Path(args.out) / f"{key}_seed{seed}"
            row_overrides = [*args.overrides, *extra, f"seed={seed}"]
            earlier = reusable(row_overrides, out) if args.reuse else None
            if earlier is None and args.gather_only:
                missing.append(f"{key} seed {seed}")
                continue
            r = {**earlier, "reused": True} if earlier is not None else train_run(row_overrides, out)
            linear = r.get("linear_top1")
            rows.append(_mark_reused([name, seed, f"{r['knn_top1']:.4f}", "-" if linear is None else f"{linear:.4f}",
                                      f"{r['wall_s']:.0f}", monitors_text(r["monitors"]),
                                      " ".join(f"{v:.3f}" for v in r["monitors"].get("knn_monitor", []))],
                                     r.get("reused", False)))
            s = summary.setdefault(name, {"knn": [], "linear": [], "wall": []})
            s["knn"].append(r["knn_top1"])
            s["wall"].append(r["wall_s"])
            if linear is not None:
                s["linear"].append(linear)
            print(markdown_table(["row", "seed", "kNN", "linear", "wall s"], [rows[-1][:5]]), flush=True)
    header = ["method", "seed", "kNN top-1", "linear top-1", "wall s", "monitors over the last epoch",
              "kNN monitor per epoch (10k train)"]
    table = markdown_table(header, rows)
    if len(args.seeds) > 1:
        table += "\n\n" + markdown_table(
            ["method", "seeds", "kNN mean ± sd", "linear mean ± sd", "wall s (mean)"],
            [[name, len(s["knn"]), spread(s["knn"]), spread(s["linear"]), f"{statistics.fmean(s['wall']):.0f}"]
             for name, s in summary.items()])
        paired = paired_differences(summary, args.seeds)
        if paired:
            header = ["difference, paired by seed (points)", "kNN mean ± sd", "linear mean ± sd"]
            table += "\n\n" + markdown_table(header, paired)
    if missing:
        table += "\n\nNot run (no finished earlier run with this config): " + ", ".join(missing) + "."
    budget = (f"budget: {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, lr {cfg.train.lr}, "
              f"{cfg.model.encoder} {cfg.model.encoder_kwargs}, K={cfg.moco.queue_size}, T={cfg.moco.temperature}, "
              f"m={cfg.moco.momentum}, crop scale {list(cfg.data.crop_scale)}, blur p {cfg.data.blur_prob}, "
              f"jitter {cfg.data.jitter}; MoCHi({cfg.mochi.n_hard}, {cfg.mochi.n_mix}, {cfg.mochi.n_query_mix}) "
              f"after {cfg.mochi.warmup_epochs} epochs; seeds {args.seeds}. Wall times are seconds on this shared "
              f"machine (training + final evaluation; floors: features + kNN + probe); \"earlier run\": trained or "
              f"computed by an earlier invocation with the same resolved config (--reuse).")
    print(table, "\n\n", side, sep="")
    if not args.no_write:
        body = f"{budget}\n\n{table}" + (f"\n\n{side}" if side else "")
        append_results("fashion_mnist: MoCo-v2, MoCHi, oracle, bank vs floors", body)


if __name__ == "__main__":
    main()
