"""The training program's config schema: what ``python -m mochi_retrieval.train CONFIG.yaml`` reads.

Sections that configure the library are the library's own settings dataclasses, checked where they are
defined: ``moco`` is :class:`~mochi_retrieval.core.MoCoConfig`, ``mochi`` and ``bank`` add an ``enabled``
switch to :class:`~mochi_retrieval.loss.MoCHiConfig` and :class:`~mochi_retrieval.bank.BankSettings`.
The other sections (model, data, train, eval) belong to the program. :class:`ExperimentConfig` checks only
what spans sections (e.g. MoCHi's pool against the negatives a query sees).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..bank import BankSettings
from ..core import MoCoConfig
from ..errors import ConfigValueError, require
from ..false_negatives import FalseNegativeConfig
from ..loss import MoCHiConfig

__all__ = ["BankSection", "DataConfig", "EvalConfig", "ExperimentConfig", "FalseNegativeConfig", "MoCHiSection",
           "MoCoConfig", "ModelConfig", "TEXT_DATASETS", "TrainConfig"]


@dataclass
class ModelConfig:
    """Encoder and projection head."""

    encoder: str = "resnet18"
    """Registry name of the encoder."""
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    """Free-form keyword arguments passed to the encoder factory."""
    head_hidden_dim: int = 2048
    """Hidden width of the MLP projection head."""
    head_out_dim: int = 128
    """Output (embedding) dimension of the projection head."""
    head_layers: int = 2
    """Number of linear layers in the projection head (1 = a single linear map)."""
    key_encoder: Literal["momentum", "shared"] = "momentum"
    """Key encoder: a momentum (EMA) copy of the query encoder, or the same weights."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm in distributed runs."""
    shuffle_bn: bool = True
    """Shuffle the key batch (across ranks; within the process when ``bn_splits`` > 1) so BatchNorm cannot
    leak the positive."""
    bn_splits: int = 1
    """Images: normalise each process's queries and keys in this many sub-batches with their own BatchNorm
    statistics, as this many GPUs would (MoCo's single-GPU demo uses 8; one pass of the network, split
    BatchNorm layers). In one process, shuffle BN needs it > 1; the batch per process must hold at least 2
    images per split."""
    grad_cache_chunk: Optional[int] = None
    """Text: encode a step's texts in chunks of this many with GradCache (same gradient, memory of one
    chunk, one extra forward pass); null = one pass. One process only."""

    def __post_init__(self) -> None:
        require(bool(self.encoder), "encoder", "a non-empty name", self.encoder)
        require(self.grad_cache_chunk is None or self.grad_cache_chunk >= 1, "grad_cache_chunk", ">= 1 or null",
                 self.grad_cache_chunk)
        require(self.bn_splits >= 1, "bn_splits", ">= 1", self.bn_splits)
        require(self.head_hidden_dim > 0, "head_hidden_dim", "> 0", self.head_hidden_dim)
        require(self.head_out_dim > 0, "head_out_dim", "> 0", self.head_out_dim)
        require(self.head_layers >= 1, "head_layers", ">= 1", self.head_layers)


TEXT_DATASETS = ("text_pairs", "debian")


@dataclass
class DataConfig:
    """Training data and augmentation."""

    dataset: Literal["fashion_mnist", "imagefolder", "text_pairs", "debian"] = "fashion_mnist"
    """Which dataset loader to use. Text: "text_pairs" (a BEIR folder, or a .jsonl/.csv/.parquet
    pairs file, at ``root``) or "debian" (the Debian descriptions BEIR folder at ``root``, built
    from apt's translation files on first use)."""
    root: str = "/usr/share/datasets/fashion-mnist"
    """Folder holding the data."""
    class_list: Optional[str] = None
    """File of class folder names, one a line (e.g. the ImageNet-100 subset); None = all."""
    image_size: int = 32
    """Side of the square crops fed to the encoder, in pixels."""
    augmentation: Literal["mocov2", "mocov2_small_grey"] = "mocov2_small_grey"
    """Augmentation recipe: MoCo-v2 aug+, or its variant for small grey images."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Random resized crop: range of the crop's area as a share of the image (MoCo-v2: 0.2 to 1). Small
    images lose their class at small crops; Fashion-MNIST uses a larger lower bound."""
    blur_prob: float = 0.5
    """Probability of the Gaussian blur (MoCo-v2: 0.5; 0 turns it off)."""
    jitter: float = 0.4
    """Colour-jitter strength: brightness, contrast and saturation factors in [1 - j, 1 + j], hue j / 4
    (MoCo-v2: 0.4, applied with probability 0.8; 0 turns it off)."""
    num_workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    skip_corrupt_images: bool = False
    """Image folders: replace an image file that cannot be decoded by the next one (logged and counted)
    instead of stopping with an error that names it."""
    limit: Optional[int] = None
    """Use only N training items (images: the first N; text: N pairs drawn with the seed); None = all."""
    split: str = "train"
    """Text, BEIR folders: the qrels split to train on."""
    query_prefix: str = ""
    """Text: prepended to every query (asymmetric models, e.g. "query: ")."""
    document_prefix: str = ""
    """Text: prepended to every document (e.g. "passage: ")."""
    query_column: str = "query"
    """Text pairs files: the query column."""
    positive_column: str = "positive"
    """Text pairs files: the positive document column."""
    negative_column: str = "negative"
    """Text pairs files: hard negatives, one column (text or list) or NAME_1..NAME_n."""

    @property
    def is_text(self) -> bool:
        return self.dataset in TEXT_DATASETS

    def __post_init__(self) -> None:
        require(bool(self.split), "split", "a non-empty split name", self.split)
        require(self.image_size > 0, "image_size", "> 0", self.image_size)
        require(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        require(self.limit is None or self.limit > 0, "limit", "> 0 or null", self.limit)
        lo, hi = self.crop_scale
        require(0.0 < lo <= hi <= 1.0, "crop_scale", "[low, high] with 0 < low <= high <= 1", list(self.crop_scale))
        require(0.0 <= self.blur_prob <= 1.0, "blur_prob", "in [0, 1]", self.blur_prob)
        require(0.0 <= self.jitter < 1.0, "jitter", "in [0, 1)", self.jitter)


@dataclass(frozen=True)
class MoCHiSection(MoCHiConfig):
    """The ``mochi`` section: MoCHi's own settings (:class:`~mochi_retrieval.loss.MoCHiConfig`, where each value
    is documented and checked) and a switch."""

    enabled: bool = True
    """Append synthetic hard negatives to the logits."""
    warmup_epochs: float = 15.0
    """Epochs of plain MoCo before mixing starts (an early queue is near random; the paper's ImageNet runs)."""

    def settings(self) -> MoCHiConfig | None:
        """The library's settings, or None when the section is off."""
        return self if self.enabled else None


@dataclass(frozen=True)
class BankSection(BankSettings):
    """The ``bank`` section: the FAISS bank's own settings (:class:`~mochi_retrieval.bank.BankSettings`, where
    each value is documented and checked) and a switch."""

    enabled: bool = False
    """Add the bank's candidates to each query's negatives (and MoCHi's hard pool)."""

    def settings(self) -> BankSettings | None:
        """The library's settings, or None when the section is off."""
        return self if self.enabled else None


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpoints."""

    epochs: int = 200
    """Number of passes over the training data."""
    max_steps: Optional[int] = None
    """Stop after this many optimiser steps (overrides ``epochs`` when smaller); None = no cap."""
    batch_size: int = 256
    """Global batch size (summed over processes)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """Optimiser."""
    lr: float = 0.03
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    weight_decay: float = 1e-4
    """Weight decay."""
    warmup_epochs: float = 0.0
    """Linear learning-rate warm-up, in epochs."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: Optional[float] = None
    """Clip the gradient norm to this before each optimiser step; None = no clipping (1.0 is usual for text)."""
    weight_decay_1d: bool = True
    """Weight decay on 1-D parameters (biases, norm scales) too, as MoCo does; false as in BERT fine-tuning."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Mixed precision mode, as accelerate names it."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    log_every: int = 50
    """Log training numbers every this many steps."""
    diagnostics_every: int = 200
    """Compute the costlier diagnostics (e.g. negative hardness) every this many steps."""
    checkpoint_every_epochs: int = 1
    """Write a checkpoint every this many epochs."""
    checkpoint_every_steps: Optional[int] = None
    """Also write a checkpoint every this many optimiser steps; None = only per epoch (and at the end)."""
    checkpoint_every_minutes: Optional[float] = None
    """Also write a checkpoint when this many minutes have passed since the last one; None = off."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (``checkpoints/step-N.pt``); ``checkpoints/last.pt`` links the newest."""
    resume: bool = True
    """Resume from the latest checkpoint in ``output_dir`` when there is one."""
    keep_host_memory: bool = True
    """Keep freed host memory in the process (glibc malloc thresholds, see
    :mod:`mochi_retrieval.training.host_memory`) rather than returning it to the OS each step, so steps do not
    fault their pages in again; no effect off Linux/glibc. Results are the same either way."""
    dist_timeout_minutes: float = 30.0
    """Several processes: give up on a collective after this long (a process died or hangs) and stop with a
    message. It must exceed what the main process does alone, such as the kNN monitor and checkpoint writes."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum_steps", "log_every", "diagnostics_every",
                    "checkpoint_every_epochs", "keep_checkpoints"):
            require(getattr(self, key) >= 1, key, ">= 1", getattr(self, key))
        require(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1, "checkpoint_every_steps",
                 ">= 1 or null", self.checkpoint_every_steps)
        require(self.checkpoint_every_minutes is None or self.checkpoint_every_minutes > 0,
                 "checkpoint_every_minutes", "> 0 or null", self.checkpoint_every_minutes)
        require(self.dist_timeout_minutes > 0, "dist_timeout_minutes", "> 0", self.dist_timeout_minutes)
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1 or null", self.max_steps)
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(0.0 <= self.momentum <= 1.0, "momentum", "in [0, 1]", self.momentum)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 or null",
                 self.max_grad_norm)
        require(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    knn_k: int = 200
    """Neighbours voting in the kNN classifier."""
    knn_temperature: float = 0.1
    """Temperature of the kNN similarity weights exp(s / t)."""
    knn_every_epochs: int = 1
    """Run the kNN evaluation every this many epochs."""
    knn_train_limit: Optional[int] = None
    """Use only the first N training items as the kNN memory bank; None = all."""
    linear_probe: bool = True
    """Train a linear probe on frozen features after training."""
    limit: Optional[int] = None
    """Final evaluation on the first N train and N test items only (quick runs); None = all.
    Text: the first N queries of the split."""
    split: str = "test"
    """Text: the BEIR split evaluated after training."""
    corpus: Literal["split", "all"] = "split"
    """Text: search the documents judged in that split only, or the whole corpus."""
    recall_ks: tuple[int, ...] = (1, 10, 100)
    """Text: cut-offs of recall@k (MRR@10 and nDCG@10 are always reported)."""
    batch_size: int = 64
    """Text: texts per forward pass when encoding for evaluation."""

    def __post_init__(self) -> None:
        require(bool(self.split), "split", "a non-empty split name", self.split)
        require(len(self.recall_ks) > 0 and min(self.recall_ks) >= 1, "recall_ks", "cut-offs >= 1", self.recall_ks)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.limit is None or self.limit >= 1, "limit", ">= 1 or null", self.limit)
        require(self.knn_k >= 1, "knn_k", ">= 1", self.knn_k)
        require(self.knn_temperature > 0, "knn_temperature", "> 0", self.knn_temperature)
        require(self.knn_every_epochs >= 1, "knn_every_epochs", ">= 1", self.knn_every_epochs)
        require(self.knn_train_limit is None or self.knn_train_limit >= 1, "knn_train_limit", ">= 1 or null",
                 self.knn_train_limit)


@dataclass
class ExperimentConfig:
    """A whole training run: the file ``python -m mochi_retrieval.train CONFIG.yaml`` reads."""

    name: str = "experiment"
    """Run name, used in logs."""
    output_dir: str = "runs/experiment"
    """Folder for checkpoints, logs and the resolved config."""
    seed: int = 0
    """Random seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder and projection head."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and augmentation."""
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    """MoCo queue, momentum, temperature and negatives (the contrastive core's settings)."""
    mochi: MoCHiSection = field(default_factory=MoCHiSection)
    """MoCHi hard negative mixing."""
    bank: BankSection = field(default_factory=BankSection)
    """FAISS hard-negative bank."""
    false_negatives: FalseNegativeConfig = field(default_factory=FalseNegativeConfig)
    """Images: label-free false-negative handling in the queue (support-view detection with elimination or
    attraction, or the nearest-neighbour positive)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and bookkeeping."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "a non-empty string", self.name)
        require(bool(self.output_dir), "output_dir", "a non-empty path", self.output_dir)
        if not self.data.is_text:
            require(self.moco.queue_size > 0, "moco.queue_size", "> 0 for image runs", self.moco.queue_size)
            require(self.train.batch_size >= 2 * self.model.bn_splits, "model.bn_splits",
                     f"at most half of train.batch_size ({self.train.batch_size}): 2 images per BatchNorm group",
                     self.model.bn_splits)
            require(not self.model.sync_bn or self.model.bn_splits == 1, "model.bn_splits",
                    "1 with model.sync_bn (SyncBatchNorm normalises over all processes' batches; splitting it "
                    "would undo that)", self.model.bn_splits)
            require(not self.bank.enabled or self.bank.refresh_every == 0, "bank.refresh_every",
                     "0 for image runs (an image bank is kept fresh by each batch's keys)", self.bank.refresh_every)
            require(not self.bank.enabled or self.bank.update_with_keys, "bank.update_with_keys",
                     "true for image runs (the keys are what fills an image bank)", self.bank.update_with_keys)
            require(not self.bank.enabled or self.bank.mined_negatives == 0, "bank.mined_negatives",
                     "0 for image runs (re-encoding mined texts is a text feature)", self.bank.mined_negatives)
            require(not self.bank.enabled or self.bank.candidates >= 1, "bank.candidates", ">= 1 for image runs",
                     self.bank.candidates)
            require(not self.bank.enabled or not self.bank.shard, "bank.shard",
                     "false for image runs (an image bank is the training set's keys, kept whole)", self.bank.shard)
        if self.data.is_text:
            require(self.model.bn_splits == 1, "model.bn_splits", "1 for text runs (text encoders have no BatchNorm)",
                     self.model.bn_splits)
            require(not self.moco.symmetric, "moco.symmetric", "false for text runs (an image option)",
                     self.moco.symmetric)
            require(not self.moco.false_negative_clusters, "moco.false_negative_clusters",
                    "0 for text runs (an image option)", self.moco.false_negative_clusters)
        fn = self.false_negatives
        if fn.enabled:
            require(not self.data.is_text, "false_negatives.handling", "'none' for text runs (an image option)",
                    fn.handling)
            require(fn.top_k < self.moco.queue_size, "false_negatives.top_k",
                    f"< moco.queue_size ({self.moco.queue_size})", fn.top_k)
        if self.data.is_text and not (self.moco.in_batch_negatives or self.moco.queue_size or self.bank.enabled):
            raise ConfigValueError("moco.in_batch_negatives", "no negatives left: enable in-batch negatives, "
                                   "the queue (moco.queue_size > 0) or the bank (bank.enabled)")
        m = self.mochi
        if not m.enabled:
            return
        # MoCHi's pool is drawn from every negative a query sees.
        pool = self.moco.queue_size
        pool += self.bank.candidates * self.bank.enabled
        if self.data.is_text:
            pool += self.bank.mined_negatives * self.bank.enabled * self.train.batch_size
            pool += (self.train.batch_size - 1) * self.moco.in_batch_negatives
        require(m.n_hard <= pool, "mochi.n_hard",
                 f"<= the negatives per query ({pool}: moco.queue_size"
                + (" + in-batch" if self.data.is_text else "")
                + (" + bank.candidates" if self.bank.enabled else "") + ") when mochi.enabled", m.n_hard)
