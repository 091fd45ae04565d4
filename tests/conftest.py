"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- tiny offline text model (used by tests/test_encoders.py and others) ---

TINY_TEXT_WORDS = (
    "the a an cat dog bird fish sat ran flew swam on in under mat house tree big small red blue "
    "fast slow quick brown fox jumps over lazy and of to is was query document package library"
).split()


@pytest.fixture
def tiny_text_model_dir(tmp_path: Path) -> Path:
    """A folder with a tiny random BertModel and a WordLevel tokenizer, saved with save_pretrained.

    Vocabulary: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 then TINY_TEXT_WORDS
    (unknown words map to [UNK]); sequences are "[CLS] words [SEP]".
    Model: hidden 32, 2 layers, 2 heads, 64 positions. Built offline in well
    under a second; the global RNG is left untouched.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(TINY_TEXT_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    path = tmp_path / "tiny_text_model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- tiny Fashion-MNIST-format data set (used by the training tests) ---


def write_idx_gz(path: Path, array) -> None:
    """Write a uint8 numpy array as a gzipped idx file (the Fashion-MNIST format)."""
    import gzip

    import numpy as np

    magic = 2049 if array.ndim == 1 else 2051
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_tiny_fmnist(root: Path, n_train: int = 192, n_test: int = 64, seed: int = 0) -> Path:
    """Class-structured 28x28 grey images: class c is a bright bar at row 2c plus noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 2 : 2 * c + 5, 4:24] = 230
        write_idx_gz(root / f"{split}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx_gz(root / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


@pytest.fixture
def tiny_fmnist_dir(tmp_path: Path) -> Path:
    return make_tiny_fmnist(tmp_path / "fmnist")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test may build its own Accelerator (say, another mixed precision): accelerate
    keeps one process-wide state, which a real run sets once per process."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
