"""Pure functions behind the text step: duplicate masking across sources, per-source softmax mass,
doc-doc cosine, family share, and groups by tokenised input."""
import itertools

import pytest
import torch

from mochi_retrieval.data.text_pairs import family_groups, token_groups
from mochi_retrieval.monitors import family_share, mean_pairwise_cosine, source_mass
from mochi_retrieval.negatives import duplicate_mask


def duplicate_mask_loop(keys, source):
    """An entry is a duplicate when a column of an earlier source holds the same key (-1 never)."""
    b, m = keys.shape
    out = torch.zeros(b, m, dtype=torch.bool)
    for i, j in itertools.product(range(b), range(m)):
        k = int(keys[i, j])
        out[i, j] = k != -1 and any(int(keys[i, c]) == k and int(source[c]) < int(source[j]) for c in range(m))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_duplicate_mask_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-1, 6, (5, 12), generator=g)
    source = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    assert torch.equal(duplicate_mask(keys, source), duplicate_mask_loop(keys, source))


def test_duplicate_mask_keeps_duplicates_within_one_source():
    keys = torch.tensor([[4, 4, 7, 4, -1, -1]])
    source = torch.tensor([0, 0, 0, 1, 1, 1])
    assert duplicate_mask(keys, source).tolist() == [[False, False, False, True, False, False]]


def test_source_mass_is_the_softmax_split_by_source():
    pos = torch.tensor([0.9, 0.2])
    neg = torch.tensor([[0.5, 0.1, float("-inf"), 0.3], [0.4, 0.4, 0.0, 0.2]])
    syn = torch.tensor([[0.6], [0.1]])
    t = 0.1
    mass = source_mass(pos, neg, syn, {"in_batch": 2, "bank": 2}, t)
    p = torch.softmax(torch.cat([pos.view(-1, 1), neg, syn], 1) / t, 1)
    torch.testing.assert_close(mass["mass_in_batch"], p[:, 1:3].sum(1).mean())
    torch.testing.assert_close(mass["mass_bank"], p[:, 3:5].sum(1).mean())
    total = sum(mass.values())
    torch.testing.assert_close(total, torch.tensor(1.0))


def test_mean_pairwise_cosine_equals_the_explicit_mean():
    x = torch.nn.functional.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    sims = x @ x.t()
    want = (sims.sum() - sims.diag().sum()) / (7 * 6)
    torch.testing.assert_close(mean_pairwise_cosine(x), want)


def test_family_share_counts_the_positive_family_in_the_top_pool():
    neg = torch.tensor([[0.9, 0.8, 0.1, float("-inf")], [0.2, 0.7, 0.6, 0.5]])
    fam = torch.tensor([[3, 5, 3, 3], [1, 2, 2, -1]])
    # Row 0: top-2 = columns 0 (family 3 = its own), 1. Row 1: top-2 = columns 1, 2, both family 2 = its own.
    got = family_share(neg, fam, torch.tensor([3, 2]), pool=2)
    assert got.item() == pytest.approx(3 / 4)


def truncating_tokenize(max_len):
    vocab = {}

    def tokenize(texts):
        rows = [[vocab.setdefault(w, len(vocab) + 1) for w in t.split()][:max_len] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}
    return tokenize


def test_token_groups_join_texts_that_differ_only_after_truncation():
    texts = ["a b c d", "a b c e", "a b x", "a b c d", "z"]
    groups, table = token_groups(texts, truncating_tokenize(3), batch_size=2)
    assert groups.tolist() == [0, 0, 1, 0, 2]
    assert len(table) == 3


def test_family_groups_share_the_first_paragraph():
    docs = ["libfoo does x.\n\nThis is the dev package.", "libfoo does x.\n\nRuntime library.", "bar"]
    assert family_groups(docs).tolist() == [0, 0, 1]
