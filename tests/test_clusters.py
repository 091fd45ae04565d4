"""Label-free false-negative masking by clusters of the queue (``moco.false_negative_clusters``): spherical
k-means against scikit-learn's k-means on the same unit points, the mask against a loop and against the label
oracle on separated classes, the loss against one written out, and bad input."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch import nn

from mochi_retrieval.clusters import assign_clusters, same_cluster_mask, spherical_kmeans
from mochi_retrieval.config import ConfigError, ExperimentConfig
from mochi_retrieval.config.engine import from_dict
from mochi_retrieval.moco import MoCo
from mochi_retrieval.negatives import false_negative_mask


def blobs(n_per: int, centres: int, dim: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit points around ``centres`` random unit directions: (N, D) points and (N,) their centre."""
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(centres, dim, generator=g), dim=1)
    labels = torch.arange(centres).repeat_interleave(n_per)
    x = F.normalize(mu[labels] + spread * torch.randn(len(labels), dim, generator=g), dim=1)
    return x, labels


def test_spherical_kmeans_finds_the_partition_sklearn_finds():
    x, labels = blobs(60, 6, 16, 0.1)
    ours = assign_clusters(x, spherical_kmeans(x, 6, generator=torch.Generator().manual_seed(0)))
    # On unit vectors, squared distance = 2 - 2 cos: Euclidean k-means is the reference partition.
    ref = KMeans(6, n_init=10, random_state=0).fit_predict(x.numpy())
    assert adjusted_rand_score(ref, ours.numpy()) == 1.0
    assert adjusted_rand_score(labels.numpy(), ours.numpy()) == 1.0


def test_one_lloyd_iteration_written_out():
    x, _ = blobs(10, 3, 5, 1.0, seed=1)
    init = F.normalize(torch.randn(3, 5, generator=torch.Generator().manual_seed(2)), dim=1)
    got = spherical_kmeans(x, 3, iters=1, init=init)
    assign = np.argmax(x.numpy() @ init.numpy().T, axis=1)
    for c in range(3):
        members = x.numpy()[assign == c]
        want = init[c].numpy() if len(members) == 0 else members.sum(0) / np.linalg.norm(members.sum(0))
        np.testing.assert_allclose(got[c].numpy(), want, atol=1e-6)


def test_mask_matches_a_loop_for_shared_and_per_query_blocks():
    g = torch.Generator().manual_seed(3)
    k = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    shared = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    per_query = F.normalize(torch.randn(4, 5, 8, generator=g), dim=1)
    c = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    mask = same_cluster_mask(k, [shared, per_query], c)
    assert mask.shape == (4, 15)
    nearest = lambda v: int(torch.argmax(c @ v))  # noqa: E731
    for b in range(4):
        row = [nearest(n) == nearest(k[b]) for n in shared] + [nearest(n) == nearest(k[b]) for n in per_query[b]]
        assert mask[b].tolist() == row


def test_on_separated_classes_the_cluster_mask_is_the_label_mask():
    x, labels = blobs(40, 5, 12, 0.08, seed=4)
    c = spherical_kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    queries = torch.tensor([0, 45, 90, 130, 199])
    got = same_cluster_mask(x[queries], [x], c)
    oracle = false_negative_mask(torch.arange(len(x)), labels, torch.full((5, 1), -1), labels[queries].view(-1, 1))
    assert torch.equal(got, oracle)


def test_bad_input_is_named():
    x, _ = blobs(5, 2, 4, 0.1)
    with pytest.raises(ValueError, match="1 <= k <= N"):
        spherical_kmeans(x, 11)
    with pytest.raises(ValueError, match="iters"):
        spherical_kmeans(x, 2, iters=0)
    with pytest.raises(ValueError, match="init must be"):
        spherical_kmeans(x, 2, init=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"x must be \(N, D\)"):
        spherical_kmeans(x[0], 2)
    for bad in ({"moco": {"false_negative_clusters": -1}}, {"moco": {"cluster_every": 0}},
                {"moco": {"cluster_start_epoch": -1}}, {"moco": {"false_negative_clusters": 4},
                                                       "data": {"dataset": "debian"}}):
        with pytest.raises(ConfigError, match="moco"):
            from_dict(ExperimentConfig, bad)
    enc = nn.Linear(5, 6)
    enc.output_dim = 6
    with pytest.raises(ValueError, match="false_negative_clusters=20 is more than the queue's 16 keys"):
        MoCo(enc, head_hidden_dim=8, head_out_dim=4, queue_size=16, false_negative_clusters=20)


def make(start: float = 1.0) -> MoCo:
    torch.manual_seed(0)
    enc = nn.Linear(5, 6)
    enc.output_dim = 6
    return MoCo(enc, head_hidden_dim=8, head_out_dim=4, queue_size=12, temperature=0.3, momentum=1.0,
                false_negative_clusters=3, cluster_every=2, cluster_start_epoch=start)


def test_loss_drops_the_negatives_in_the_positive_keys_cluster():
    model = make()
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(5))
    model(x, x, ids=torch.arange(12), epoch=0.0, step=0)  # fills the queue with real keys; before the start
    assert not model.fn_centroids.any()
    qnet, knet = copy.deepcopy(model.query_net), copy.deepcopy(model.key_net)
    queue = model.queue.keys.clone()
    x1, x2 = torch.randn(4, 5), torch.randn(4, 5)
    out = model(x1, x2, ids=torch.arange(20, 24), labels=torch.zeros(4, dtype=torch.long), epoch=1.0, step=2)
    centroids = spherical_kmeans(queue, 3, generator=torch.Generator().manual_seed(2))  # seed * 1_000_003 + step
    assert torch.allclose(model.fn_centroids, centroids)
    q, k = F.normalize(qnet(x1), dim=1), F.normalize(knet(x2), dim=1)
    same = assign_clusters(queue, centroids).view(1, -1) == assign_clusters(k, centroids).view(-1, 1)
    assert same.any() and not same.all()
    logits = torch.cat([(q * k).sum(1, keepdim=True), (q @ queue.T).masked_fill(same, float("-inf"))], dim=1)
    expected = -(logits / 0.3).log_softmax(1)[:, 0].mean()
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert torch.isclose(out["monitors"]["cluster_masked"], same.float().mean())


def test_centroids_refresh_on_schedule_and_travel_in_the_state_dict():
    model = make(start=0.0)
    gen = torch.Generator().manual_seed(6)
    model(torch.randn(12, 5, generator=gen), torch.randn(12, 5, generator=gen), ids=torch.arange(12), step=0)
    first = model.fn_centroids.clone()  # the first real keys arrive after step 0's mask: set at step 1
    assert not first.any()
    model(torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen), ids=torch.arange(4), step=1)
    set_at_1 = model.fn_centroids.clone()
    model(torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen), ids=torch.arange(4), step=3)
    assert torch.equal(model.fn_centroids, set_at_1)  # step 3 is not a refresh step (every 2)
    model(torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen), ids=torch.arange(4), step=4)
    assert not torch.equal(model.fn_centroids, set_at_1)
    resumed = make(start=0.0)
    resumed.load_state_dict(model.state_dict())
    assert torch.equal(resumed.fn_centroids, model.fn_centroids)


def test_cluster_monitors_on_a_constructed_labelled_case():
    """Query 0 (class 1) masks entries 0, 1 (classes 1, 0); query 1 (class 0) masks entry 3 (unknown class):
    3 of 8 cells masked, 1 of the 3 masked entries the query's class."""
    from mochi_retrieval.moco import cluster_monitors

    masked = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    stats = cluster_monitors(masked, torch.tensor([1, 0]), torch.tensor([1, 0, 1, -1]))
    assert stats["cluster_masked"].item() == pytest.approx(3 / 8)
    assert stats["cluster_precision"].item() == pytest.approx(1 / 3)
    per_query = torch.tensor([[1, 0, 1, -1], [0, 0, 1, -1]])  # (B, M) entry labels: query 1's entry 0 is class 0
    masked[1, 0] = True
    assert cluster_monitors(masked, torch.tensor([1, 0]), per_query)["cluster_precision"].item() == pytest.approx(2 / 4)
    assert set(cluster_monitors(masked, None, per_query)) == {"cluster_masked"}
