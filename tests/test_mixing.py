"""MoCHi mixing against a per-query reference written from the paper's formulas."""
import math

import device_checks
import pytest
import torch
import torch.nn.functional as F
from device_checks import DEVICES

from mochi_retrieval import mixing
from mochi_retrieval.mixing import sample_plan, synthesize, synthetic_logits


@pytest.fixture(autouse=True)
def float64():
    """Reference comparisons at tight tolerance; restored for other test files."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def setup(b=6, k=40, d=8, seed=0):
    q = unit(b, d, seed=seed).requires_grad_(True)
    bank = unit(k, d, seed=seed + 1)
    return q, bank, q @ bank.t()


def reference_points(q, bank, plan):
    """Per query, straight from Kalantidis et al. eq. (2) and (3), one point at a time."""
    out = []
    for b in range(q.shape[0]):
        # Hard pool of *this* query: its own top-N by q.n.
        order = torch.argsort(q[b].detach() @ bank.t(), descending=True)
        pool_set = set(order[: plan.hard_idx.shape[1]].tolist())
        assert set(plan.hard_idx[b].tolist()) == pool_set
        pool = bank[plan.hard_idx[b]]
        points = []
        for t in range(plan.pair_i.shape[1]):
            a = plan.alpha[b, t]
            h = a * pool[plan.pair_i[b, t]] + (1 - a) * pool[plan.pair_j[b, t]]
            points.append(h / h.norm())
        for t in range(plan.query_j.shape[1]):
            beta = plan.beta[b, t]
            h = beta * q[b].detach() + (1 - beta) * pool[plan.query_j[b, t]]
            points.append(h / h.norm())
        out.append(torch.stack(points))
    return torch.stack(out)


def test_plan_shapes_ranges_and_own_top_n():
    q, bank, logits = setup()
    plan = sample_plan(logits, 10, 7, 5, beta_max=0.3, generator=torch.Generator().manual_seed(1))
    assert plan.hard_idx.shape == (6, 10) and plan.pair_i.shape == (6, 7) and plan.query_j.shape == (6, 5)
    assert ((plan.alpha > 0) & (plan.alpha < 1)).all()
    assert ((plan.beta >= 0) & (plan.beta < 0.3)).all()
    assert (plan.pair_i != plan.pair_j).all()  # pair mixes really mix two pool members
    for idx in (plan.pair_i, plan.pair_j, plan.query_j):
        assert idx.min() >= 0 and idx.max() < 10
    # Each row's pool is its own top-10, not row 0's (a known bug in public code).
    for b in range(6):
        top = set(torch.topk(logits[b].detach(), 10).indices.tolist())
        assert set(plan.hard_idx[b].tolist()) == top
    assert len({tuple(sorted(r.tolist())) for r in plan.hard_idx}) > 1


def test_synthesize_matches_paper_reference():
    q, bank, logits = setup()
    plan = sample_plan(logits, 10, 7, 5, generator=torch.Generator().manual_seed(2))
    points = synthesize(q, bank, plan)
    assert points.shape == (6, 12, 8)
    assert not points.requires_grad
    torch.testing.assert_close(points.norm(dim=-1), torch.ones(6, 12))
    torch.testing.assert_close(points, reference_points(q, bank, plan))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_mix,n_query_mix", [(7, 5), (7, 0), (0, 5), (1, 1)])
def test_closed_form_equals_materialised_value_and_gradient(device, n_mix, n_query_mix):
    device_checks.check_closed_form(device, n_mix, n_query_mix)


@pytest.mark.parametrize("device", DEVICES)
def test_closed_form_with_per_query_and_block_negatives(device):
    """Queue (K, D) followed by per-query candidates (B, C, D): one column space."""
    device_checks.check_closed_form_blocks(device)


@pytest.mark.parametrize("device", DEVICES)
def test_closed_form_float32_at_training_scale(device):
    device_checks.check_closed_form_float32(device)


def test_no_gradient_into_synthetic_sources():
    """Even when the negatives carry gradient, synthetic logits send none to them."""
    q, bank, _ = setup()
    bank = bank.clone().requires_grad_(True)
    logits = q @ bank.t()
    plan = sample_plan(logits, 10, 7, 5, generator=torch.Generator().manual_seed(6))
    closed = synthetic_logits(q, logits, bank, plan)
    g_q, g_bank = torch.autograd.grad(closed.sum(), [q, bank], allow_unused=True)
    assert g_bank is None or torch.count_nonzero(g_bank) == 0
    material = torch.einsum("bd,bsd->bs", q, synthesize(q, bank, plan))
    torch.testing.assert_close(closed, material)
    torch.testing.assert_close(g_q, torch.autograd.grad(material.sum(), q)[0])


def test_query_mix_closed_form_on_a_hand_case():
    """q = e1, n = e2, b = 0.25: h' = normalize(0.25 e1 + 0.75 e2), q.h' = 0.25/sqrt(0.625)."""
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    bank = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    logits = q @ bank.t()
    plan = mixing.MixingPlan(
        hard_idx=torch.tensor([[0, 1]]),
        pair_i=torch.tensor([[0]]), pair_j=torch.tensor([[1]]), alpha=torch.tensor([[0.5]]),
        query_j=torch.tensor([[0]]), beta=torch.tensor([[0.25]]),
    )
    out = synthetic_logits(q, logits, bank, plan)
    # Pair: normalize(0.5 e2 - 0.5 e1) . e1 = -0.5 / sqrt(0.5).
    torch.testing.assert_close(out, torch.tensor([[-0.5 / math.sqrt(0.5), 0.25 / math.sqrt(0.625)]]))


def test_seeded_generator_is_deterministic():
    _, _, logits = setup()
    p1 = sample_plan(logits, 10, 7, 5, generator=torch.Generator().manual_seed(11))
    p2 = sample_plan(logits, 10, 7, 5, generator=torch.Generator().manual_seed(11))
    p3 = sample_plan(logits, 10, 7, 5, generator=torch.Generator().manual_seed(12))
    for name in ("pair_i", "pair_j", "alpha", "query_j", "beta"):
        assert torch.equal(getattr(p1, name), getattr(p2, name))
    assert not torch.equal(p1.alpha, p3.alpha)


def test_masked_entries_never_enter_the_pool():
    _, _, logits = setup()
    mask = torch.zeros_like(logits, dtype=torch.bool)
    top = torch.topk(logits.detach(), 3, dim=1).indices
    mask.scatter_(1, top, True)  # mask each row's 3 hardest
    plan = sample_plan(logits.masked_fill(mask, float("-inf")), 10, 4, 2)
    assert not mask.gather(1, plan.hard_idx).any()
    with pytest.raises(ValueError, match="n_hard"):
        sample_plan(logits.masked_fill(torch.ones_like(mask), float("-inf")), 10, 4, 2)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(n_hard=41, n_mix=1, n_query_mix=1), "n_hard"),
        (dict(n_hard=1, n_mix=1, n_query_mix=0), "n_hard"),
        (dict(n_hard=5, n_mix=-1, n_query_mix=0), "n_mix"),
        (dict(n_hard=5, n_mix=1, n_query_mix=-2), "n_query_mix"),
        (dict(n_hard=5, n_mix=1, n_query_mix=1, beta_max=1.0), "beta_max"),
        (dict(n_hard=5, n_mix=1, n_query_mix=1, beta_max=0.0), "beta_max"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    _, _, logits = setup()
    with pytest.raises(ValueError, match=name):
        sample_plan(logits, **kwargs)


def test_generator_on_tensor_device_and_plan_move():
    _, _, logits = setup()
    plan = sample_plan(logits.detach(), 4, 2, 2, generator=torch.Generator(device=logits.device))
    assert plan.hard_idx.device == logits.device
    assert plan.to("cpu").alpha.shape == (6, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [128, 300])
def test_fast_hard_pool_equals_topk(device, n):
    """Also large values only at the sampled (strided) columns: too few pass the threshold, the fallback is exact."""
    device_checks.check_hard_pool(device, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_keys_sort_as_the_floats(dtype):
    """The integer keys of the CPU top-N order every kind of float as the floats do: infinities, zeros,
    subnormals, the largest finite values, ties."""
    info = torch.finfo(dtype)
    special = torch.tensor([float("-inf"), -info.max, -1.5, -info.tiny / 4, 0.0, info.tiny / 4, 1e-30, 1.5, 1.5,
                            info.max, float("inf")], dtype=dtype)
    x = torch.cat([special, torch.randn(500, generator=torch.Generator().manual_seed(0), dtype=dtype) * 10])
    keys = mixing._order_keys(x)
    assert keys.dtype == mixing._ORDER_INT[dtype]
    less, key_less = x[:, None] < x[None, :], keys[:, None] < keys[None, :]
    assert torch.equal(less, key_less)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_pool_keys_path_selects_topk_in_topk_order(dtype):
    """At the CPU config's shape (plain path, integer keys) with masked (-inf) entries and negative scores:
    torch.topk's indices, in the same order, so a run's draws do not depend on the path."""
    s = torch.randn(128, 4096, generator=torch.Generator().manual_seed(1), dtype=dtype) - 0.5
    s[:, :7] = float("-inf")
    s[3] = -s[3].abs()  # a row of negative scores only
    assert 256 * mixing._FAST_MIN_RATIO > s.shape[1]  # the plain (keys) path
    torch.testing.assert_close(mixing.hard_pool(s, 256), torch.topk(s, 256, dim=1, sorted=False).indices,
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype,width,n", [
    (torch.float32, 600, 64),  # integer keys
    (torch.float64, 600, 64),  # integer keys
    (torch.bfloat16, 600, 64),  # plain torch.topk (no integer keys for this dtype)
    (torch.float32, 8192, 128),  # thresholding path
])
def test_hard_pool_refuses_a_pool_with_non_finite_scores(dtype, width, n):
    """Each path's finiteness check: a row with exactly n finite scores passes; one masked entry more, or a +inf
    or NaN score among a row's top n, is an error (the bound keys of -inf and +inf are exclusive)."""
    s = torch.rand(4, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    s[2, n:] = float("-inf")  # exactly n finite
    assert mixing.hard_pool(s, n).shape == (4, n)
    for bad in (float("-inf"), float("inf"), float("nan")):
        t = s.clone()
        t[2, 0] = bad  # -inf: n - 1 finite; +inf/NaN: a non-finite score ranks among the top n
        with pytest.raises(ValueError, match="fewer than n_hard unmasked"):
            mixing.hard_pool(t, n)


@pytest.mark.parametrize("budget", [8, 40, 1 << 16])  # 1, 5 (42 = 8 x 5 + 2) and 42 rows a chunk
def test_chunked_pair_products_equal_the_direct_products(monkeypatch, budget):
    """Chunk sizes that split the pairs unevenly (and one chunk for all) give n_i . n_j exactly, for a shared
    bank and for a (queue, per-query candidates) column space alike."""
    monkeypatch.setattr(mixing, "_GATHER_BUDGET", budget)
    bank, cands = unit(40, 8, seed=1), unit(6, 9, 8, seed=2)
    g = torch.Generator().manual_seed(3)
    col_i, col_j = torch.randint(0, 49, (6, 7), generator=g), torch.randint(0, 49, (6, 7), generator=g)
    full = torch.cat([bank.expand(6, -1, -1), cands], dim=1)  # (B, K + C, D)
    rows_i = torch.gather(full, 1, col_i.unsqueeze(-1).expand(-1, -1, 8))
    rows_j = torch.gather(full, 1, col_j.unsqueeze(-1).expand(-1, -1, 8))
    torch.testing.assert_close(mixing._pair_products((bank, cands), col_i, col_j), (rows_i * rows_j).sum(-1))
    shared_i, shared_j = col_i % 40, col_j % 40
    torch.testing.assert_close(mixing._pair_products(bank, shared_i, shared_j),
                               (bank[shared_i] * bank[shared_j]).sum(-1), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_an_empty_batch_gets_empty_draws_and_logits(dtype):
    q = torch.zeros(0, 8, dtype=dtype, requires_grad=True)
    bank = unit(20, 8, seed=0).to(dtype)
    neg = q @ bank.t()
    plan = sample_plan(neg, 4, 3, 2)
    assert plan.hard_idx.shape == (0, 4) and plan.pair_i.shape == (0, 3) and plan.query_j.shape == (0, 2)
    assert mixing.synthetic_logits(q, neg, bank, plan).shape == (0, 5)


def test_draws_are_the_documented_stream():
    """sample_plan's draws, written out in the order they are taken from the generator: the pool (no draws),
    i ~ U{0..N-1}, an offset ~ U{1..N-1} (j = i + offset mod N), a ~ U(0, 1), then the query mixes' j and b.
    A change to the head that reorders or adds draws changes every run's trajectory; this pins them."""
    _, _, logits = setup()
    n, s, s_q, b_max = 10, 7, 5, 0.3
    plan = sample_plan(logits, n, s, s_q, beta_max=b_max, generator=torch.Generator().manual_seed(21))
    g = torch.Generator().manual_seed(21)
    b = logits.shape[0]
    pair_i = torch.randint(0, n, (b, s), generator=g)
    pair_j = (pair_i + torch.randint(1, n, (b, s), generator=g)) % n
    alpha = torch.rand((b, s), generator=g)
    query_j = torch.randint(0, n, (b, s_q), generator=g)
    beta = torch.rand((b, s_q), generator=g) * b_max
    assert torch.equal(plan.hard_idx, torch.topk(logits.detach(), n, dim=1, sorted=False).indices)
    for got, want in ((plan.pair_i, pair_i), (plan.pair_j, pair_j), (plan.alpha, alpha), (plan.query_j, query_j),
                      (plan.beta, beta)):
        assert torch.equal(got, want)
