"""Every use of ``torch.distributed`` in the library lives here.

Functions take an optional process group and work unchanged in a single process
(world size 1), so library code and tests never branch on distributed state.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order. No gradient.

    Ranks may hold different numbers of rows (a short last batch): sizes are
    exchanged first and rows padded, so the result equals the concatenation a
    single process would see.

    Args:
        x: (n_r, ...) this rank's rows.

    Returns:
        (sum_r n_r, ...) rows of rank 0, then rank 1, ...
    """
    n = world_size(group)
    if n == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), group=group)
    sizes_list = [int(s.item()) for s in sizes]
    biggest = max(sizes_list)
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([t[:s] for t, s in zip(out, sizes_list)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather_cat whose backward hands every rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        sizes = all_gather_cat(torch.tensor([x.shape[0]], device=x.device), group)
        ctx.group, ctx.n = group, x.shape[0]
        ctx.start = int(sizes[: rank(group)].sum())
        return all_gather_cat(x.detach(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        # Every rank's loss touched every row: sum the row gradients over ranks (all_reduce works on
        # gloo too, unlike reduce_scatter), then keep this rank's rows.
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Like :func:`all_gather_cat`, but differentiable: (n_r, ...) -> (sum_r n_r, ...).

    The gradient of this rank's rows is summed over every rank's loss, so a loss
    over the gathered rows (in-batch negatives) trains the encoder under DDP
    exactly as one process with the global batch would (DDP then averages).
    """
    if world_size(group) == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def step_generator(cached: torch.Generator | None, seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator seeded for (seed, step, rank): independent draws per process, the same again after a resume.

    Reuses ``cached`` when it lives on ``device``."""
    generator = cached if cached is not None and cached.device == device else torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) * 1_009 + rank())
    return generator


@torch.no_grad()
def any_process(flags: Sequence[bool], device: torch.device | str = "cpu", group=None) -> list[bool]:
    """For each flag, whether it is set on any process (an all-reduce MAX); the flags themselves in one process.

    Lets every process take the same decision at the same step, e.g. to stop when
    only one of them received SIGTERM. ``device`` must suit the backend (CUDA for NCCL).
    """
    if world_size(group) == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


# gloo raises a plain RuntimeError naming its source file; NCCL raises DistBackendError.
_COLLECTIVE_MARKERS = ("gloo/", "Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from a failed collective (a peer died, or hung past the process-group timeout)."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _COLLECTIVE_MARKERS)


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In-place broadcast from ``src``; identity in a single process."""
    if world_size(group) > 1:
        dist.broadcast(x, src=src, group=group)
    return x


@torch.no_grad()
def shuffle_batch(x: torch.Tensor, generator: torch.Generator | None = None, group=None):
    """Shuffle BN, step 1 (MoCo): permute the global batch across ranks.

    Each rank gets a random slice of the global batch, so BatchNorm statistics of
    the key encoder are computed over other samples than the query's and cannot
    leak the positive. Requires equal per-rank batch sizes.

    Args:
        x: (n, ...) this rank's inputs.

    Returns:
        (shuffled (n, ...), unshuffle_idx (world*n,)) to pass to :func:`unshuffle_batch`.
    """
    n_ranks = world_size(group)
    gathered = all_gather_cat(x, group)
    total = gathered.shape[0]
    perm = torch.randperm(total, device=x.device, generator=generator)
    broadcast_(perm, 0, group)
    per_rank = total // n_ranks
    mine = perm.view(n_ranks, per_rank)[rank(group)]
    return gathered[mine], torch.argsort(perm)


@torch.no_grad()
def unshuffle_batch(y: torch.Tensor, unshuffle_idx: torch.Tensor, group=None) -> torch.Tensor:
    """Shuffle BN, step 2: undo :func:`shuffle_batch` on the outputs ``y`` (n, ...)."""
    n_ranks = world_size(group)
    gathered = all_gather_cat(y, group)
    per_rank = gathered.shape[0] // n_ranks
    mine = unshuffle_idx.view(n_ranks, per_rank)[rank(group)]
    return gathered[mine]


def collective_device(group=None) -> torch.device:
    """Where tensors for a collective of ``group`` must live: this process's CUDA device under NCCL (which
    refuses CPU tensors), else the CPU."""
    if is_distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def replicas_agree(tensors: dict[str, torch.Tensor], group=None) -> list[str]:
    """Names of the tensors that differ between processes (empty when all agree).

    Compares a float64 checksum (sum and position-weighted sum) of each tensor
    across ranks: state that every rank must hold identically, such as the queue.
    """
    if world_size(group) == 1 or not tensors:
        return []
    names = sorted(tensors)
    sums = []
    device = collective_device(group)
    for name in names:  # each checksum where its tensor lives (a CPU bank beside CUDA queues), then gathered
        flat = tensors[name].detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        sums.append(torch.stack([flat.sum(), (flat * weights).sum()]).to(device))
    local = torch.stack(sums)  # (n_tensors, 2)
    gathered = all_gather_cat(local.unsqueeze(0), group)  # (world, n_tensors, 2)
    differs = (gathered != gathered[:1]).any(dim=2).any(dim=0)
    return [name for name, bad in zip(names, differs.tolist()) if bad]


@torch.no_grad()
def all_gather_padded(x: torch.Tensor, fill: float | int, group=None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate 2-D tensors of every rank along dim 0, each padded along dim 1 to the widest with ``fill``.

    Args:
        x: (n_r, m_r) this rank's rows (ranks may differ in both sizes).
    Returns:
        (sum_r n_r, max_r m_r) rows of rank 0, then rank 1, ..., and the list of n_r (rank order).
    """
    n = world_size(group)
    if n == 1:
        return x, [x.shape[0]]
    device, home = collective_device(group), x.device
    shapes = torch.tensor([[x.shape[0], x.shape[1]]], dtype=torch.long, device=device)
    out = [torch.empty_like(shapes) for _ in range(n)]
    dist.all_gather(out, shapes, group=group)
    sizes = [int(s[0, 0]) for s in out]
    rows, width = max(sizes), max(int(s[0, 1]) for s in out)
    padded = torch.full((rows, width), fill, dtype=x.dtype, device=device)
    padded[: x.shape[0], : x.shape[1]] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(home), sizes


@torch.no_grad()
def all_gather_stack(x: torch.Tensor, group=None) -> torch.Tensor:
    """(W, ...) ``x`` of every rank stacked in rank order; every rank passes the same shape (one collective)."""
    if world_size(group) == 1:
        return x.unsqueeze(0)
    device = collective_device(group)
    parts = [torch.empty_like(x, device=device) for _ in range(world_size(group))]
    dist.all_gather(parts, x.contiguous().to(device), group=group)
    return torch.stack(parts).to(x.device)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """The element-wise sum of ``x`` over ranks (a new tensor on ``x``'s device); ``x`` itself in one process.

    Exact for tensors that only one rank fills at each position (the others hold zeros): a sharded bank's
    rows, each owned by one process."""
    if world_size(group) == 1:
        return x
    y = x.to(collective_device(group)).clone()
    dist.all_reduce(y, group=group)
    return y.to(x.device)


def exit_launched_process(code: int) -> NoReturn:
    """End a program's process with ``code``; under a launcher (``WORLD_SIZE`` > 1) without the interpreter's
    teardown, once everything it wrote is flushed.

    Why: DDP's reducer keeps the process group alive past ``destroy_process_group`` (deleting the model does
    not free it either), so the group's worker threads outlive Python's finalisation. A gloo worker that drops
    the last reference to a finished collective (a barrier holding the all-gather before it) frees that
    collective's tensors, which needs the GIL; on Python 3.11 a thread asking for the GIL during finalisation
    is ended by ``pthread_exit`` inside a noexcept destructor: ``std::terminate``, "terminate called without an
    active exception", exit -6 after the run finished and wrote its results (a core dump of the 2-process
    test showed exactly that stack). The program has closed its files by now; logging and stdio are flushed
    here, and the process leaves without the teardown that would race those threads.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
