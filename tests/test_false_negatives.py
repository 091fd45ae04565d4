"""Label-free false-negative handling (``false_negatives``): the support-view detector on cases with a known
answer and against a loop, the multi-positive InfoNCE against its formula written out and on closed forms,
elimination / attraction / nearest positive through a model against losses written out, MoCHi's hard pool,
the monitors on a constructed labelled case, and bad settings."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_loss import unit
from torch import nn

from mochi_retrieval.config import ConfigError, ExperimentConfig
from mochi_retrieval.config.engine import from_dict
from mochi_retrieval.false_negatives import (
    FalseNegativeConfig,
    FalseNegativeStep,
    detector_monitors,
    false_negative_step,
    flag_top_k,
    nearest_entry,
    support_scores,
)
from mochi_retrieval.loss import MoCHiConfig, contrastive_loss, info_nce_from_logits, multi_positive_info_nce
from mochi_retrieval.moco import MoCo


# ------------------------------------------------------------------ detector
@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_support_views_equal_to_known_entries_flag_those_entries(aggregate):
    """Orthonormal entries; image b's S = 2 support views are entries idx[b]: those two are flagged, and no
    other (their score is 1/2 (mean) or 1 (max), every other entry's 0)."""
    m, b = 12, 3
    bank = torch.eye(16)[:m]
    idx = torch.tensor([[0, 5], [7, 2], [11, 3]])
    support = bank[idx].transpose(0, 1)  # (S, B, D)
    scores = support_scores(support, bank, aggregate)
    flags = flag_top_k(scores, torch.zeros(b, m, dtype=torch.bool), k=2)
    expected = torch.zeros(b, m, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(flags, expected)
    # An entry another rule masks is never flagged; the next best (score 0) takes its place.
    excluded = torch.zeros(b, m, dtype=torch.bool)
    excluded[0, 5] = True
    flags = flag_top_k(scores, excluded, k=2)
    assert flags[0, 0] and not flags[0, 5] and flags[0].sum() == 2
    # A threshold between the flagged scores and the rest keeps exactly them; above them, none.
    assert torch.equal(flag_top_k(scores, torch.zeros_like(excluded), k=4, threshold=0.25), expected)
    top = 0.5 if aggregate == "mean" else 1.0
    assert not flag_top_k(scores, torch.zeros_like(excluded), k=2, threshold=top).any()


def test_support_scores_and_top_k_match_a_loop():
    s, b, m, d = 3, 4, 30, 8
    support, queue, extra = unit(s, b, d, seed=1), unit(m, d, seed=2), unit(b, 5, d, seed=3)
    excluded = torch.rand(b, m + 5, generator=torch.Generator().manual_seed(4)) < 0.2
    for aggregate in ("mean", "max"):
        scores = support_scores(support, [queue, extra], aggregate)
        flags = flag_top_k(scores, excluded, k=6)
        for i in range(b):
            entries = torch.cat([queue, extra[i]])
            per_view = [[float(support[v, i] @ entries[j]) for v in range(s)] for j in range(m + 5)]
            ref = [sum(p) / s if aggregate == "mean" else max(p) for p in per_view]
            assert scores[i].tolist() == pytest.approx(ref, abs=1e-6)
            allowed = sorted((j for j in range(m + 5) if not excluded[i, j]), key=lambda j: -ref[j])
            assert set(torch.nonzero(flags[i]).view(-1).tolist()) == set(allowed[:6])


def test_nearest_entry_is_the_best_unmasked_match_of_the_key():
    bank = torch.eye(6)
    k = F.normalize(bank[[2, 4]] + 0.5 * bank[[3, 1]], dim=1)
    excluded = torch.zeros(2, 6, dtype=torch.bool)
    assert nearest_entry(k, bank, excluded).tolist() == [2, 4]
    excluded[0, 2] = True
    assert nearest_entry(k, bank, excluded).tolist() == [3, 4]
    with pytest.raises(ValueError, match="no unmasked negative"):
        nearest_entry(k, bank, torch.ones(2, 6, dtype=torch.bool))


def test_elimination_masks_exactly_the_flagged_entries_and_attraction_makes_them_positives():
    q, k, queue = unit(4, 8, seed=5), unit(4, 8, seed=6), unit(20, 8, seed=7)
    support = unit(2, 4, 8, seed=8)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    mask[:, 3] = True  # e.g. the query's own image
    flagged = flag_top_k(support_scores(support, queue), mask, k=5)
    elim = false_negative_step(FalseNegativeConfig("eliminate", top_k=5, start_epoch=0), q, k, [queue], mask,
                               support, epoch=1.0)
    assert torch.equal(elim.flagged, flagged) and torch.equal(elim.mask, mask | flagged)
    assert elim.positives is None and torch.equal(elim.positive_key, k)
    attr = false_negative_step(FalseNegativeConfig("attract", top_k=5, start_epoch=0), q, k, [queue], mask,
                               support, epoch=1.0)
    assert torch.equal(attr.positives, flagged) and torch.equal(attr.mask, mask | flagged)
    late = FalseNegativeConfig("attract", start_epoch=2.0)
    assert false_negative_step(late, q, k, [queue], mask, support, epoch=1.9) is None
    with_key = FalseNegativeConfig("eliminate", top_k=5, support_views=0, support_with_key=True, start_epoch=0)
    step = false_negative_step(with_key, q, k, [queue], mask, None, epoch=1.0)
    assert torch.equal(step.flagged, flag_top_k(k @ queue.T, mask, k=5))


# ------------------------------------------------------------------ multi-positive loss
def multi_positive_reference(q, k, bank, positives, t):
    """-1/|P| sum_p log softmax over every logit, query by query, straight from the formula."""
    losses = []
    for i in range(q.shape[0]):
        logits = torch.cat([(q[i] * k[i]).sum().view(1), bank @ q[i]]) / t
        log_p = logits - torch.logsumexp(logits, 0)
        cols = [0] + [1 + j for j in range(bank.shape[0]) if positives[i, j]]
        losses.append(-torch.stack([log_p[c] for c in cols]).mean())
    return torch.stack(losses).mean()


def test_multi_positive_loss_matches_the_formula_in_value_and_gradient():
    t = 0.2
    q0, k, bank = unit(5, 8, seed=9), unit(5, 8, seed=10), unit(16, 8, seed=11)
    positives = torch.rand(5, 16, generator=torch.Generator().manual_seed(12)) < 0.25
    positives[0] = False  # a query with the key alone
    q1, q2 = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    out = contrastive_loss(q1, k, bank, t, positives=positives)
    ref = multi_positive_reference(q2, k, bank, positives, t)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    ref.backward()
    assert torch.isfinite(q1.grad).all()
    torch.testing.assert_close(q1.grad, q2.grad)
    # The positives are not negatives: -inf in the output's negative logits (and so in the proxy accuracy).
    assert torch.isinf(out.neg_logits[positives]).all() and torch.isfinite(out.neg_logits[~positives]).all()


def test_multi_positive_closed_forms():
    t = 0.5
    # Identical keys: every logit equal, each positive's log-softmax is -log(M + 1), whatever P is.
    q = unit(3, 6, seed=13)
    bank = q[:1].expand(9, -1)
    same = q[:1].expand(3, -1)
    positives = torch.zeros(3, 9, dtype=torch.bool)
    positives[1, :4] = True
    out = contrastive_loss(same, same, bank, t, positives=positives)
    assert out.loss.item() == pytest.approx(math.log(10), rel=1e-6)
    # q.k = 1, E extra positives at 1, N negatives at 0: L = log(1 + E + N exp(-1/T)).
    eye = torch.eye(8)
    q, bank = eye[:1], eye.clone()
    bank[:2] = eye[0]  # two entries equal to q
    positives = torch.tensor([[True, True] + [False] * 6])
    out = contrastive_loss(q, q.clone(), bank, t, positives=positives)
    assert out.loss.item() == pytest.approx(math.log(3 + 6 * math.exp(-1 / t)), rel=1e-6)
    # With no extra positive it is the one-positive InfoNCE.
    pos, neg = torch.randn(4), torch.randn(4, 7)
    none = torch.full((4, 7), float("-inf"))
    torch.testing.assert_close(multi_positive_info_nce(pos, none, neg, t), info_nce_from_logits(pos, neg, t))


def test_hard_pool_takes_no_positive():
    q, k, bank = unit(6, 8, seed=14), unit(6, 8, seed=15), unit(40, 8, seed=16)
    positives = torch.zeros(6, 40, dtype=torch.bool)
    top = torch.topk(q @ bank.T, 5, dim=1).indices  # the hardest entries: the pool would take them
    positives.scatter_(1, top, True)
    mochi = MoCHiConfig(n_hard=10, n_mix=8, n_query_mix=4)
    out = contrastive_loss(q, k, bank, 0.2, mochi=mochi, positives=positives,
                           generator=torch.Generator().manual_seed(0))
    assert not positives.gather(1, out.plan.hard_idx).any()


# ------------------------------------------------------------------ through the model
def make(handling: str, mochi: MoCHiConfig | None = None, **fn) -> MoCo:
    torch.manual_seed(0)
    enc = nn.Linear(5, 6)
    enc.output_dim = 6
    cfg = FalseNegativeConfig(handling, start_epoch=1.0, **{"top_k": 3, "support_views": 2, **fn})
    return MoCo(enc, head_hidden_dim=8, head_out_dim=4, queue_size=16, temperature=0.3, momentum=1.0,
                mochi=mochi, false_negatives=cfg)


def step_inputs(model: MoCo):
    """Fill the queue with real keys (before the start epoch), then the inputs of a step after it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 5, generator=g)
    model(x, x, ids=torch.arange(16), epoch=0.0, step=0)
    x1, x2, xs = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    return x1, x2, xs


@pytest.mark.parametrize("handling", ["eliminate", "attract", "nearest_replace", "nearest_join"])
def test_model_loss_matches_the_handling_written_out(handling):
    fn = {"nearest": handling.split("_")[1]} if handling.startswith("nearest") else {}
    model = make("nearest_positive" if fn else handling, **fn)
    x1, x2, xs = step_inputs(model)
    qnet, knet, queue = copy.deepcopy(model.query_net), copy.deepcopy(model.key_net), model.queue.keys.clone()
    out = model(x1, x2, ids=torch.arange(20, 24), labels=torch.tensor([0, 1, 0, 1]), epoch=1.0, step=1,
                view_support=xs)
    with torch.no_grad():
        q, k = F.normalize(qnet(x1), dim=1), F.normalize(knet(x2), dim=1)
        support = torch.stack([F.normalize(knet(v), dim=1) for v in xs])
    if fn:
        nearest = (k @ queue.T).argmax(1)
        flagged = torch.zeros(4, 16, dtype=torch.bool).scatter_(1, nearest.view(-1, 1), True)
    else:
        scores = torch.stack([s @ queue.T for s in support]).mean(0)
        flagged = torch.zeros(4, 16, dtype=torch.bool).scatter_(1, torch.topk(scores, 3, dim=1).indices, True)
    assert torch.equal(model.fn_step.flagged, flagged)
    if handling == "eliminate":
        logits = torch.cat([(q * k).sum(1, keepdim=True), (q @ queue.T).masked_fill(flagged, float("-inf"))], 1)
        expected = -(logits / 0.3).log_softmax(1)[:, 0].mean()
    elif handling == "nearest_replace":
        pos = (q * queue[nearest]).sum(1, keepdim=True)
        logits = torch.cat([pos, (q @ queue.T).masked_fill(flagged, float("-inf"))], 1)
        expected = -(logits / 0.3).log_softmax(1)[:, 0].mean()
    else:  # attraction, and the nearest entry joining the key: a multi-positive loss
        expected = multi_positive_reference(q, k, queue, flagged, 0.3)
    torch.testing.assert_close(out["loss"], expected, atol=1e-5, rtol=1e-5)
    assert {"fn_flagged", "fn_mass", "fn_precision", "fn_recall"} <= set(out["monitors"])
    assert ("fn_support_s" in out["monitors"]) == (not fn)
    # The queue takes the step's own keys, whatever the positive was.
    torch.testing.assert_close(model.queue.keys[:4], k)


@pytest.mark.parametrize("handling", ["eliminate", "attract"])
def test_oracle_control_keeps_only_the_flags_of_the_querys_class(handling):
    """``oracle``: the detector's top k, written out, filtered by the labels the queue holds; the loss is the
    handling's written out on those flags, precision 1; without labels a clear error."""
    model = make(handling, oracle=True, top_k=6)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 5, generator=g)
    entry_labels = torch.arange(16) % 3
    model(x, x, ids=torch.arange(16), labels=entry_labels, epoch=0.0, step=0)
    x1, x2, xs = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 0])
    qnet, knet, queue = copy.deepcopy(model.query_net), copy.deepcopy(model.key_net), model.queue.keys.clone()
    out = model(x1, x2, ids=torch.arange(20, 24), labels=labels, epoch=1.0, step=1, view_support=xs)
    with torch.no_grad():
        q, k = F.normalize(qnet(x1), dim=1), F.normalize(knet(x2), dim=1)
        scores = torch.stack([F.normalize(knet(v), dim=1) @ queue.T for v in xs]).mean(0)
    top = torch.zeros(4, 16, dtype=torch.bool).scatter_(1, torch.topk(scores, 6, dim=1).indices, True)
    flagged = top & (entry_labels.view(1, -1) == labels.view(-1, 1))
    assert torch.equal(model.fn_step.flagged, flagged) and flagged.any() and (top & ~flagged).any()
    if handling == "eliminate":
        logits = torch.cat([(q * k).sum(1, keepdim=True), (q @ queue.T).masked_fill(flagged, float("-inf"))], 1)
        expected = -(logits / 0.3).log_softmax(1)[:, 0].mean()
    else:
        expected = multi_positive_reference(q, k, queue, flagged, 0.3)
    torch.testing.assert_close(out["loss"], expected, atol=1e-5, rtol=1e-5)
    assert out["monitors"]["fn_precision"].item() == 1.0
    with pytest.raises(ValueError, match="false_negatives.oracle: the batch carries no labels"):
        model(x1, x2, ids=torch.arange(20, 24), epoch=1.0, step=2, view_support=xs)


@pytest.mark.parametrize("handling", ["eliminate", "attract", "nearest_positive"])
def test_model_hard_pool_excludes_flagged_entries(handling):
    model = make(handling, mochi=MoCHiConfig(n_hard=12, n_mix=6, n_query_mix=2), top_k=4)
    x1, x2, xs = step_inputs(model)
    out = model(x1, x2, ids=torch.arange(20, 24), epoch=1.0, step=1, view_support=xs)
    flagged = model.fn_step.flagged
    assert flagged.any() and "hard_idx" in out
    assert not flagged.gather(1, out["hard_idx"]).any()


def test_missing_support_views_and_inactive_steps():
    model = make("eliminate")
    x1, x2, xs = step_inputs(model)
    with pytest.raises(ValueError, match="support_views=2: the batch must carry"):
        model(x1, x2, epoch=1.0, step=1)
    out = model(x1, x2, epoch=0.5, step=1)  # before start_epoch: plain MoCo, no support views needed
    assert model.fn_step is None and "monitors" not in out


def test_state_dict_holds_no_new_state():
    torch.manual_seed(0)
    enc = nn.Linear(5, 6)
    enc.output_dim = 6
    plain = MoCo(enc, head_hidden_dim=8, head_out_dim=4, queue_size=16)
    assert set(make("attract").state_dict()) == set(plain.state_dict())


# ------------------------------------------------------------------ monitors
def test_monitors_on_a_constructed_labelled_case():
    """2 queries, 6 entries. Query 0 (class 1): flags entries 0, 1, 4 (classes 1, 0, 1; entry 5 unknown);
    query 1 (class 0): flags entry 5 (unknown class) only."""
    flagged = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    scores[1, 0] = float("-inf")  # masked by another rule
    step = FalseNegativeStep(flagged, flagged, None, torch.zeros(2, 3), scores)
    entry_labels = torch.tensor([1, 0, 1, 1, 1, -1])
    labels = torch.tensor([1, 0])
    pos = torch.tensor([1.0, 0.5])
    stats = detector_monitors(step, pos, 0.5, labels, entry_labels, top=3)
    # Precision: flagged entries of known class 3 (0, 1, 4 of query 0; entry 5 is unknown), of the query's
    # class 2 (entries 0 and 4).
    assert stats["fn_precision"].item() == pytest.approx(2 / 3)
    # Recall in the top 3 by q.n: query 0 -> entries 0, 1, 2, its class {0, 2}, flagged {0}; query 1 -> entries
    # 5, 4, 3, its class (0) none of them. So 1 of 2.
    assert stats["fn_recall"].item() == pytest.approx(1 / 2)
    assert stats["fn_flagged"].item() == pytest.approx(2.0)
    logits = torch.cat([pos.view(-1, 1), scores], 1) / 0.5
    prob = logits.softmax(1)[:, 1:]
    assert stats["fn_mass"].item() == pytest.approx(((prob * flagged).sum(1)).mean().item())
    assert set(detector_monitors(step, pos, 0.5, None, entry_labels)) == {"fn_flagged", "fn_mass"}


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("bad,key", [
    ({"handling": "cancel"}, "false_negatives.handling"),
    ({"handling": "eliminate", "support_views": 0}, "false_negatives.support_views"),
    ({"support_views": -1}, "false_negatives.support_views"),
    ({"top_k": 0}, "false_negatives.top_k"),
    ({"threshold": 1.5}, "false_negatives.threshold"),
    ({"aggregate": "median"}, "false_negatives.aggregate"),
    ({"start_epoch": -1}, "false_negatives.start_epoch"),
    ({"nearest": "both"}, "false_negatives.nearest"),
    ({"handling": "nearest_positive", "oracle": True}, "false_negatives.oracle"),
    ({"handling": "attract", "top_k": 4096}, "false_negatives.top_k"),
])
def test_bad_settings_name_the_field(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(ExperimentConfig, {"moco": {"queue_size": 4096}, "false_negatives": bad})


def test_text_runs_refuse_the_option():
    with pytest.raises(ConfigError, match="false_negatives.handling"):
        from_dict(ExperimentConfig, {"data": {"dataset": "debian"}, "false_negatives": {"handling": "eliminate"}})


# ------------------------------------------------------------------ data and training program
def test_support_views_are_drawn_after_the_two_views():
    from mochi_retrieval.data.augment import BatchAugment
    from mochi_retrieval.data.images import InMemoryViews, Sharding

    images = torch.randint(0, 255, (16, 1, 12, 12), dtype=torch.uint8)
    plain = InMemoryViews(images, None, Sharding(8), BatchAugment(out_size=12), seed=3)
    extra = InMemoryViews(images, None, Sharding(8), BatchAugment(out_size=12), seed=3, support_views=3)
    a, b = next(plain.epoch(0)), next(extra.epoch(0))
    assert "view_support" not in a and b["view_support"].shape == (3, 8, 1, 12, 12)
    assert torch.equal(a["view_q"], b["view_q"]) and torch.equal(a["view_k"], b["view_k"])
    assert not torch.equal(b["view_support"][0], b["view_support"][1])


def test_folder_views_carry_support_views(tmp_path):
    from test_train import make_image_folder

    from mochi_retrieval.data.images import FolderViews, Sharding

    root = make_image_folder(tmp_path / "imgs")
    views = FolderViews(str(root / "train"), Sharding(4), seed=0, image_size=16, num_workers=0, support_views=2)
    batch = next(views.epoch(0))
    assert batch["view_support"].shape == (2, 4, 3, 16, 16)
    plain = next(FolderViews(str(root / "train"), Sharding(4), seed=0, image_size=16, num_workers=0).epoch(0))
    assert "view_support" not in plain and torch.equal(plain["view_q"], batch["view_q"])
