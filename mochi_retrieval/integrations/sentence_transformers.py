"""Online hard negatives inside sentence-transformers' own trainer.

A loss and a callback for ``SentenceTransformerTrainer``: the trainer keeps its arguments, evaluators, model
cards and Hub uploads, and each step's negatives are this library's: the other documents of the batch, plus
documents mined online from a FAISS bank over a corpus you pass (re-encoded with gradient), plus the bank's
stored vectors, with the positive-aware ceiling and MoCHi. The maths is :class:`~mochi_retrieval.text_model.TextMoCo`'s,
run on the trainer's batches, so the gradient rule (``query_only``: detached negatives score the query only)
and the false-negative masks (a query's own positives, and any document whose tokenised input equals one of
theirs) are those of ``python -m mochi_retrieval.train``::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from mochi_retrieval.bank import BankSettings
    from mochi_retrieval.integrations.sentence_transformers import BankNegativesLoss, BankRefreshCallback

    model = SentenceTransformer("path/to/all-MiniLM-L6-v2")
    loss = BankNegativesLoss(model, train_dataset, corpus=corpus_texts,
                             bank=BankSettings(candidates=16, mined_negatives=2, refresh_every=500))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss,
                                         callbacks=[BankRefreshCallback(loss)])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

``train_dataset`` holds (anchor, positive) pairs: its first two columns, as for
``MultipleNegativesRankingLoss``. The loss reads it once, to give every positive a document id and every
anchor its set of positives; the trainer's collator tokenises the batches as usual and the loss finds the
ids again from the token ids. The corpus (any list of texts, or a ``datasets`` column) is what the bank
indexes; positives missing from it are added to it.

Steps. The callback embeds the bank at the start of training and then re-embeds it every
``bank.refresh_every`` optimiser steps, or a rolling slice before every step with ``bank.max_staleness``
(``state.global_step``; our trainer counts forward calls, the same without gradient
accumulation). MoCHi's draws are seeded by the forward-call index ``global_step x accumulation + micro-batch``,
as in our trainer. Checkpoints get the bank (and the queue, if any) in ``mochi_bank_state.pt``; a run resumed
with ``resume_from_checkpoint`` continues with the same bank.

Several processes (``accelerate launch`` / ``torchrun``): every process holds the whole bank, each embeds a
1/W slice of the corpus at a refresh, and the batch's documents and mined documents are gathered across
processes, as in our trainer.

Evaluation batches (the trainer's ``eval_dataset``) get the plain in-batch loss at the same temperature; they
never touch the bank.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mochi_retrieval.optional import optional_import

_INSTALL = "pip install 'mochi-retrieval[sentence-transformers]'"
optional_import("sentence_transformers", _INSTALL, "mochi_retrieval.integrations.sentence_transformers")
from transformers import TrainerCallback  # noqa: E402  (sentence-transformers brings transformers)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

from mochi_retrieval.bank import BankSettings  # noqa: E402
from mochi_retrieval.data.text_pairs import family_groups, token_groups  # noqa: E402
from mochi_retrieval.files import atomic_write  # noqa: E402
from mochi_retrieval.loss import MoCHiConfig  # noqa: E402
from mochi_retrieval.text_model import BankCorpus, TextMoCo  # noqa: E402

logger = logging.getLogger(__name__)

BANK_STATE_FILE = "mochi_bank_state.pt"
"""File in each checkpoint folder holding the bank's rows and the engine's own state."""
LABEL_COLUMNS = ("label", "labels", "score", "scores", "dataset_name")  # columns the ST collator does not embed
TokenKey = tuple[int, ...]


# ---------------------------------------------------------------------------------------------- encoder
class SentenceTransformerEncoder(nn.Module):
    """A ``SentenceTransformer`` as an encoder of this library: token batch -> (B, D) ``sentence_embedding``.

    ``tokenize(texts)`` is the model's own preprocessing (what the trainer's collator does without a prompt),
    so a text re-encoded from the bank gets the same tokens as in a batch. Under DDP the trainer hands the
    loss a wrapped model; :meth:`bind` routes the forward through it (its parameters stay the model's).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.st = model
        dim = _embedding_dim(model)
        if dim is None:
            raise ValueError("the SentenceTransformer does not state its embedding dimension "
                             "(get_sentence_embedding_dimension() returned None)")
        self.output_dim: int = int(dim)
        self.__dict__["_runner"] = None  # not a submodule: never saved, never copied into a key encoder

    def bind(self, runner: nn.Module | None) -> None:
        """Run forwards through ``runner`` (the trainer's DDP-wrapped model); None or the model = directly."""
        self.__dict__["_runner"] = None if runner is None or runner is self.st else runner

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Texts (B,) -> the model's token tensors, each (B, L), on the CPU."""
        prepare = getattr(self.st, "preprocess", None) or self.st.tokenize
        return {k: v for k, v in prepare(list(texts)).items() if isinstance(v, Tensor)}

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """Token batch (each (B, L)) -> (B, D) sentence embeddings."""
        net = self.__dict__["_runner"] or self.st
        return net(dict(batch))["sentence_embedding"]  # a copy: the model's modules write into the dict


def _embedding_dim(model: nn.Module) -> int | None:
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        fn = getattr(model, name, None)
        if callable(fn):
            return fn()
    return None


class _TrainerTextMoCo(TextMoCo):
    """:class:`TextMoCo` whose bank upkeep (initial pass, full and rolling refreshes) the callback drives on
    optimiser steps, never its forward."""

    def maintain_bank(self, step: int | None) -> float:  # called by forward: the callback keeps the bank
        return 0.0

    def upkeep(self, step: int) -> float:
        """The bank's upkeep before optimiser step ``step`` (see :meth:`TextMoCo.maintain_bank`)."""
        return TextMoCo.maintain_bank(self, step)


# ---------------------------------------------------------------------------------------------- data
def _texts(values: Iterable[Any], what: str) -> list[str]:
    out = list(values)
    bad = [i for i, t in enumerate(out) if not isinstance(t, str) or not t.strip()]
    if bad:
        shown = ", ".join(str(i) for i in bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ValueError(f"{what}: {len(bad)} empty or non-text entries (rows {shown}; rows count from 0)")
    return out


def _pair_columns(dataset: Any) -> tuple[str, str]:
    """The anchor and positive columns of a pairs data set: its first two columns the collator embeds."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):
        raise ValueError(f"train_dataset is a DatasetDict (splits {', '.join(names)}); pass one split, e.g. "
                         "ds['train']")
    if names is None:
        raise TypeError(f"train_dataset must be a datasets.Dataset (with column_names), got {type(dataset).__name__}")
    text = [c for c in names if c not in LABEL_COLUMNS]
    if len(text) != 2:
        raise ValueError(f"train_dataset must hold (anchor, positive) pairs: two text columns, got {len(text)} "
                         f"({', '.join(map(repr, text)) or 'none'}); the bank supplies the hard negatives")
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty (no pairs)")
    return text[0], text[1]


def token_keys(tokens: Mapping[str, Tensor]) -> list[TokenKey]:
    """Per row of a token batch (each (B, L)), its token ids without padding: what the encoder sees."""
    ids = tokens["input_ids"].cpu()
    mask = tokens["attention_mask"].cpu().bool() if "attention_mask" in tokens else torch.ones_like(ids, dtype=bool)
    return [tuple(row[m].tolist()) for row, m in zip(ids, mask)]


def _keys_of(texts: Sequence[str], tokenize, batch_size: int = 1024) -> list[TokenKey]:
    return [k for i in range(0, len(texts), batch_size) for k in token_keys(tokenize(texts[i : i + batch_size]))]


# ---------------------------------------------------------------------------------------------- loss
class BankNegativesLoss(nn.Module):
    """Contrastive loss with in-batch and online-mined hard negatives, for ``SentenceTransformerTrainer``.

    Args:
        model: the ``SentenceTransformer`` being trained.
        train_dataset: the (anchor, positive) pairs the trainer trains on (first two columns; label columns
            are skipped as the collator skips them). Read once: positives get document ids, anchors their
            positives (every positive of the same anchor is masked as a negative for it).
        corpus: the documents the bank indexes, any iterable of texts (a list, a ``datasets`` column);
            positives missing from it are added. None = the training positives only.
        bank: bank settings (:class:`~mochi_retrieval.bank.BankSettings`: ``candidates`` stored vectors and
            ``mined_negatives`` re-encoded documents per query, ``refresh_every`` optimiser steps,
            ``max_pos_ratio`` ceiling, ...); None = in-batch negatives only.
        mochi: MoCHi settings (:class:`~mochi_retrieval.loss.MoCHiConfig`), or None.
        temperature: T of the InfoNCE logits (``MultipleNegativesRankingLoss``'s scale 20 is T = 0.05).
        in_batch_negatives: the batch's other documents are negatives too.
        max_neg_pos_ratio: mask every negative scoring above this share of the query's positive score.
        gradient: "query_only" (detached negatives score the query only; the library's rule) or "joint".
        key_encoder: "shared" (documents through the model, with gradient) or "momentum" (a MoCo copy).
        queue_size: a MoCo queue of this many keys (0 = none).
        momentum: EMA coefficient of the momentum key encoder.
        query_prompt, document_prompt: the prompts the trainer's ``args.prompts`` give the anchor and the
            positive column (prepended to the texts; the callback checks that they agree).
        seed: seeds MoCHi's draws per step.

    After each training step ``last_output`` holds the engine's outputs (``pos_logits`` (B,), ``neg_logits``
    (B, M), ``accuracy``, ``q``, ``k`` (B, D), ``monitors``), all detached.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Any,
        corpus: Iterable[str] | None = None,
        *,
        bank: BankSettings | None = None,
        mochi: MoCHiConfig | None = None,
        temperature: float = 0.05,
        in_batch_negatives: bool = True,
        max_neg_pos_ratio: float | None = None,
        gradient: Literal["query_only", "joint"] = "query_only",
        key_encoder: Literal["shared", "momentum"] = "shared",
        queue_size: int = 0,
        momentum: float = 0.999,
        query_prompt: str = "",
        document_prompt: str = "",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.query_prompt, self.document_prompt = query_prompt or "", document_prompt or ""
        self.columns = _pair_columns(train_dataset)
        anchors = _texts(train_dataset[self.columns[0]], f"train_dataset column {self.columns[0]!r}")
        positives = _texts(train_dataset[self.columns[1]], f"train_dataset column {self.columns[1]!r}")
        docs = None if corpus is None else _texts(corpus, "corpus")
        if docs is not None and not docs:
            raise ValueError("corpus is empty: pass the documents the bank should index (or corpus=None for the "
                             "training positives only)")
        encoder = SentenceTransformerEncoder(model)
        self.doc_texts, groups, table, positive_keys = self._doc_space(encoder, docs or [], positives)
        ids = torch.arange(len(self.doc_texts))
        self.engine = _TrainerTextMoCo(
            encoder, groups, key_encoder=key_encoder, queue_size=queue_size, momentum=momentum,
            temperature=temperature, in_batch_negatives=in_batch_negatives, mochi=mochi, bank=bank,
            bank_corpus=BankCorpus(ids, [self.document_prompt + t for t in self.doc_texts]) if bank else None,
            max_neg_pos_ratio=max_neg_pos_ratio, gradient=gradient, doc_families=family_groups(self.doc_texts),
            token_groups=table, seed=seed)
        first: dict[int, int] = {}
        for i, g in enumerate(groups.tolist()):
            first.setdefault(g, i)
        self._doc_of_key: dict[TokenKey, int] = {key: first[g] for key, g in table.items()}
        self._positives_of: dict[TokenKey, set[int]] = {}
        anchor_keys = _keys_of([self.query_prompt + t for t in anchors], encoder.tokenize)
        for key, doc in zip(anchor_keys, positive_keys):
            self._positives_of.setdefault(key, set()).add(self._doc_of_key[doc])
        self._step: int | None = None
        self._epoch, self._micro, self._accum = 0.0, 0, 1
        self.last_output: dict[str, Any] = {}
        logger.info("BankNegativesLoss: %d pairs, %d documents (%d from the corpus)", len(anchors),
                    len(self.doc_texts), len(docs or []))

    def _doc_space(self, encoder: SentenceTransformerEncoder, docs: list[str], positives: list[str]
                   ) -> tuple[list[str], Tensor, dict[TokenKey, int], list[TokenKey]]:
        """The corpus plus the positives it lacks, their groups (N,), the token key -> group table, and the
        token key of every positive."""
        prompt = self.document_prompt
        groups, table = token_groups([prompt + t for t in docs], encoder.tokenize) if docs else \
            (torch.empty(0, dtype=torch.long), {})
        keys = _keys_of([prompt + t for t in positives], encoder.tokenize)
        extra: list[str] = []
        extra_groups: list[int] = []
        for text, key in zip(positives, keys):
            if key not in table:
                table[key] = len(table)
                extra.append(text)
                extra_groups.append(table[key])
        if extra and docs:
            logger.info("BankNegativesLoss: %d training positives are not in the corpus; added to it", len(extra))
        return docs + extra, torch.cat([groups, torch.tensor(extra_groups, dtype=torch.long)]), table, keys

    # ------------------------------------------------------------------ steps (driven by the callback)
    @property
    def encoder(self) -> SentenceTransformerEncoder:
        return self.engine.encoder

    def begin_step(self, step: int, epoch: float) -> bool:
        """Optimiser step ``step`` begins (fractional ``epoch``): the bank's upkeep (a full refresh when due,
        else the rolling slice, if any); returns whether it re-embedded anything."""
        self._step, self._epoch, self._micro = int(step), float(epoch), 0
        if self.engine.bank is None:
            return False
        self.encoder.bind(None)  # not through the trainer's DDP wrapper (see refresh_bank)
        done = len(self.engine.refresh_log)
        rolling = self.engine.bank_seconds["rolling"]
        self.engine.upkeep(self._step)
        return len(self.engine.refresh_log) > done or self.engine.bank_seconds["rolling"] > rolling

    def refresh_bank(self, step: int) -> None:
        """Re-embed the corpus into the bank (each process a slice). Not through the trainer's DDP wrapper:
        processes may embed different numbers of batches, which a DDP forward's collectives cannot take."""
        self.encoder.bind(None)
        self.engine.refresh_bank(step)

    def configure(self, args: Any) -> None:
        """Read the trainer's arguments: gradient accumulation, and check that the prompts agree."""
        self._accum = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        self.engine.steps_per_update = self._accum  # staleness stamps and monitors count optimiser steps
        prompts = getattr(args, "prompts", None)
        for column, mine, name in ((self.columns[0], self.query_prompt, "query_prompt"),
                                   (self.columns[1], self.document_prompt, "document_prompt")):
            theirs = _prompt_for(prompts, column)
            if (theirs or "") != mine:
                raise ValueError(f"the trainer's args.prompts give column {column!r} the prompt {theirs!r}, but "
                                 f"BankNegativesLoss was built with {name}={mine!r}; build it with "
                                 f"{name}={theirs or ''!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """sentence_features: the collator's token batches of the anchor and positive columns (each (B, L))."""
        features = list(sentence_features)
        if len(features) != 2:
            raise ValueError(f"BankNegativesLoss trains on (anchor, positive) pairs; the batch has {len(features)} "
                             "text columns")
        self.encoder.bind(self.model)  # the trainer may have swapped in a DDP-wrapped model
        if not torch.is_grad_enabled():
            return self._in_batch_loss(*features)
        if self._step is None:
            raise RuntimeError("BankNegativesLoss needs its callback: SentenceTransformerTrainer(..., "
                               "callbacks=[BankRefreshCallback(loss)])")
        query, positive = features
        device = query["input_ids"].device
        ids = self._positive_ids(positive).to(device)
        exclude = self._exclusions(query, ids).to(device)
        step = self._step * self._accum + self._micro
        self._micro += 1
        out = self.engine(query, positive, ids, exclude, epoch=self._epoch, step=step)
        self.last_output = {k: v for k, v in out.items() if k != "loss"}
        return out["loss"]

    def _positive_ids(self, positive: Mapping[str, Tensor]) -> Tensor:
        """(B,) document id of each positive, found by its token ids."""
        keys = token_keys(positive)
        ids = [self._doc_of_key.get(k, -1) for k in keys]
        if -1 in ids:
            row = ids.index(-1)
            text = self.encoder.st.tokenizer.decode(list(keys[row])) if hasattr(self.encoder.st, "tokenizer") else ""
            raise ValueError(f"{ids.count(-1)} positives of this batch are not in the loss's documents (row {row}: "
                             f"{text[:80]!r}): build BankNegativesLoss with the train_dataset the trainer trains on, "
                             "document_prompt equal to the prompt of args.prompts for the positive column, and "
                             "after setting the model's max_seq_length (the texts must tokenise as in training)")
        return torch.tensor(ids, dtype=torch.long)

    def _exclusions(self, query: Mapping[str, Tensor], ids: Tensor) -> Tensor:
        """(B, E) every positive id of each anchor (its own included), -1 padded."""
        sets = [self._positives_of.get(k, set()) | {i} for k, i in zip(token_keys(query), ids.tolist())]
        out = torch.full((len(sets), max(len(s) for s in sets)), -1, dtype=torch.long)
        for r, s in enumerate(sets):
            out[r, : len(s)] = torch.tensor(sorted(s), dtype=torch.long)
        return out

    def _in_batch_loss(self, query: Mapping[str, Tensor], positive: Mapping[str, Tensor]) -> Tensor:
        """Evaluation: InfoNCE over the batch's documents at the same temperature; the bank is left alone."""
        q = F.normalize(self.encoder(query).float(), dim=1)  # (B, D)
        d = F.normalize(self.encoder(positive).float(), dim=1)  # (B, D)
        logits = q @ d.T / self.temperature  # (B, B)
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))

    # ------------------------------------------------------------------ model card
    def get_config_dict(self) -> dict[str, Any]:
        bank = self.engine.bank_settings
        return {"temperature": self.temperature, "bank": None if bank is None else vars(bank),
                "mochi": None if self.engine.mochi is None else vars(self.engine.mochi),
                "documents": len(self.doc_texts)}

    @property
    def citation(self) -> str:
        return """@inproceedings{kalantidis2020hard,
    title={Hard Negative Mixing for Contrastive Learning},
    author={Kalantidis, Yannis and Sariyildiz, Mert Bulent and Pion, Noe and Weinzaepfel, Philippe and Larlus, Diane},
    booktitle={Advances in Neural Information Processing Systems},
    year={2020}
}"""


def _prompt_for(prompts: Any, column: str) -> str | None:
    """The prompt ``args.prompts`` gives a column (a str for every column, or a column -> prompt dict)."""
    if not prompts:
        return None
    if isinstance(prompts, str):
        return prompts
    if isinstance(prompts, Mapping):
        if any(isinstance(v, Mapping) for v in prompts.values()):
            raise ValueError("BankNegativesLoss does not support per-dataset prompts (a nested args.prompts)")
        return prompts.get(column)
    return None


def read_pairs_jsonl(path: str | Path, query_column: str = "query", positive_column: str = "positive"):
    """A pairs file (JSON lines, CSV/TSV or Parquet, read as our trainer reads it) -> a ``datasets.Dataset``
    with the columns ``query_column``, ``positive_column`` (in that order, as the trainer reads them).
    Errors name the file and, for a malformed line, the line (lines count from 1)."""
    from datasets import Dataset

    from ..data.text_pairs import TextPairs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    pairs = TextPairs.from_file(path, query_column, positive_column)
    return Dataset.from_dict({query_column: [ex.query for ex in pairs.examples],
                              positive_column: [ex.positive for ex in pairs.examples]})


def read_beir_corpus(path: str | Path) -> list[str]:
    """The document texts of a documents file (a BEIR ``corpus.jsonl``, ``{"_id", "title", "text"}`` a line,
    each ``(title + " " + text).strip()`` as BEIR encodes them; or one text a line), as our
    ``bank.corpus=PATH`` reads it. Errors name the file and the line."""
    from ..data.documents import load_documents

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    return load_documents(path)[1]


# ---------------------------------------------------------------------------------------------- state
def bank_state(loss: BankNegativesLoss) -> dict[str, Tensor]:
    """What a resumed run needs besides the trainer's checkpoint: the bank's rows and the engine's own state
    (queue, momentum key encoder, ...), without the SentenceTransformer's weights. Tensors only."""
    engine = loss.engine
    model_tensors = {t.data_ptr() for t in loss.model.state_dict().values() if t.numel()}
    state = {f"engine.{k}": v.detach().cpu() for k, v in engine.state_dict().items()
             if not (v.numel() and v.data_ptr() in model_tensors)}
    if engine.bank is not None and len(engine.bank):
        state.update({f"bank.{k}": v for k, v in engine.bank.state_dict().items()})
    return state


def load_bank_state(loss: BankNegativesLoss, state: Mapping[str, Tensor]) -> None:
    """Restore a :func:`bank_state` into ``loss`` (built with the same data and settings)."""
    engine = loss.engine
    own = {k[len("engine."):]: v for k, v in state.items() if k.startswith("engine.")}
    result = engine.load_state_dict(own, strict=False)
    saved_with = set(bank_state(loss))
    missing = [k for k in result.missing_keys if f"engine.{k}" in saved_with]
    if missing or result.unexpected_keys:
        raise ValueError(f"bank state does not fit this loss: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]} (was it saved with other settings?)")
    bank = {k[len("bank."):]: v for k, v in state.items() if k.startswith("bank.")}
    if engine.bank is not None and bank:
        if bank["embeddings"].shape[0] != len(loss.doc_texts):
            raise ValueError(f"bank state holds {bank['embeddings'].shape[0]} documents, this loss "
                             f"{len(loss.doc_texts)} (another corpus?)")
        engine.bank.load_state_dict(bank)


def save_bank_state(loss: BankNegativesLoss, folder: str | Path, step: int) -> Path:
    """Write :func:`bank_state` (and ``step``) to ``folder/mochi_bank_state.pt`` atomically."""
    path = Path(folder) / BANK_STATE_FILE
    state = {**bank_state(loss), "step": torch.tensor(step)}
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def read_bank_state(path: str | Path) -> dict[str, Tensor]:
    """Read a file written by :func:`save_bank_state`."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- callback
class BankRefreshCallback(TrainerCallback):
    """Keeps a :class:`BankNegativesLoss`'s bank fresh inside ``SentenceTransformerTrainer``.

    - ``on_train_begin``: reads the trainer's arguments; embeds the corpus (the initial pass), or, in a run
      resumed from a checkpoint, loads the bank that checkpoint holds;
    - ``on_step_begin``: refreshes the bank every ``bank.refresh_every`` optimiser steps;
    - ``on_save``: writes the bank into the checkpoint folder (``mochi_bank_state.pt``).

    Args:
        loss: the loss given to the trainer.
        resume_from: the checkpoint folder a resumed run starts from, when it is neither
            ``args.resume_from_checkpoint`` nor ``OUTPUT_DIR/checkpoint-STEP`` (found automatically).
    """

    def __init__(self, loss: BankNegativesLoss, resume_from: str | Path | None = None) -> None:
        self.loss, self.resume_from = loss, resume_from

    def on_train_begin(self, args, state, control, **kwargs):
        self.loss.configure(args)
        if state.global_step > 0:
            path = self._checkpoint_file(args, state.global_step)
            saved = read_bank_state(path)
            if int(saved.get("step", -1)) != state.global_step:
                raise ValueError(f"{path} was written at step {int(saved.get('step', -1))}, the run resumes at "
                                 f"step {state.global_step}")
            load_bank_state(self.loss, saved)
            logger.info("bank state loaded from %s (step %d)", path, state.global_step)
        elif self.loss.engine.bank is not None:
            self.loss.refresh_bank(0)  # the initial pass

    def _checkpoint_file(self, args, step: int) -> Path:
        folders = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                   os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")]
        tried = [Path(f) / BANK_STATE_FILE for f in folders if isinstance(f, (str, Path)) and f]
        for path in tried:
            if path.is_file():
                return path
        raise FileNotFoundError(f"the run resumes at step {step} but no bank state was found (looked for "
                                f"{', '.join(map(str, tried))}); pass BankRefreshCallback(loss, resume_from=FOLDER)")

    def on_step_begin(self, args, state, control, **kwargs):
        self.loss.begin_step(state.global_step, state.epoch or 0.0)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_bank_state(self.loss, folder, state.global_step)


__all__ = ["BANK_STATE_FILE", "BankNegativesLoss", "BankRefreshCallback", "SentenceTransformerEncoder",
           "bank_state", "load_bank_state", "read_bank_state", "read_beir_corpus", "read_pairs_jsonl",
           "save_bank_state", "token_keys"]
