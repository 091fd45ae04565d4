"""Encoding helpers shared by training (bank refreshes) and evaluation: texts in, unit rows out."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mochi_retrieval.search import l2_normalize

EncodeFn = Callable[[list[str]], Tensor]


def encode_in_batches(encode: EncodeFn, texts: Sequence[str], batch_size: int, desc: str, progress: bool) -> Tensor:
    """Encode ``texts`` in batches of similar length (less padding), in the original order.

    Returns:
        (len(texts), D) float32 on the CPU, unit rows.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
            emb = encode([texts[j] for j in order[i : i + batch_size]])
            out.append(l2_normalize(emb.detach()).cpu())
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[torch.tensor(order, dtype=torch.int64)] = emb
    return result


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout, BatchNorm running statistics) for the block, then back to the mode
    it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
