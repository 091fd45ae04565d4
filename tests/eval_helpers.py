"""Builders for the evaluation tests: a tiny BEIR folder, a tiny random BERT folder,
a tiny run folder of our trainer, and tiny image data sets."""

from __future__ import annotations

import gzip
import json
import random
import struct
from pathlib import Path

import numpy as np
import torch

WORDS = [f"w{i}" for i in range(60)]


def make_tiny_bert(folder: Path, hidden: int = 32, **config: object) -> Path:
    """Save a random 2-layer BERT with a WordLevel tokenizer (no download) to ``folder``.

    ``config`` overrides BertConfig fields (say ``num_hidden_layers=6``, ``hidden_dropout_prob=0.0``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=64)
    torch.manual_seed(0)
    cfg = BertConfig(**{"vocab_size": len(vocab), "hidden_size": hidden, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64, **config})
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_tiny_beir(folder: Path, n_queries: int = 12, n_distractors: int = 40, seed: int = 0) -> Path:
    """A BEIR folder where document ``dq<i>`` repeats query ``q<i>`` word for word
    (grade 2), so any deterministic encoder ranks it first; ``q0`` also has a
    second, unrelated relevant document (grade 1)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    queries = {f"q{i}": _sentence(rng) for i in range(n_queries)}
    corpus = [{"_id": f"dq{i}", "title": "", "text": t} for i, t in enumerate(queries.values())]
    corpus += [{"_id": f"x{i}", "title": "t", "text": _sentence(rng, 8)} for i in range(n_distractors)]
    rng.shuffle(corpus)
    with (folder / "corpus.jsonl").open("w") as f:
        f.writelines(json.dumps(d) + "\n" for d in corpus)
    with (folder / "queries.jsonl").open("w") as f:
        f.writelines(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items())
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\tdq{i}\t2" for i in range(n_queries)] + ["q0\tx0\t1"]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def make_run_folder(folder: Path, encoder: str = "resnet18", encoder_kwargs: dict | None = None,
                    data: dict | None = None) -> Path:
    """A run folder as the trainer writes it: config.yaml + encoder.pt."""
    from mochi_retrieval.config import ExperimentConfig, from_dict, save_config
    from mochi_retrieval.encoders import create_encoder

    kwargs = encoder_kwargs if encoder_kwargs is not None else {"in_channels": 1, "small_images": True}
    cfg = from_dict(ExperimentConfig, {"model": {"encoder": encoder, "encoder_kwargs": kwargs},
                                       "data": data or {"image_size": 28}, "output_dir": str(folder)})
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    torch.manual_seed(0)
    enc = create_encoder(encoder, **kwargs)
    torch.save({"encoder": enc.state_dict()}, folder / "encoder.pt")
    return folder


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images (N, H, W) uint8 and labels (N,) as gzipped idx files."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def make_tiny_fashion_mnist(folder: Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """Fake Fashion-MNIST: 3 classes of blobs at class-specific places (easy to separate)."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            r = 4 + 8 * int(y)
            images[i, r : r + 6, 4:24] = 255
        return images, labels

    write_idx(folder, "train", *split(n_train))
    write_idx(folder, "t10k", *split(n_test))
    return folder


def make_tiny_voc(folder: Path, n_train: int = 16, n_test: int = 6, canvas: int = 64, seed: int = 0) -> Path:
    """A VOC-format folder (``VOC2007`` with trainval and test) of Fashion-MNIST items
    (trousers, sneakers, bags) pasted on noisy grey canvases, one or two per image, with
    tight boxes. Uses the real Fashion-MNIST when installed, else fake items."""
    from PIL import Image

    from mochi_retrieval.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist, missing_files

    names = {1: "trouser", 7: "sneaker", 8: "bag"}
    if missing_files(DEFAULT_ROOT):
        rng0 = np.random.default_rng(seed)
        items = [(np.pad(np.full((8 + 4 * c, 20 - c), 200, np.uint8), 4), c) for c in names for _ in range(5)]
        items = [(np.pad(im, ((0, 28 - im.shape[0]), (0, 28 - im.shape[1]))), c) for im, c in items]
        rng0.shuffle(items)
    else:
        x, y = load_fashion_mnist(DEFAULT_ROOT, "test")
        items = [(x[i].numpy(), int(y[i])) for i in range(300) if int(y[i]) in names]
    rng = np.random.default_rng(seed)
    root = folder / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = {"trainval": [], "test": []}
    for n, split in enumerate(["trainval"] * n_train + ["test"] * n_test):
        img = rng.integers(0, 30, (canvas, canvas)).astype(np.uint8)
        objs = []
        slots = [(2, 2), (canvas - 30, canvas - 30)]
        for k in range(1 + n % 2):
            item, label = items[int(rng.integers(len(items)))]
            oy, ox = slots[k]
            img[oy : oy + 28, ox : ox + 28] = np.maximum(img[oy : oy + 28, ox : ox + 28], item)
            rows, cols = np.nonzero(item > 20)
            # VOC boxes: 1-based inclusive pixel coordinates
            objs.append((names[label], ox + cols.min() + 1, oy + rows.min() + 1, ox + cols.max() + 1,
                         oy + rows.max() + 1))
        image_id = f"{n:06d}"
        Image.fromarray(img).convert("RGB").save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        xml_objs = "".join(
            f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
            f"<xmax>{cc}</xmax><ymax>{d}</ymax></bndbox></object>" for c, a, b, cc, d in objs)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{canvas}</width>"
            f"<height>{canvas}</height><depth>3</depth></size>{xml_objs}</annotation>")
        ids[split].append(image_id)
    for split, lst in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(lst) + "\n")
    return folder


TINY_DETECTION_YAML = """\
train_sets: [VOC2007/trainval]
test_sets: [VOC2007/test]
classes: null
iterations: 4
batch_size: 2
lr: 0.01
warmup_iters: 2
lr_steps: [100]
train_min_sizes: [64]
test_min_size: 64
max_size: 64
anchor_sizes: [8, 16, 32, 64, 128]
num_workers: 0
log_every: 1
score_threshold: 0.0
fpn_channels: 32
box_head_dim: 64
rpn_batch_size_per_image: 64
box_batch_size_per_image: 64
"""
