"""Text retrieval on the Debian descriptions test split: ours vs sentence-transformers' recipes, over seeds.

Every trained row fine-tunes the packaged all-MiniLM-L6-v2 on the same training
pairs (``data.limit`` pairs of the train split drawn with the seed) for the same
steps, batch, maximum length, learning rate, warm-up, cosine schedule and
clipping, and is scored by the same evaluator (test-split queries against
test-split documents):

- ``zero_shot``: MiniLM without training;
- ``mnrl``: sentence-transformers ``MultipleNegativesRankingLoss`` (scale 20 = T 0.05,
  no-duplicates batches), the usual in-batch baseline;
- ``st_mined``: MNRL on (anchor, positive, negative) triplets from
  sentence-transformers' own ``mine_hard_negatives`` (zero-shot MiniLM,
  ``relative_margin=0.05``, 3 negatives per query, top sampling): the strongest
  peer recipe. Mining time counts in its pairs/s;
- ``st_mined_all`` / ``st_mined_all_1``: the same recipe mined from the whole corpus
  (``mine_hard_negatives(corpus=...)``, the documents our ``bank.corpus=all`` holds: every document
  but the test split's), 3 and 1 negatives per query;
- ``cached_mnrl``: ``CachedMultipleNegativesRankingLoss`` (GradCache, mini-batch 16);
- ``st_bank_loss``: ``SentenceTransformerTrainer`` with this library's ``BankNegativesLoss`` and
  ``BankRefreshCallback`` under the config's bank settings (the ``ours_bank`` row inside their trainer);
- ``ours_*``: ``python -m mochi_retrieval.train configs/debian_minilm.yaml`` with the
  overrides in ``OURS`` (bank refreshes count in pairs/s).

Each run writes ``OUT/ROW_seedS/bench.json``; ``--summarize`` reads them all and
writes the mean and spread over seeds (so several processes can run seeds side
by side)::

    python benchmarks/text_retrieval.py --seeds 0 1 2 --rows mnrl,st_mined,ours_bank
    python benchmarks/text_retrieval.py --summarize

``--all-documents`` scores the saved models of rows already run with the test queries against every document
of the corpus (60,932 in the Debian corpus built here), not only the split's; ``--summarize`` adds them as a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch
from common import append_results, markdown_table

from mochi_retrieval import training
from mochi_retrieval.config import load_config
from mochi_retrieval.training import TextEvaluator, build_encoder, load_pairs, resolve_model_path

CONFIG = Path(__file__).parents[1] / "configs" / "debian_minilm.yaml"
IN_BATCH = ["moco.queue_size=0", "bank.enabled=false", "mochi.enabled=false"]
BANK = ["moco.queue_size=0", "bank.enabled=true", "mochi.enabled=false"]
# MoCHi rows pin their settings (the config now holds pair mixes only, the "small" row).
MOCHI = ["mochi.enabled=true", "mochi.n_hard=32", "mochi.n_mix=16", "mochi.n_query_mix=8", "mochi.beta_max=0.25"]
OURS = {
    "ours_in_batch": IN_BATCH,
    "ours_bank": BANK,
    "ours_bank_mochi": BANK + MOCHI,
    "ours_bank_queue_mochi": BANK + MOCHI + ["moco.queue_size=1024"],
    # Ablations: the old single softmax (documents starved by detached negatives), no re-encoded
    # negatives, no fresh bank, MoCHi with the paper's image settings or pair mixes only, the momentum
    # key encoder with a queue (MoCo).
    "ours_bank_joint": BANK + ["moco.gradient=joint"],
    "ours_bank_detached_only": BANK + ["bank.mined_negatives=0"],
    "ours_bank_no_refresh": BANK + ["bank.refresh_every=0"],
    "ours_bank_mochi_paper": BANK + MOCHI + ["mochi.beta_max=0.5", "mochi.cap_at_positive=false",
                                             "mochi.n_hard=64", "mochi.n_mix=32", "mochi.n_query_mix=16"],
    "ours_bank_mochi_small": BANK + MOCHI + ["mochi.n_hard=16", "mochi.n_mix=8", "mochi.n_query_mix=0"],
    # MoCHi tuning at T 0.05 (issue 9): pair mixes only at the default pool, the query-mix range.
    "ours_bank_mochi_pairs": BANK + MOCHI + ["mochi.n_query_mix=0"],
    "ours_bank_mochi_beta10": BANK + MOCHI + ["mochi.beta_max=0.1"],
    "ours_bank_mochi_beta50": BANK + MOCHI + ["mochi.beta_max=0.5"],
    # More re-encoded mined negatives per query (sentence-transformers' recipe uses 3).
    "ours_bank_mined3": BANK + ["bank.mined_negatives=3"],
    # The bank over the whole corpus (every document but the test split's): re-embedded whole every 50
    # steps, or kept by a rolling refresh (a slice of ceil(N / 1000) rows a step, no full refresh).
    # Pinned: the config's own refresh became rolling on 2026-12-06, and this row must stay a full refresh.
    "ours_bank_all_full": BANK + ["bank.corpus=all", "bank.refresh_every=50", "bank.max_staleness=0"],
    # The rolling refresh with the drift correction (stale rows ranked and served as their estimated fresh
    # embeddings): over the whole corpus, and over the pairs with ceil(N / 100) rows a step instead of a full
    # refresh every 50 steps (about 0.6x the re-embedding over this budget: issue 26's 15% encode share).
    "ours_bank_all_rolling_drift": BANK + ["bank.corpus=all", "bank.refresh_every=0", "bank.max_staleness=1000",
                                           "bank.drift_correction=true"],
    "ours_bank_rolling": BANK + ["bank.refresh_every=0", "bank.max_staleness=100", "bank.drift_correction=true"],
    "ours_bank_rolling_plain": BANK + ["bank.refresh_every=0", "bank.max_staleness=100"],
    # The config's bank before 2026-12-06 20:20: a full re-embedding every 50 steps, no rolling refresh.
    "ours_bank_full50": BANK + ["bank.refresh_every=50", "bank.max_staleness=0"],
    "ours_bank_all_rolling": BANK + ["bank.corpus=all", "bank.refresh_every=0", "bank.max_staleness=1000"],
    "ours_bank_all_rolling_mochi": BANK + ["bank.corpus=all", "bank.refresh_every=0", "bank.max_staleness=1000",
                                           "mochi.enabled=true"],
    # The control for the whole corpus's extra false negatives: a positive's whole family (same first
    # paragraph: a library, its -dev and -doc packages) out of the bank.
    "ours_bank_all_rolling_family": BANK + ["bank.corpus=all", "bank.refresh_every=0", "bank.max_staleness=1000",
                                            "bank.exclude_family=true"],
    # MoCHi among the documents that carry gradient (the document term), on top of the config's pair mixes.
    "ours_bank_docmix": BANK + ["mochi.enabled=true", "mochi.document_mixes=true"],
    "ours_bank_all_rolling_docmix": BANK + ["bank.corpus=all", "bank.refresh_every=0", "bank.max_staleness=1000",
                                            "mochi.enabled=true", "mochi.document_mixes=true"],
    "ours_momentum_queue": ["model.key_encoder=momentum", "moco.queue_size=1024", "bank.enabled=false",
                            "mochi.enabled=false", "moco.in_batch_negatives=false"],
}
ST_ROWS = ["mnrl", "st_mined", "st_mined_all", "st_mined_all_1", "cached_mnrl", "st_bank_loss"]
ROWS = ["zero_shot", *ST_ROWS, *OURS]
METRICS = ["recall@1", "recall@10", "mrr@10", "ndcg@10"]
MONITORS = ["doc_mean_cosine", "mass_positive", "mass_in_batch", "mass_mined", "mass_queue", "mass_bank",
            "mass_synthetic", "grad_mass_share", "false_neg_family_top16", "bank_staleness_mean",
            "bank_staleness_max", "bank_age_mean", "bank_encode_share"]
MINED_NEGATIVES = 3


def st_imports():
    try:  # sentence-transformers >= 6 moved these
        from sentence_transformers.sentence_transformer import losses
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:
        from sentence_transformers import losses
        from sentence_transformers.training_args import BatchSamplers
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    return losses, BatchSamplers, SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments


def mine(cfg, model, ds, corpus: list[str] | None = None, negatives: int = MINED_NEGATIVES,
         cache_dir: str | None = None):
    """sentence-transformers' recommended mining: (anchor, positive, negative) triplets; (dataset, seconds).
    ``corpus``: the documents to mine from besides the positives (None = the positives only); ``cache_dir``:
    its own embedding cache (``cache_folder``), which skips the corpus pass of a later run."""
    from sentence_transformers.util import mine_hard_negatives

    start = time.perf_counter()
    mined = mine_hard_negatives(ds, model, anchor_column_name="anchor", positive_column_name="positive",
                                corpus=corpus, relative_margin=0.05, num_negatives=negatives,
                                sampling_strategy="top", output_format="triplet", batch_size=cfg.eval.batch_size,
                                verbose=False, cache_folder=cache_dir)
    return mined, time.perf_counter() - start


def whole_corpus(cfg, pairs) -> list[str]:
    """The (prefixed) documents our ``bank.corpus=all`` holds: the data set's corpus but the eval split's."""
    import dataclasses

    from mochi_retrieval.data.text_pairs import token_groups
    from mochi_retrieval.training.text import bank_documents, leave_out_eval_documents

    cfg = dataclasses.replace(cfg, bank=dataclasses.replace(cfg.bank, corpus="all", enabled=True))
    docs, ids = bank_documents(cfg, pairs)
    groups, _ = token_groups([cfg.data.document_prefix + d for d in docs], build_encoder(cfg).tokenize)
    ids = leave_out_eval_documents(cfg, ids, groups)
    return [cfg.data.document_prefix + docs[i] for i in ids.tolist()]


def run_st(cfg, row: str, out: Path, cache_dir: str | None = None) -> dict[str, float]:
    """Fine-tune with a sentence-transformers recipe under the config's budget."""
    import datasets

    losses, BatchSamplers, ST, Trainer, Args = st_imports()
    path = resolve_model_path(cfg.model.encoder_kwargs["model_path"])
    model = ST(path, device="cpu")
    model.max_seq_length = cfg.model.encoder_kwargs["max_length"]
    pairs = load_pairs(cfg)
    ds = datasets.Dataset.from_dict({"anchor": [cfg.data.query_prefix + e.query for e in pairs.examples],
                                     "positive": [cfg.data.document_prefix + e.positive for e in pairs.examples]})
    scale, extra = 1.0 / cfg.moco.temperature, {}
    mining_seconds = 0.0
    if row == "st_mined":
        ds, mining_seconds = mine(cfg, model, ds)
        extra["train_rows"] = len(ds)
    if row in ("st_mined_all", "st_mined_all_1"):
        corpus = whole_corpus(cfg, pairs)
        ds, mining_seconds = mine(cfg, model, ds, corpus, 1 if row == "st_mined_all_1" else MINED_NEGATIVES,
                                  cache_dir)
        extra.update(train_rows=len(ds), corpus_documents=len(corpus))
    callbacks = []
    if row == "cached_mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=16)
    elif row == "st_bank_loss":
        from mochi_retrieval.integrations.sentence_transformers import BankNegativesLoss, BankRefreshCallback

        loss = BankNegativesLoss(model, ds, bank=cfg.bank.settings(), mochi=cfg.mochi.settings(),
                                 temperature=cfg.moco.temperature, max_neg_pos_ratio=cfg.moco.max_neg_pos_ratio,
                                 gradient=cfg.moco.gradient, seed=cfg.seed)
        callbacks = [BankRefreshCallback(loss)]
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=scale)
    t = cfg.train
    args = Args(output_dir=str(out), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
                learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=int(t.warmup_epochs * t.max_steps),
                lr_scheduler_type="cosine", seed=cfg.seed, max_grad_norm=t.max_grad_norm or 0.0,
                save_strategy="no", report_to="none", logging_steps=25, use_cpu=True, dataloader_drop_last=True,
                batch_sampler=BatchSamplers.NO_DUPLICATES)
    trainer = Trainer(model=model, args=args, train_dataset=ds, loss=loss, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    model.save(str(out / "model"))  # for evaluations outside the run (e.g. against the whole corpus)
    metrics = evaluate(cfg, lambda texts: model.encode(texts, convert_to_tensor=True, batch_size=len(texts)))
    pairs_seen = t.max_steps * t.batch_size
    return {**metrics, **extra, "pairs_per_s": pairs_seen / (seconds + mining_seconds),
            "pairs_per_s_excl": pairs_seen / seconds, "mining_seconds": mining_seconds}


def evaluate(cfg, encode) -> dict[str, float]:
    with torch.inference_mode():
        return TextEvaluator(cfg, torch.device("cpu")).score(encode)


def zero_shot(cfg) -> dict[str, float]:
    encoder = build_encoder(cfg).eval()
    return evaluate(cfg, lambda texts: encoder(encoder.tokenize(texts)).float())


def run_ours(cfg) -> dict[str, float]:
    results = training.run(cfg)
    seconds, refresh = results["train_seconds"], results.get("bank_refresh_seconds", 0.0)
    pairs = results["steps"] * cfg.train.batch_size
    last = {}
    for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        last.update({k: v for k, v in record.items() if k in MONITORS})  # the last logged value of each
    bank = {k: v for k, v in results.items() if k.startswith("bank_")}
    return {**{k: results[k] for k in METRICS + ["doc_mean_cosine"]}, **last, **bank, "pairs_per_s": pairs / seconds,
            "pairs_per_s_excl": pairs / (seconds - refresh)}


def run_one(row: str, seed: int, steps: int, out_root: Path, overrides: list[str],
            cache_dir: str | None = None) -> dict:
    """One row and seed. ``cache_dir``: the corpus pass of the whole-corpus rows (ours and the peer's) is
    cached there and reused by later seeds; such records are marked ``cached`` and their pairs/s left out
    of the table (they skipped a pass that a real run pays)."""
    out = out_root / f"{row}_seed{seed}"
    cache = [f"bank.cache_dir={cache_dir}"] if cache_dir and row.startswith("ours_bank_all") else []
    before = set(Path(cache_dir).glob("*")) if cache_dir and Path(cache_dir).is_dir() else set()
    base = [f"seed={seed}", f"train.max_steps={steps}", f"data.limit={steps * 32}", f"output_dir={out}",
            "train.resume=false", *overrides, *cache]
    cfg = load_config(CONFIG, base + OURS.get(row, []))
    torch.manual_seed(seed)
    if row == "zero_shot":
        result = zero_shot(cfg)
    elif row in ST_ROWS:
        result = run_st(cfg, row, out, cache_dir if row.startswith("st_mined_all") else None)
    else:
        result = run_ours(cfg)
    t = cfg.train
    record = {"row": row, "seed": seed, **result, "budget": {
        "steps": steps, "batch": t.batch_size, "max_length": cfg.model.encoder_kwargs["max_length"],
        "lr": t.lr, "weight_decay": t.weight_decay, "warmup_epochs": t.warmup_epochs,
        "max_grad_norm": t.max_grad_norm, "temperature": cfg.moco.temperature},
        "overrides": overrides + OURS.get(row, []) + cache,
        "cached": _hit(cache_dir, before, row)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "budget"}), flush=True)
    return record


def _hit(cache_dir: str | None, before: set[Path], row: str) -> bool:
    """Whether the row's corpus pass came from the cache: a whole-corpus row that added no file to it (one
    that filled it paid the pass)."""
    if not cache_dir or not (row.startswith("ours_bank_all") or row.startswith("st_mined_all")):
        return False
    added = [p for p in Path(cache_dir).glob("*") if p not in before and ("corpus" in p.name or "bank-" in p.name)]
    return not added


def all_documents(row: str, seed: int, out_root: Path, overrides: list[str]) -> dict:
    """Score a trained row's saved model (``OUT/ROW_seedS/model``; ``zero_shot``: the packaged MiniLM) with the
    test queries against every document of the corpus (``eval.corpus=all``), not only the split's judged
    ones; writes ``OUT/ROW_seedS/all_documents.json``."""
    from mochi_retrieval.eval.models import load_model

    out = out_root / f"{row}_seed{seed}"
    cfg = load_config(CONFIG, ["eval.corpus=all", *overrides])
    max_length = cfg.model.encoder_kwargs["max_length"]
    folder = resolve_model_path(cfg.model.encoder_kwargs["model_path"]) if row == "zero_shot" else out / "model"
    if not Path(folder).is_dir():
        raise SystemExit(f"{row} seed {seed}: no saved model at {folder}; run the row first")
    model = load_model(folder, "cpu", max_length=max_length)
    evaluator = TextEvaluator(cfg, torch.device("cpu"))
    split = evaluator.evaluator()
    start = time.perf_counter()
    metrics = evaluator.score(model.encode_texts, split)
    record = {"row": row, "seed": seed, **metrics, "documents": len(split.corpus),
              "queries": len(split.queries), "max_length": max_length,
              "seconds": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    (out / "all_documents.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record), flush=True)
    return record


def all_documents_table(out_root: Path) -> str:
    """The ``--all-documents`` records under ``out_root`` as a table (empty string if none)."""
    records = [json.loads(p.read_text()) for p in sorted(out_root.glob("*_seed*/all_documents.json"))]
    if not records:
        return ""
    order = {r: i for i, r in enumerate(ROWS)}
    records.sort(key=lambda r: (order.get(r["row"], len(order)), r["seed"]))
    table = [[r["row"], str(r["seed"]), *(f"{r[m]:.4f}" for m in METRICS)] for r in records]
    return (f"\n\nThe test queries against all {records[0]['documents']:,} documents of the corpus (`--all-documents`, "
            f"`eval.corpus=all`; the split's own documents and every training and unjudged one), one model each:\n\n"
            + markdown_table(["row", "seed", *METRICS], table))


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


SECTION = "text_retrieval (Debian descriptions, all-MiniLM-L6-v2), seeds"


def summarize(out_root: Path, write: bool, section: str = SECTION) -> str:
    records = [json.loads(p.read_text()) for p in sorted(out_root.glob("*_seed*/bench.json"))]
    if not records:
        raise SystemExit(f"no bench.json under {out_root}")
    by_row: dict[str, list[dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r)
    order = [r for r in ROWS if r in by_row]
    table = []
    for row in order:
        rs = by_row[row]
        cells = [mean_spread([r[m] for r in rs]) for m in METRICS]
        pps = [r["pairs_per_s"] for r in rs if "pairs_per_s" in r and not r.get("cached")]
        cells.append(f"{statistics.median(pps):.2f}" if pps else "-")
        table.append([row, ",".join(str(r["seed"]) for r in rs), *cells])
    monitors = []
    for row in order:
        rs = by_row[row]
        monitors.append([row] + [f"{statistics.mean(r[m] for r in rs):.3f}" if all(m in r for r in rs) else "-"
                                 for m in MONITORS])
    b = records[0]["budget"]
    body = (f"Budget for every trained row: {b['steps']} steps x batch {b['batch']} ({b['steps'] * b['batch']} "
            f"training examples drawn from the train split with the seed), max_length {b['max_length']}, AdamW lr "
            f"{b['lr']}, weight decay {b['weight_decay']}, warm-up {b['warmup_epochs']} epoch, cosine, clipping "
            f"{b['max_grad_norm']}; T {b['temperature']} (MNRL scale {1 / b['temperature']:.0f}); test split: all "
            f"its queries against all its documents. Cells: mean ± standard deviation over the seeds listed; "
            f"pairs/s: median over the seeds that paid their own corpus pass (no --cache-dir), training examples / "
            f"(training + mining + bank refresh) seconds.\n\n"
            + markdown_table(["row", "seeds", *METRICS, "train pairs/s"], table)
            + "\n\nMonitors (mean over seeds; doc_mean_cosine on the test documents after training, the others "
              "the last logged training window):\n\n" + markdown_table(["row", *MONITORS], monitors)
            + all_documents_table(out_root))
    print(body)
    if write:
        append_results(section, body)
    return body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=125)
    p.add_argument("--rows", default="zero_shot,mnrl,st_mined,ours_in_batch,ours_bank,ours_bank_mochi",
                   help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--out", default="runs/bench_text")
    p.add_argument("--summarize", action="store_true", help="only summarise OUT/*/bench.json into RESULTS.md")
    p.add_argument("--section", default=SECTION, help="the RESULTS.md section title of --summarize")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--cache-dir", help="cache the whole-corpus rows' corpus pass here (ours: bank.cache_dir; the "
                                       "peer: mine_hard_negatives' cache_folder); their pairs/s then leave the table")
    p.add_argument("--all-documents", action="store_true",
                   help="score the rows' saved models with the test queries against every corpus document")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every row")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.summarize:
        summarize(Path(args.out), not args.no_write, args.section)
        return
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {ROWS}")
    for seed in args.seeds:
        for row in rows:
            if row == "zero_shot" and seed != args.seeds[0]:
                continue
            if args.all_documents:
                all_documents(row, seed, Path(args.out), args.overrides)
                continue
            run_one(row, seed, args.steps, Path(args.out), args.overrides, args.cache_dir)


if __name__ == "__main__":
    main()
