"""The encoder contract and a public helper that checks it.

An encoder is any ``nn.Module`` that

- takes a single argument ``batch``: a ``Tensor`` for images, shape
  (B, C, H, W), or a ``Mapping[str, Tensor]`` for text (``input_ids``,
  ``attention_mask``, optionally ``token_type_ids``, each (B, L));
- returns a floating tensor of shape (B, D);
- exposes ``output_dim: int`` equal to D (an attribute or a property).

Run :func:`check_encoder` on your own encoder to apply the same checks our
contract tests apply to the built-in ones::

    from mochi_retrieval.encoders import check_encoder
    check_encoder(MyEncoder(), torch.randn(4, 3, 32, 32))
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

Batch = Union[Tensor, Mapping[str, Tensor]]

_MAX_NAMES = 10


class EncoderCheckError(ValueError):
    """An encoder broke the contract; the message says how."""


def encoder_output_dim(module: nn.Module) -> int:
    """Return ``module.output_dim``, the D of its (B, D) output.

    Raises:
        TypeError: the module has no ``output_dim`` or it is not a positive int.
    """
    dim = getattr(module, "output_dim", None)
    if dim is None:
        raise TypeError(
            f"{type(module).__name__} does not expose `output_dim`; an encoder must set "
            "`self.output_dim: int` (or define a property) giving the D of its (B, D) output"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise TypeError(f"{type(module).__name__}.output_dim must be a positive int, got {dim!r}")
    return dim


def batch_size_of(batch: Batch) -> int:
    """Return B for a (B, ...) tensor or a mapping of (B, ...) tensors."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        if not tensors:
            raise EncoderCheckError("example_batch is a mapping with no tensors in it")
        sizes = {k: int(v.shape[0]) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise EncoderCheckError(f"example_batch tensors disagree on the batch size: {sizes}")
        return next(iter(sizes.values()))
    raise EncoderCheckError(f"example_batch must be a Tensor or a Mapping of tensors, got {type(batch).__name__}")


def _check_output(out: object, batch_size: int, dim: int, mode: str) -> Tensor:
    """Check one forward output; returns it as a Tensor of shape (B, D)."""
    if not isinstance(out, Tensor):
        raise EncoderCheckError(f"{mode} mode: forward returned {type(out).__name__}, expected a (B, D) Tensor")
    if out.dim() != 2:
        raise EncoderCheckError(
            f"{mode} mode: output has rank {out.dim()} (shape {tuple(out.shape)}), expected a 2-D (B, D) tensor"
        )
    if not out.is_floating_point():
        raise EncoderCheckError(f"{mode} mode: output dtype {out.dtype} is not floating point")
    if tuple(out.shape) != (batch_size, dim):
        raise EncoderCheckError(
            f"{mode} mode: output shape {tuple(out.shape)} != (batch_size, output_dim) = ({batch_size}, {dim})"
        )
    n_nan, n_inf = int(torch.isnan(out).sum()), int(torch.isinf(out).sum())
    if n_nan or n_inf:
        raise EncoderCheckError(f"{mode} mode: output has {n_nan} NaN and {n_inf} Inf values")
    return out


def _forward(encoder: nn.Module, batch: Batch, mode: str) -> object:
    try:
        return encoder(batch)
    except Exception as err:  # re-raised with context, never swallowed
        raise EncoderCheckError(f"{mode} mode: forward raised {type(err).__name__}: {err}") from err


def _names(names: list[str]) -> str:
    more = f" (+{len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else ""
    return ", ".join(names[:_MAX_NAMES]) + more


def _check_gradients(encoder: nn.Module, out: Tensor) -> None:
    """Backward a simple loss from out (B, D); every trainable param needs a finite grad."""
    trainable = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    if not trainable:
        logger.info("check_encoder: %s has no trainable parameters; skipping the gradient check",
                    type(encoder).__name__)
        return
    if not out.requires_grad:
        raise EncoderCheckError("train mode: output does not depend on any trainable parameter")
    for _, p in trainable:
        p.grad = None
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
    (out.float() * weights.float()).sum().backward()
    missing = [n for n, p in trainable if p.grad is None]
    if missing:
        raise EncoderCheckError(f"parameters with requires_grad got no gradient: {_names(missing)}")
    bad = [n for n, p in trainable if not bool(torch.isfinite(p.grad).all())]
    if bad:
        raise EncoderCheckError(f"parameters got non-finite (NaN/Inf) gradients: {_names(bad)}")


def check_encoder(encoder: nn.Module, example_batch: Batch, *, expected_dim: int | None = None) -> None:
    """Check that ``encoder`` honours the encoder contract on ``example_batch``.

    Checks, in order: ``output_dim`` is a positive int (and equals
    ``expected_dim`` if given); in train mode the output is a 2-D floating
    tensor of shape (batch_size, output_dim) with no NaN/Inf; the backward
    pass of a simple loss gives every parameter with ``requires_grad`` a
    non-None, finite gradient; in eval mode (under ``no_grad``) the output
    passes the same shape and value checks.

    The encoder's mode, its parameters' ``.grad`` and its buffers (BatchNorm
    running statistics) are restored afterwards. Use a batch size of at least
    2 for encoders with BatchNorm.

    Args:
        encoder: the module to check.
        example_batch: a (B, ...) Tensor, or a Mapping of (B, ...) tensors;
            it is passed as the single argument ``encoder(example_batch)``.
        expected_dim: the D you expect; compared with ``output_dim``.

    Raises:
        EncoderCheckError: a ``ValueError`` whose message names the problem.
    """
    try:
        dim = encoder_output_dim(encoder)
    except TypeError as err:
        raise EncoderCheckError(str(err)) from err
    if expected_dim is not None and dim != expected_dim:
        raise EncoderCheckError(f"output_dim is {dim}, expected_dim is {expected_dim}")
    batch_size = batch_size_of(example_batch)

    was_training = encoder.training
    saved_grads = {n: p.grad for n, p in encoder.named_parameters()}
    saved_buffers = {n: b.detach().clone() for n, b in encoder.named_buffers()}
    try:
        encoder.train()
        out = _check_output(_forward(encoder, example_batch, "train"), batch_size, dim, "train")
        _check_gradients(encoder, out)
        encoder.eval()
        with torch.no_grad():
            _check_output(_forward(encoder, example_batch, "eval"), batch_size, dim, "eval")
    finally:
        encoder.train(was_training)
        with torch.no_grad():
            for n, p in encoder.named_parameters():
                p.grad = saved_grads[n]
            for n, b in encoder.named_buffers():
                b.copy_(saved_buffers[n])
