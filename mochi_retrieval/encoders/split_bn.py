"""BatchNorm in groups of the batch: MoCo's shuffle BN emulated in one process, with one pass of the network.

With ``splits`` groups, a training-mode BatchNorm normalises each consecutive group of the batch with
that group's own statistics, as ``splits`` GPUs would. Only the normalisation is split: convolutions and
linear layers see the whole batch at once, which on a CPU is much cheaper than running the network on
each group in turn (measured in ``benchmarks/RESULTS.md``, "split BatchNorm"). The result equals that of
running the network on each group in turn, running statistics included: the groups update them one after
the other, as the per-group passes did.

:func:`convert_split_batchnorm` swaps the ``BatchNorm1d``/``BatchNorm2d`` layers of a network for these
subclasses in place (parameter and buffer names unchanged, so checkpoints and exports are unaffected; in
evaluation mode they are plain BatchNorm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SplitMixin:
    """Training-mode forward over ``splits`` consecutive groups of the batch (torch.tensor_split's)."""

    splits: int = 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(min(self.splits, x.shape[0]))
        # F.batch_norm updates the running statistics in place, group after group.
        return torch.cat([F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias, True,
                                       self.momentum, self.eps) for chunk in torch.tensor_split(x, self.splits)])


class SplitBatchNorm1d(_SplitMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` normalising ``splits`` groups of the batch separately in training mode."""


class SplitBatchNorm2d(_SplitMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` normalising ``splits`` groups of the batch separately in training mode."""


_SPLIT = {nn.BatchNorm1d: SplitBatchNorm1d, nn.BatchNorm2d: SplitBatchNorm2d,
          SplitBatchNorm1d: SplitBatchNorm1d, SplitBatchNorm2d: SplitBatchNorm2d}


def convert_split_batchnorm(module: nn.Module, splits: int) -> bool:
    """Make every BatchNorm1d/2d of ``module`` normalise ``splits`` groups (in place).

    Returns False, changing nothing, when ``module`` holds another batch-dependent normalisation (BatchNorm3d,
    SyncBatchNorm, lazy or custom subclasses) or a BatchNorm without running statistics or with a cumulative
    average (``momentum=None``): the caller then runs the network group by group instead.
    """
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             and not isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    if any(type(m) not in _SPLIT or not m.track_running_stats or m.momentum is None for m in norms):
        return False
    for m in norms:
        m.__class__ = _SPLIT[type(m)]
        m.splits = splits
    return True


__all__ = ["SplitBatchNorm1d", "SplitBatchNorm2d", "convert_split_batchnorm"]
