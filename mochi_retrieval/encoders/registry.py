"""Encoder registry and factory (timm style).

A factory is any callable (a class or a function) that returns an encoder
``nn.Module``. Registering it under a name makes it addressable from a YAML
config::

    from mochi_retrieval.encoders import register_encoder

    @register_encoder("my_cnn")
    class MyCNN(nn.Module):
        output_dim = 256
        ...

    # or, without a decorator:
    register_encoder("my_cnn_wide", functools.partial(MyCNN, width=2))

    encoder = create_encoder("my_cnn", depth=4)   # kwargs go to the factory

Built-in names ("resnet18", "resnet34", "resnet50", "hf_text") are registered
when :mod:`mochi_retrieval.encoders` is imported.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Callable, TypeVar, overload

from torch import nn

from mochi_retrieval.encoders.base import encoder_output_dim

logger = logging.getLogger(__name__)

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}


class UnknownEncoderError(KeyError, ValueError):
    """Raised by :func:`create_encoder` for a name nobody registered.

    It is both a ``KeyError`` and a ``ValueError`` so either can be caught.
    """

    def __str__(self) -> str:  # KeyError would repr() the message.
        return str(self.args[0]) if self.args else ""


@overload
def register_encoder(name: str, fn: None = None, *, override: bool = False) -> Callable[[F], F]: ...
@overload
def register_encoder(name: str, fn: F, *, override: bool = False) -> F: ...


def register_encoder(
    name: str, fn: Factory | None = None, *, override: bool = False
) -> Callable[[F], F] | Factory:
    """Register an encoder factory under ``name``.

    Use as a decorator, ``@register_encoder("name")``, or directly,
    ``register_encoder("name", factory)``. Returns the factory unchanged.

    Raises:
        ValueError: ``name`` is already registered and ``override`` is False,
            or ``name`` is not a non-empty string.
        TypeError: the factory is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")

    def _register(factory: F) -> F:
        if not callable(factory):
            raise TypeError(f"encoder factory for {name!r} must be callable, got {factory!r}")
        if name in _REGISTRY and not override:
            raise ValueError(
                f"encoder {name!r} is already registered (to {_REGISTRY[name]!r}); "
                "pass override=True to replace it"
            )
        if name in _REGISTRY:
            logger.warning("overriding registered encoder %r", name)
        _REGISTRY[name] = factory
        return factory

    return _register if fn is None else _register(fn)


def list_encoders() -> list[str]:
    """Return the registered encoder names, sorted."""
    return sorted(_REGISTRY)


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build the encoder registered as ``name``, passing ``kwargs`` to its factory.

    Raises:
        UnknownEncoderError: no encoder is registered as ``name``; the message
            suggests the nearest registered name.
        TypeError: the factory did not return an ``nn.Module`` exposing an
            integer ``output_dim``.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY.keys(), n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownEncoderError(
            f"unknown encoder {name!r}.{hint} Registered encoders: {', '.join(list_encoders())}"
        )
    encoder = _REGISTRY[name](**kwargs)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"factory for encoder {name!r} returned {type(encoder).__name__}, not an nn.Module")
    encoder_output_dim(encoder)  # fail early if the contract's output_dim is missing
    return encoder
