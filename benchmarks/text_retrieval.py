"""Text retrieval on the Debian descriptions test split: ours vs sentence-transformers' in-batch losses.

Every row fine-tunes the packaged all-MiniLM-L6-v2 on the same training pairs
(``data.limit`` pairs of the train split drawn with the seed) for the same
steps, batch, maximum length, learning rate, warm-up and cosine schedule, and
is scored by the same evaluator (test-split queries against test-split
documents):

- zero-shot MiniLM (no training);
- sentence-transformers ``MultipleNegativesRankingLoss`` (scale 20 = T 0.05,
  no-duplicates batches): the usual in-batch baseline;
- sentence-transformers ``GISTEmbedLoss`` (guide: the zero-shot MiniLM);
- ours, shared encoder, T 0.05: in-batch only (the same objective as MNRL:
  a parity check); + queue of 2048; + FAISS bank; + MoCHi.

Training pairs/s is pairs seen / wall time of the training call (ours: the bank
refresh at the start included; the "excl. refresh" column removes it).

    python benchmarks/text_retrieval.py [--seeds 0 1] [--steps 125] [--rows mnrl,ours_bank_mochi]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch
from common import append_results, markdown_table

from mochi_retrieval import train
from mochi_retrieval.config import load_config
from mochi_retrieval.text_experiment import TextEvaluator, build_encoder, load_pairs, resolve_model_path

CONFIG = Path(__file__).parents[1] / "configs" / "debian_minilm.yaml"
QUEUE = "moco.queue_size=2048"
OURS = {
    "ours_in_batch": ["moco.queue_size=0", "bank.enabled=false", "mochi.enabled=false"],
    "ours_queue": [QUEUE, "bank.enabled=false", "mochi.enabled=false"],
    "ours_queue_bank": [QUEUE, "bank.enabled=true", "mochi.enabled=false"],
    "ours_queue_bank_mochi": [QUEUE, "bank.enabled=true", "mochi.enabled=true"],
}
ROWS = ["zero_shot", "mnrl", "gist", *OURS]
METRICS = ["recall@1", "recall@10", "mrr@10", "ndcg@10"]


def st_imports():
    try:  # sentence-transformers >= 6 moved these
        from sentence_transformers.sentence_transformer import losses
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:
        from sentence_transformers import losses
        from sentence_transformers.training_args import BatchSamplers
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    return losses, BatchSamplers, SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments


def run_st(cfg, loss_name: str, out: Path) -> tuple[dict[str, float], float]:
    """Fine-tune with a sentence-transformers loss under the config's budget; (metrics, pairs/s)."""
    import datasets

    losses, BatchSamplers, ST, Trainer, Args = st_imports()
    path = resolve_model_path(cfg.model.encoder_kwargs["model_path"])
    model = ST(path, device="cpu")
    model.max_seq_length = cfg.model.encoder_kwargs["max_length"]
    pairs = load_pairs(cfg)
    ds = datasets.Dataset.from_dict({"anchor": [cfg.data.query_prefix + e.query for e in pairs.examples],
                                     "positive": [cfg.data.document_prefix + e.positive for e in pairs.examples]})
    if loss_name == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model, scale=1.0 / cfg.moco.temperature)
    else:
        guide = ST(path, device="cpu")
        guide.max_seq_length = model.max_seq_length
        loss = losses.GISTEmbedLoss(model, guide)
    t = cfg.train
    args = Args(output_dir=str(out), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
                learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=int(t.warmup_epochs * t.max_steps),
                lr_scheduler_type="cosine", seed=cfg.seed, max_grad_norm=t.max_grad_norm or 0.0,
                save_strategy="no", report_to="none",
                logging_steps=25, use_cpu=True, dataloader_drop_last=True,
                batch_sampler=BatchSamplers.NO_DUPLICATES)
    trainer = Trainer(model=model, args=args, train_dataset=ds, loss=loss)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate(cfg, lambda texts: model.encode(texts, convert_to_tensor=True, batch_size=len(texts)))
    return metrics, t.max_steps * t.batch_size / seconds


def evaluate(cfg, encode) -> dict[str, float]:
    with torch.inference_mode():
        return TextEvaluator(cfg, torch.device("cpu")).evaluator()(encode)


def zero_shot(cfg) -> dict[str, float]:
    encoder = build_encoder(cfg).eval()
    return evaluate(cfg, lambda texts: encoder(encoder.tokenize(texts)).float())


def run_ours(cfg) -> tuple[dict[str, float], float, float]:
    results = train.run(cfg)
    seconds, refresh = results["train_seconds"], results.get("bank_refresh_seconds", 0.0)
    pairs = results["steps"] * cfg.train.batch_size
    return {k: results[k] for k in METRICS}, pairs / seconds, pairs / (seconds - refresh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=125)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--out", default="runs/bench_text")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every row")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {ROWS}")
    table, budget = [], None
    for seed in args.seeds:
        for row in rows:
            out = Path(args.out) / f"{row}_seed{seed}"
            base = [f"seed={seed}", f"train.max_steps={args.steps}", f"data.limit={args.steps * 32}",
                    f"output_dir={out}", "train.resume=false", *args.overrides]
            cfg = load_config(CONFIG, base + OURS.get(row, []))
            budget = cfg
            torch.manual_seed(seed)
            if row == "zero_shot":
                if seed != args.seeds[0]:
                    continue
                metrics, pps, pps_x = zero_shot(cfg), float("nan"), float("nan")
            elif row in ("mnrl", "gist"):
                metrics, pps = run_st(cfg, row, out)
                pps_x = pps
            else:
                metrics, pps, pps_x = run_ours(cfg)
            table.append([row, seed, *(f"{metrics[m]:.4f}" for m in METRICS), f"{pps:.2f}", f"{pps_x:.2f}"])
            print(json.dumps({"row": row, "seed": seed, **metrics, "pairs_per_s": pps, "pairs_per_s_excl": pps_x}),
                  flush=True)
    header = ["row", "seed", *METRICS, "train pairs/s", "pairs/s excl. bank refresh"]
    t = budget.train
    body = (f"Budget for every trained row: {args.steps} steps x batch {t.batch_size} "
            f"({args.steps * t.batch_size} pairs drawn from the train split with the seed), max_length "
            f"{budget.model.encoder_kwargs['max_length']}, AdamW lr {t.lr}, weight decay {t.weight_decay}, "
            f"warm-up {t.warmup_epochs} epoch, cosine; T 0.05 (MNRL scale 20); test split: all its queries "
            f"against all its documents.\n\n" + markdown_table(header, table))
    print(body)
    if not args.no_write:
        append_results("text_retrieval (Debian descriptions, all-MiniLM-L6-v2)", body)


if __name__ == "__main__":
    main()
