"""mochi_retrieval: contrastive training of embedding models with hard negatives.

A MoCo momentum queue and FAISS-mined candidates supply negatives, MoCHi
(Kalantidis et al., NeurIPS 2020) mixes harder ones at the feature level, and
evaluators measure kNN, linear-probe, detection and retrieval quality.

The parts most users need::

    from mochi_retrieval import MoCo, MoCHiConfig, contrastive_loss, register_encoder
"""
from .encoders import (
    EncoderWithHead,
    HFTextEncoder,
    ProjectionHead,
    ResNetEncoder,
    check_encoder,
    create_encoder,
    list_encoders,
    momentum_update,
    register_encoder,
)
from .loss import ContrastiveOutput, MoCHiConfig, MoCHiLoss, contrastive_loss, info_nce_from_logits
from .mixing import MixingPlan, sample_plan, synthesize, synthetic_logits
from .moco import MoCo
from .queue import MomentumQueue

__version__ = "0.1.0"

__all__ = [
    "ContrastiveOutput", "EncoderWithHead", "HFTextEncoder", "MixingPlan", "MoCHiConfig", "MoCHiLoss", "MoCo",
    "MomentumQueue", "ProjectionHead", "ResNetEncoder", "check_encoder", "contrastive_loss", "create_encoder",
    "info_nce_from_logits", "list_encoders", "momentum_update", "register_encoder", "sample_plan", "synthesize",
    "synthetic_logits",
]
