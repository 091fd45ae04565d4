"""MoCHi hard negative mixing (Kalantidis et al., NeurIPS 2020).

Sampling is kept apart from the maths so the closed form can be checked against
the materialised form on the same draws:

- :func:`sample_plan` picks each query's hard pool (its own top-N negatives) and
  draws the mixing pairs and coefficients.
- :func:`synthesize` builds the synthetic points (reference form).
- :func:`synthetic_logits` gives ``q . h`` for the same points in closed form,
  without building the ``(B, s+s', D)`` tensor.

Negatives may be given in three layouts, all addressed by one column index
``0 <= c < M`` that matches the columns of ``neg_logits``:

- ``(M, D)``: one bank shared by every query (the MoCo queue);
- ``(B, M, D)``: per-query negatives;
- a tuple of such blocks, whose columns are concatenated in order (for example
  ``(queue (K, D), faiss_candidates (B, C, D))`` with ``M = K + C``).

All vectors (q and negatives) are assumed L2-normalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence, Union

import torch
import torch.nn.functional as F

Negatives = Union[torch.Tensor, Sequence[torch.Tensor]]

# F.normalize divides by max(norm, eps); the closed form uses the same floor.
_NORM_EPS = 1e-12
# Elements of gathered rows per chunk when computing pair products c_ij (two reused buffers, 1 MiB
# each): at the CPU config's 16,384 pairs, 2^18 was the fastest of 2^14-2^18 on 1 and 2 threads, 1.5-1.6x
# the former 2^16 chunks (benchmarks/studies/pair_products.py): fewer chunks, fewer op calls.
_GATHER_BUDGET = 1 << 18


@dataclass
class MixingPlan:
    """The random draws of one MoCHi step. Pair/query indices index ``hard_idx``'s columns.

    Attributes:
        hard_idx: (B, N) int64, columns of the negatives forming each query's hard pool.
        pair_i, pair_j: (B, s) int64 in [0, N), the two pool members of each pair mix.
        alpha: (B, s) float in (0, 1), weight of ``pair_i``.
        query_j: (B, s') int64 in [0, N), the pool member mixed with the query.
        beta: (B, s') float in (0, beta_max), weight of the query.
    """

    hard_idx: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    alpha: torch.Tensor
    query_j: torch.Tensor
    beta: torch.Tensor

    @property
    def n_mix(self) -> int:
        return self.pair_i.shape[1]

    @property
    def n_query_mix(self) -> int:
        return self.query_j.shape[1]

    def to(self, device: torch.device | str) -> "MixingPlan":
        return MixingPlan(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _check_counts(num_negatives: int, n_hard: int, n_mix: int, n_query_mix: int, beta_max: float) -> None:
    for name, value in (("n_hard", n_hard), ("n_mix", n_mix), ("n_query_mix", n_query_mix)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if n_hard > num_negatives:
        raise ValueError(f"n_hard={n_hard} is larger than the number of negatives ({num_negatives})")
    if n_mix > 0 and n_hard < 2:
        raise ValueError(f"n_hard={n_hard}: mixing pairs (n_mix={n_mix}) needs a hard pool of at least 2")
    if n_query_mix > 0 and n_hard < 1:
        raise ValueError(f"n_hard={n_hard}: query mixes (n_query_mix={n_query_mix}) need a hard pool of at least 1")
    if not 0.0 < beta_max < 1.0:
        raise ValueError(f"beta_max must lie in (0, 1), got {beta_max!r}")


def hard_pool(neg_logits: torch.Tensor, n_hard: int) -> torch.Tensor:
    """(B, M) scores -> (B, N) column indices of each row's N highest scores (unordered).

    Masked negatives carry ``-inf`` scores; a row with fewer than N finite scores
    is an error, because its pool would contain masked entries.
    """
    with torch.no_grad():
        scores = neg_logits.detach()
        if scores.device.type == "cpu" and n_hard >= _FAST_MIN_N and scores.shape[1] >= _FAST_MIN_RATIO * n_hard:
            idx = _threshold_topk(scores, n_hard)
            finite = n_hard == 0 or bool(torch.isfinite(scores.gather(1, idx)).all())
        elif scores.device.type == "cpu" and scores.dtype in _ORDER_INT:
            top = torch.topk(_order_keys(scores), n_hard, dim=1, sorted=False)
            idx = top.indices
            finite = n_hard == 0 or _finite_keys(top.values)
        else:
            top = torch.topk(scores, n_hard, dim=1, sorted=False)
            idx = top.indices
            finite = n_hard == 0 or bool(torch.isfinite(top.values).all())
        if not finite:
            raise ValueError(
                f"n_hard={n_hard}: some query has fewer than n_hard unmasked (finite) negatives"
            )
    return idx


# CPU top-k over integer keys: torch.topk compares floats through a NaN-aware comparator, integers
# directly; on the CPU config's 128 x 4,096 scores (N = 256) hard_pool took 2.18 ms against torch.topk's 2.52
# on 2 threads (benchmarks/studies/hard_pool.py), and the selection is the same, in the same order.
_ORDER_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integers ordered as the floats are (IEEE-754 bits; negative floats' magnitude bits flipped).

    For x >= +0 the bits already order as integers; for x < 0 (sign bit set, so negative as an integer)
    flipping the other bits reverses their order: x ^ ((x >> (w-1)) & max). So -inf keys below every
    finite score, -0 just below +0 (a tie either way), and a NaN beyond +-inf on its sign's side.
    """
    itype = _ORDER_INT[scores.dtype]
    bits = scores.contiguous().view(itype)
    keys = bits >> (torch.iinfo(itype).bits - 1)  # 0 or -1 (all ones)
    keys.bitwise_and_(torch.iinfo(itype).max)
    return keys.bitwise_xor_(bits)


# The keys of -inf and +inf: a key strictly between them is a finite score's.
_KEY_BOUNDS = {itype: tuple(_order_keys(torch.tensor([-math.inf, math.inf], dtype=dtype)).tolist())
               for dtype, itype in _ORDER_INT.items()}


def _finite_keys(keys: torch.Tensor) -> bool:
    """Whether every key (from :func:`_order_keys`) is a finite score's: one min-max pass over the
    selected keys, in place of gathering the scores again."""
    if keys.numel() == 0:  # an empty batch
        return True
    lo, hi = _KEY_BOUNDS[keys.dtype]
    low, high = torch.aminmax(keys)
    return lo < int(low) and int(high) < hi


# CPU top-N by thresholding: torch.topk over (256, 65536) costs more than the
# q @ queue.T product itself on a CPU; this exact two-stage selection is 1.7-2.0x
# faster than torch.topk from 64 entries per pool member (benchmarks/studies/hard_pool.py,
# which also times the former 1/16-sample version). At 16 per member (128 x 4,096,
# N = 256) torch.topk, which splits rows across threads, was faster on 2 threads
# (2.6 vs 3.5 ms), so the threshold path starts at 32.
_FAST_STRIDE = 32
_FAST_MIN_N = 128
_FAST_MIN_RATIO = 32
_FAST_SLACK = 2.0


def _threshold_topk(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Exact top-n column indices per row of (B, M) scores, unordered.

    A strided 1/32 sample of each row gives a threshold expected to let about
    2n entries through; those candidates are compacted (row-major, from one
    flat nonzero) and ranked with a small topk. Rows where fewer than n pass
    (possible, not likely) are redone with a full topk, so the result is always
    exact.
    """
    b, m = scores.shape
    sample = scores[:, ::_FAST_STRIDE]
    k_sample = min(sample.shape[1], math.ceil(_FAST_SLACK * n / _FAST_STRIDE))
    threshold = torch.topk(sample, k_sample, dim=1, sorted=False).values.amin(1, keepdim=True)
    flat = (scores >= threshold).view(-1).nonzero().squeeze(1)  # (P,) flat positions, rows ascending
    rows = flat.div(m, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=b)
    width = max(int(counts.max()), n)
    if width > m // 4:  # degenerate rows (ties, -inf): the plain path is cheaper
        return torch.topk(scores, n, dim=1, sorted=False).indices
    # Candidate p of row r goes to slot r * width + (its rank within row r).
    slot = rows * width + torch.arange(flat.numel(), device=scores.device) - (torch.cumsum(counts, 0) - counts)[rows]
    cand = scores.new_full((b * width,), float("-inf")).index_copy_(0, slot, scores.reshape(-1).index_select(0, flat))
    cand_cols = torch.zeros(b * width, dtype=torch.long, device=scores.device).index_copy_(0, slot, flat - rows * m)
    top = torch.topk(cand.view(b, width), n, dim=1, sorted=False).indices
    idx = cand_cols.view(b, width).gather(1, top)
    short = (counts < n).nonzero(as_tuple=True)[0]
    if short.numel():
        idx[short] = torch.topk(scores[short], n, dim=1, sorted=False).indices
    return idx


def sample_plan(
    neg_logits: torch.Tensor,
    n_hard: int,
    n_mix: int,
    n_query_mix: int,
    beta_max: float = 0.5,
    generator: torch.Generator | None = None,
) -> MixingPlan:
    """Draw one MoCHi(N, s, s') plan.

    Args:
        neg_logits: (B, M) un-scaled scores q . n (masked entries ``-inf``).
        n_hard: N, size of each query's hard pool (its own top-N).
        n_mix: s, pair mixes per query; the two members are distinct pool entries.
        n_query_mix: s', query mixes per query.
        beta_max: upper bound of the query weight beta ~ U(0, beta_max).
        generator: optional generator on ``neg_logits.device`` for reproducible draws.

    Returns:
        A :class:`MixingPlan` with all tensors on ``neg_logits.device``.
    """
    if neg_logits.dim() != 2:
        raise ValueError(f"neg_logits must be (B, M), got shape {tuple(neg_logits.shape)}")
    _check_counts(neg_logits.shape[1], n_hard, n_mix, n_query_mix, beta_max)
    b, device = neg_logits.shape[0], neg_logits.device
    idx_kw = dict(device=device, dtype=torch.long, generator=generator)
    val_kw = dict(device=device, dtype=neg_logits.dtype, generator=generator)

    hard_idx = hard_pool(neg_logits, n_hard)
    # Empty draws are skipped: they consume nothing from the generator, and each call costs a few microseconds.
    if n_mix:
        pair_i = torch.randint(0, n_hard, (b, n_mix), **idx_kw)
        # j uniform over the other N-1 members: offset i by 1..N-1 modulo N.
        pair_j = torch.randint(1, n_hard, (b, n_mix), **idx_kw).add_(pair_i).remainder_(n_hard)
        alpha = torch.rand((b, n_mix), **val_kw)
    else:
        pair_i = pair_j = torch.zeros((b, 0), device=device, dtype=torch.long)
        alpha = torch.zeros((b, 0), device=device, dtype=neg_logits.dtype)
    if n_query_mix:
        query_j = torch.randint(0, n_hard, (b, n_query_mix), **idx_kw)
        beta = torch.rand((b, n_query_mix), **val_kw).mul_(beta_max)
    else:
        query_j = torch.zeros((b, 0), device=device, dtype=torch.long)
        beta = torch.zeros((b, 0), device=device, dtype=neg_logits.dtype)
    return MixingPlan(hard_idx, pair_i, pair_j, alpha, query_j, beta)


def _blocks(negatives: Negatives) -> list[torch.Tensor]:
    blocks = [negatives] if isinstance(negatives, torch.Tensor) else list(negatives)
    if not blocks or any(t.dim() not in (2, 3) for t in blocks):
        raise ValueError("negatives must be an (M, D) or (B, M, D) tensor, or a sequence of them")
    return blocks


def gather_negatives(negatives: Negatives, columns: torch.Tensor) -> torch.Tensor:
    """Rows of the negatives at the given columns.

    Args:
        negatives: see the module docstring.
        columns: (B, S) int64 column indices into the concatenated negatives.

    Returns:
        (B, S, D) gathered vectors (sharing autograd with ``negatives``).
    """
    blocks = _blocks(negatives)
    out: torch.Tensor | None = None
    start = 0
    for block in blocks:
        m = block.shape[-2]
        local = columns - start
        rows = _gather_block(block, local.clamp(0, m - 1))
        if out is None:
            out = rows  # columns of later blocks are overwritten below
        else:
            inside = (local >= 0) & (local < m)
            out = torch.where(inside.unsqueeze(-1), rows, out)
        start += m
    return out


def _gather_block(block: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(M, D) or (B, M, D) block, (B, S) in-range columns -> (B, S, D)."""
    b, s = columns.shape
    if block.dim() == 2:
        return block.index_select(0, columns.reshape(-1)).view(b, s, block.shape[-1])
    return torch.gather(block, 1, columns.unsqueeze(-1).expand(b, s, block.shape[-1]))


def mix_points(q: torch.Tensor, negatives: Negatives, plan: MixingPlan) -> torch.Tensor:
    """The synthetic points of ``plan``, carrying the negatives' gradient (q is detached in the query mixes).

    Returns:
        (B, s + s', D) unit vectors: the first s are pair mixes ``normalize(a n_i + (1-a) n_j)``, the rest
        query mixes ``normalize(b q + (1-b) n_j)``. :func:`synthesize` is the same, detached; the document
        term's mixes (``mochi.document_mixes``) keep the gradient, so it reaches the documents mixed.
    """
    col_i = plan.hard_idx.gather(1, plan.pair_i)
    col_j = plan.hard_idx.gather(1, plan.pair_j)
    col_q = plan.hard_idx.gather(1, plan.query_j)
    a = plan.alpha.unsqueeze(-1)
    pair = a * gather_negatives(negatives, col_i) + (1 - a) * gather_negatives(negatives, col_j)
    bq = plan.beta.unsqueeze(-1)
    query = bq * q.detach().unsqueeze(1) + (1 - bq) * gather_negatives(negatives, col_q)
    return F.normalize(torch.cat([pair, query], dim=1), dim=-1)


def synthesize(q: torch.Tensor, negatives: Negatives, plan: MixingPlan) -> torch.Tensor:
    """Materialised synthetic points (the reference form).

    Args:
        q: (B, D) unit queries.
        negatives: the negatives whose columns ``plan.hard_idx`` indexes.
        plan: draws from :func:`sample_plan`.

    Returns:
        (B, s + s', D) detached unit vectors; the first s are pair mixes
        ``normalize(a n_i + (1-a) n_j)``, the rest query mixes
        ``normalize(b q + (1-b) n_j)`` with q detached (:func:`mix_points` without gradient).
    """
    with torch.no_grad():
        return mix_points(q, negatives, plan)


def _pair_products(negatives: Negatives, col_i: torch.Tensor, col_j: torch.Tensor) -> torch.Tensor:
    """(B, s) products n_i . n_j, gathered in chunks to bound memory. No autograd."""
    b, s = col_i.shape
    if s == 0:
        return col_i.new_zeros((b, 0), dtype=torch.float32)
    blocks = _blocks(negatives)
    d = blocks[0].shape[-1]
    with torch.no_grad():
        if len(blocks) == 1 and blocks[0].dim() == 2:
            return _shared_pair_products(blocks[0].detach(), col_i.reshape(-1), col_j.reshape(-1)).view(b, s)
        rows = max(1, _GATHER_BUDGET // max(1, s * d))
        out = []
        for start in range(0, b, rows):
            sl = slice(start, start + rows)
            sub = [t if t.dim() == 2 else t[sl] for t in blocks]
            out.append(torch.linalg.vecdot(gather_negatives(sub, col_i[sl]), gather_negatives(sub, col_j[sl])))
        return torch.cat(out, dim=0)


def _shared_pair_products(bank: torch.Tensor, col_i: torch.Tensor, col_j: torch.Tensor) -> torch.Tensor:
    """(P,) products bank[col_i] . bank[col_j] for one (M, D) bank, through two reused chunk buffers:
    allocating each chunk's rows anew costs more than the gather itself on a CPU."""
    p, d = col_i.numel(), bank.shape[1]
    n = max(1, min(p, _GATHER_BUDGET // d))  # at least one row (also for an empty batch)
    buf_i, buf_j = bank.new_empty((n, d)), bank.new_empty((n, d))
    out = bank.new_empty(p)
    for start in range(0, p, n):
        m = min(n, p - start)
        ni = torch.index_select(bank, 0, col_i[start : start + m], out=buf_i[:m])
        nj = torch.index_select(bank, 0, col_j[start : start + m], out=buf_j[:m])
        torch.sum(ni.mul_(nj), dim=1, out=out[start : start + m])  # in place: no third buffer
    return out


def _scores_at(q: torch.Tensor, neg_logits: torch.Tensor, negatives: Negatives, cols: torch.Tensor) -> torch.Tensor:
    """(B, S) scores q . n at the given columns, with gradient to q only.

    Reuses ``neg_logits`` unless the negatives themselves carry gradient, in which
    case the scores are recomputed against detached rows so no gradient reaches
    the synthetic points' sources.
    """
    if any(t.requires_grad for t in _blocks(negatives)):
        rows = gather_negatives([t.detach() for t in _blocks(negatives)], cols)
        return torch.einsum("bd,bsd->bs", q, rows)
    return neg_logits.gather(1, cols)


def synthetic_logits(
    q: torch.Tensor, neg_logits: torch.Tensor, negatives: Negatives, plan: MixingPlan
) -> torch.Tensor:
    """Closed-form ``q . h`` for the plan's synthetic points, un-scaled by temperature.

    With unit vectors, s_i = q . n_i and c_ij = n_i . n_j:
    ``q . h  = (a s_i + (1-a) s_j) / sqrt(a^2 + (1-a)^2 + 2a(1-a) c_ij)`` and
    ``q . h' = (b (q . q_bar) + (1-b) s_j) / sqrt(b^2 + (1-b)^2 + 2b(1-b) s_bar_j)``,
    with detached denominators, so the value and the gradient with respect to q
    equal those of ``einsum("bd,bsd->bs", q, synthesize(q, negatives, plan))``.

    Args:
        q: (B, D) unit queries (with gradient).
        neg_logits: (B, M) un-scaled scores q . n, differentiable in q.
        negatives: the negatives ``neg_logits`` was computed from.
        plan: draws from :func:`sample_plan`.

    Returns:
        (B, s + s') logits; pair mixes first.
    """
    s, s_prime = plan.n_mix, plan.n_query_mix
    parts = []
    if s:  # each branch costs a dozen small ops forward and back: skipped when it has no points
        cols = plan.hard_idx.gather(1, torch.cat([plan.pair_i, plan.pair_j], dim=1))  # (B, 2s): i's, then j's
        scores = _scores_at(q, neg_logits, negatives, cols)  # (B, 2s) [s_i, s_j]
        with torch.no_grad():  # the weights a / den1 and (1-a) / den1 are constants of the step
            a = plan.alpha.to(scores.dtype)
            c_ij = _pair_products(negatives, cols[:, :s], cols[:, s:]).to(scores.dtype)
            den1 = (a * a + (1 - a) ** 2 + 2 * a * (1 - a) * c_ij).clamp_min(0).sqrt().clamp_min(_NORM_EPS)
            weights = torch.cat([a, 1 - a], dim=1).div_(den1.repeat(1, 2))  # (B, 2s)
        # One product and one sum carry the gradient (in place of two slices, two products, a sum and a division).
        parts.append((scores * weights).view(scores.shape[0], 2, s).sum(1))
    if s_prime:
        s_q = _scores_at(q, neg_logits, negatives, plan.hard_idx.gather(1, plan.query_j))
        b = plan.beta.to(s_q.dtype)
        self_dot = (q * q.detach()).sum(-1, keepdim=True)  # value |q|^2 = 1, gradient q_bar
        s_q_bar = s_q.detach()
        den2 = (b * b + (1 - b) ** 2 + 2 * b * (1 - b) * s_q_bar).clamp_min(0).sqrt().clamp_min(_NORM_EPS)
        parts.append((b * self_dot + (1 - b) * s_q) / den2)
    if not parts:
        return neg_logits.new_zeros((q.shape[0], 0))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
