"""Projection heads and momentum (EMA) encoders, as in MoCo-v2 and BYOL."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from mochi_retrieval.encoders.base import Batch, encoder_output_dim


class ProjectionHead(nn.Module):
    """MoCo-v2 MLP head: (B, in_dim) -> (B, out_dim).

    ``num_layers`` Linear layers with ReLU between them (and BatchNorm1d
    before each ReLU if ``batch_norm``); ``num_layers=2`` is Linear-ReLU-Linear,
    ``num_layers=1`` a single Linear.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2, batch_norm: bool = False
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"dims must be positive, got in={in_dim} hidden={hidden_dim} out={out_dim}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.output_dim: int = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Features (B, in_dim) -> projections (B, output_dim)."""
        return self.net(x)


class EncoderWithHead(nn.Module):
    """An encoder followed by a head: batch -> (B, head.output_dim)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        enc_dim = encoder_output_dim(encoder)
        head_in = getattr(head, "in_dim", None)
        if head_in is not None and head_in != enc_dim:
            raise ValueError(f"head expects in_dim={head_in} but the encoder's output_dim is {enc_dim}")
        self.encoder = encoder
        self.head = head
        self.output_dim: int = encoder_output_dim(head)

    def forward(self, batch: Batch) -> Tensor:
        """Batch (see the encoder contract) -> (B, output_dim)."""
        return self.head(self.encoder(batch))


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` with every parameter's requires_grad set to False."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


def _paired(online: list[tuple[str, Tensor]], target: list[tuple[str, Tensor]], kind: str) -> None:
    """Raise ValueError unless two named-tensor lists match in names and shapes."""
    if len(online) != len(target):
        raise ValueError(f"online has {len(online)} {kind}s but target has {len(target)}")
    for (on, ot), (tn, tt) in zip(online, target):
        if on != tn or ot.shape != tt.shape:
            raise ValueError(
                f"{kind} mismatch: online {on!r} {tuple(ot.shape)} vs target {tn!r} {tuple(tt.shape)}"
            )


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """EMA update in place: target = m * target + (1 - m) * online.

    Applied to parameters; buffers (BatchNorm running statistics) are copied
    from ``online``, as in MoCo.

    Raises:
        ValueError: ``momentum`` not in [0, 1], or the two modules differ in
            parameter or buffer names or shapes.
    """
    m = float(momentum)
    if not 0.0 <= m <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    online_params, target_params = list(online.named_parameters()), list(target.named_parameters())
    online_bufs, target_bufs = list(online.named_buffers()), list(target.named_buffers())
    _paired(online_params, target_params, "parameter")
    _paired(online_bufs, target_bufs, "buffer")

    t_params = [p for _, p in target_params]
    o_params = [p.detach() for _, p in online_params]
    if m == 0.0:
        for t, o in zip(t_params, o_params):
            t.copy_(o)
    elif m < 1.0 and t_params:
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, o_params, alpha=1.0 - m)
    for (_, t), (_, o) in zip(target_bufs, online_bufs):
        t.copy_(o)


def cosine_momentum(base_m: float, step: int, total_steps: int) -> float:
    """BYOL schedule from ``base_m`` at step 0 to 1 at ``total_steps``.

    m = 1 - (1 - base_m) * (cos(pi * step / total_steps) + 1) / 2, with step
    clamped to [0, total_steps].
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    frac = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base_m) * (math.cos(math.pi * frac) + 1.0) / 2.0
