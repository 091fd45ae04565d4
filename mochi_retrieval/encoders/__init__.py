"""Encoders: the contract, a registry, image and text adapters, heads.

Importing this package registers the built-in encoders: "resnet18",
"resnet34", "resnet50" and "hf_text".
"""

from mochi_retrieval.encoders.base import Batch, EncoderCheckError, check_encoder, encoder_output_dim
from mochi_retrieval.encoders.encoding import EncodeFn, encode_in_batches, eval_mode
from mochi_retrieval.encoders.heads import (
    EncoderWithHead,
    ProjectionHead,
    cosine_momentum,
    make_momentum_copy,
    momentum_update,
)
from mochi_retrieval.encoders.registry import (
    UnknownEncoderError,
    create_encoder,
    list_encoders,
    register_encoder,
)
from mochi_retrieval.encoders.resnet import ResNetEncoder
from mochi_retrieval.encoders.text import HFTextEncoder, mean_pool

__all__ = [
    "Batch",
    "EncodeFn",
    "EncoderCheckError",
    "EncoderWithHead",
    "HFTextEncoder",
    "ProjectionHead",
    "ResNetEncoder",
    "UnknownEncoderError",
    "check_encoder",
    "cosine_momentum",
    "create_encoder",
    "encode_in_batches",
    "encoder_output_dim",
    "eval_mode",
    "list_encoders",
    "make_momentum_copy",
    "mean_pool",
    "momentum_update",
    "register_encoder",
]
