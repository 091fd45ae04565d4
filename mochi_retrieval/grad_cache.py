"""GradCache (Gao et al., 2021): a contrastive batch larger than memory, with the same gradient.

The encoder runs over the batch in chunks without building a graph; the loss is
computed on those embeddings as leaves; in backward each chunk is encoded again,
this time with a graph, and back-propagated with its cached embedding gradient.
Dropout draws are replayed (the RNG state of each chunk is saved), so the
gradient equals that of one big forward pass, to float rounding. This is what
sentence-transformers' ``CachedMultipleNegativesRankingLoss`` does.

Usage inside one training step::

    cache = GradCache(chunk_size=16)
    q = cache.embed(encoder, query_tokens)      # (B, D) leaf, no graph
    d = cache.embed(encoder, doc_tokens)        # (B', D)
    loss = cache.attach(my_loss(q, d))          # backward() replays the chunks
    loss.backward()

Memory peaks at one chunk's activations instead of the batch's. Cost: one extra
forward pass. Not supported under DDP (several backward passes per step would
each mark the parameters ready), which :class:`GradCache` refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TokenBatch = Mapping[str, Tensor]


def split_tokens(tokens: TokenBatch, chunk_size: int) -> list[dict[str, Tensor]]:
    """A token batch of (B, L) tensors -> chunks of at most ``chunk_size`` rows."""
    n = next(iter(tokens.values())).shape[0]
    return [{k: v[i : i + chunk_size] for k, v in tokens.items()} for i in range(0, n, chunk_size)]


@dataclass
class _Chunk:
    net: nn.Module
    tokens: dict[str, Tensor]
    rng: tuple[Tensor, Tensor | None]
    autocast: tuple[bool, torch.dtype]
    rows: slice


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class GradCache:
    """Chunked embedding with a replayed backward; see the module docstring.

    Args:
        chunk_size: rows per forward pass; None = plain forward with a graph.
    """

    def __init__(self, chunk_size: int | None) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.chunk_size = chunk_size
        self._leaves: list[Tensor] = []
        self._chunks: list[list[_Chunk]] = []

    @property
    def active(self) -> bool:
        return self.chunk_size is not None

    def embed(self, net: nn.Module, tokens: TokenBatch) -> Tensor:
        """(B, D) unit embeddings of ``tokens``: with a graph, or (chunked) a leaf that needs :meth:`attach`."""
        if not self.active:
            return F.normalize(net(tokens).float(), dim=1)
        device = next(iter(tokens.values())).device
        outs, chunks, start = [], [], 0
        for part in split_tokens(tokens, self.chunk_size):
            rng = _rng_state(device)
            autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
            with torch.no_grad():
                outs.append(F.normalize(net(part).float(), dim=1))
            rows = slice(start, start + outs[-1].shape[0])
            chunks.append(_Chunk(net, part, rng, autocast, rows))
            start = rows.stop
        leaf = torch.cat(outs).requires_grad_(torch.is_grad_enabled())
        if leaf.requires_grad:
            self._leaves.append(leaf)
            self._chunks.append(chunks)
        return leaf

    def attach(self, loss: Tensor) -> Tensor:
        """Return ``loss`` as a tensor whose backward replays every chunk (identity when not chunked)."""
        if not self.active or not self._leaves or not loss.requires_grad:
            return loss
        from . import distributed

        if distributed.world_size() > 1:
            raise NotImplementedError("GradCache chunking (model.grad_cache_chunk) does not support several "
                                      "processes yet; unset it or train on one process")
        grads = torch.autograd.grad(loss, self._leaves)
        chunks = self._chunks
        self._leaves, self._chunks = [], []
        out = loss.detach().requires_grad_()
        out.register_hook(lambda g: _replay(chunks, grads, g))
        return out


def _replay(chunks: list[list[_Chunk]], grads: tuple[Tensor, ...], scale: Tensor) -> None:
    """Backward of every chunk with its cached gradient times ``scale`` (the loss's upstream gradient)."""
    with torch.enable_grad():
        for per_leaf, grad in zip(chunks, grads):
            for c in per_leaf:
                emb = _forward_again(c)
                torch.autograd.backward(emb, grad[c.rows] * scale)


def _forward_again(c: _Chunk) -> Tensor:
    device = next(iter(c.tokens.values())).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(c.rng[0])
        if c.rng[1] is not None:
            torch.cuda.set_rng_state(c.rng[1], device)
        enabled, dtype = c.autocast
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled):
            return F.normalize(c.net(c.tokens).float(), dim=1)

