"""TextMoCo against references written from the formulas: in-batch InfoNCE (MNRL), masking of false
negatives, queue + bank + in-batch union, MoCHi on that union, bank refresh and in-place updates."""
import copy
import math

import device_checks
import pytest
import torch
import torch.nn.functional as F
from device_checks import DEVICES
from torch import nn

from mochi_retrieval import mixing
from mochi_retrieval.loss import MoCHiConfig
from mochi_retrieval.negatives import false_negative_mask
from mochi_retrieval.text_model import BankCorpus, BankSettings, TextMoCo

WORDS = "a b c d e f g h i j k l m n o p q r s t u v w x y z".split()
T = 0.05


class ToyTextEncoder(nn.Module):
    """Masked mean of word embeddings: a fast stand-in with the text-encoder contract."""

    output_dim = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(len(WORDS) + 1, self.output_dim, padding_idx=0)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(self.emb.weight.shape, generator=g))
        self.vocab = {w: i + 1 for i, w in enumerate(WORDS)}

    def tokenize(self, texts):
        rows = [[self.vocab[w] for w in t.split()] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    def forward(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (self.emb(batch["input_ids"]) * mask).sum(1) / mask.sum(1)


DOCS = ["a b c", "d e f", "g h i", "j k l", "m n o", "p q r", "s t u", "v w x", "a b c", "y z a"]
GROUPS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 8])  # doc 8 repeats doc 0's text
QUERIES = ["a b", "d e", "g h", "j k", "m n", "p q", "s t", "v w", "a c", "y z"]


def batch_of(enc, idx, exclude=None):
    ids = torch.tensor(idx)
    return {"query": enc.tokenize([QUERIES[i] for i in idx]), "positive": enc.tokenize([DOCS[i] for i in idx]),
            "ids": ids, "exclude": ids.view(-1, 1) if exclude is None else exclude}


def unit(x):
    return F.normalize(x.float(), dim=1)


def test_in_batch_only_equals_multiple_negatives_ranking_loss():
    """Shared encoder, in-batch negatives only: the MNRL loss CE(q k^T / T, diag), values and gradients."""
    enc = ToyTextEncoder()
    ref_enc = copy.deepcopy(enc)
    model = TextMoCo(enc, GROUPS, queue_size=0, temperature=T)
    b = batch_of(enc, [0, 1, 2, 3, 4])
    out = model(**b, step=0)
    q, k = unit(ref_enc(b["query"])), unit(ref_enc(b["positive"]))
    ref = F.cross_entropy(q @ k.t() / T, torch.arange(5))
    torch.testing.assert_close(out["loss"], ref)
    out["loss"].backward()
    ref.backward()
    torch.testing.assert_close(enc.emb.weight.grad, ref_enc.emb.weight.grad)


def test_false_negative_mask_ids_and_groups():
    entry_ids = torch.tensor([0, 8, 3, -1, 5])
    entry_groups = GROUPS[entry_ids.clamp(min=0)].where(entry_ids >= 0, torch.tensor(-1))
    exclude = torch.tensor([[0, -1], [3, 5], [-1, -1]])
    exclude_groups = GROUPS[exclude.clamp(min=0)].where(exclude >= 0, torch.tensor(-1))
    got = false_negative_mask(entry_ids, entry_groups, exclude, exclude_groups)
    want = torch.tensor([[True, True, False, False, False],   # doc 8 = doc 0's text
                         [False, False, True, False, True],
                         [False, False, False, False, False]])  # -1 entries never masked
    assert torch.equal(got, want)


def test_in_batch_duplicates_and_other_positives_are_masked():
    enc = ToyTextEncoder()
    model = TextMoCo(enc, GROUPS, queue_size=0, temperature=T)
    # Query 0's positives are docs 0 and 2 (as for a query text paired with both); doc 8 has doc 0's text.
    exclude = torch.tensor([[0, 2], [1, -1], [2, -1], [8, -1]])
    out = model(**batch_of(enc, [0, 1, 2, 8], exclude), step=0)
    masked = torch.isinf(out["neg_logits"])
    want = torch.tensor([[True, False, True, True],
                         [False, True, False, False],
                         [False, False, True, False],
                         [True, False, False, True]])
    assert torch.equal(masked, want)


def reference_loss(q, k, blocks, masks, temperature):
    """CE over [q.k, every unmasked negative] / T, written out directly."""
    losses = []
    for i in range(q.shape[0]):
        negs = torch.cat([blk[i] if blk.dim() == 3 else blk for blk in blocks])
        keep = ~torch.cat([m[i] for m in masks])
        logits = torch.cat([(q[i] * k[i]).sum().view(1), negs[keep] @ q[i]]) / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def exact_bank_candidates(q, corpus_emb, corpus_ids, exclude, c):
    """Top-c corpus rows by q.d after dropping the positives and every doc sharing their text."""
    out = []
    for i in range(q.shape[0]):
        bad = {int(e) for e in exclude[i] if e >= 0}
        bad_groups = {int(GROUPS[e]) for e in bad}
        keep = [j for j, d in enumerate(corpus_ids.tolist()) if d not in bad and int(GROUPS[d]) not in bad_groups]
        scores = corpus_emb[keep] @ q[i]
        out.append(corpus_emb[[keep[j] for j in scores.topk(c).indices]])
    return torch.stack(out)


def dedupe_masks(groups_per_source, masks):
    """Mask an entry of a later source when an earlier source holds the same group for that query (a loop)."""
    out = [m.clone() for m in masks]
    for i in range(masks[0].shape[0]):
        seen = set()
        for s, groups in enumerate(groups_per_source):
            row = groups[i] if groups.dim() == 2 else groups
            here = set()
            for j, g in enumerate(row.tolist()):
                if g >= 0 and g in seen:
                    out[s][i, j] = True
                here.add(g)
            seen |= here
    return out


@pytest.mark.parametrize("gradient", ["joint", "query_only"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_union_of_in_batch_queue_and_bank_matches_reference(backend, gradient):
    """Joint: one CE over the union. Query-only: that CE (documents detached) plus the in-batch CE
    (query detached); the same value, gradients split (see the gradient tests)."""
    enc = ToyTextEncoder()
    corpus_ids = torch.arange(len(DOCS))
    bank = BankSettings(candidates=3, backend=backend, device="cpu", update_with_keys=False)
    model = TextMoCo(enc, GROUPS, queue_size=6, temperature=T, bank=bank,
                     bank_corpus=BankCorpus(corpus_ids, DOCS), gradient=gradient)
    model(**batch_of(enc, [3, 4, 5]), step=0)  # fills half the queue with ids 3, 4, 5
    queue_keys, queue_ids = model.queue.keys.clone(), model.queue.ids.clone()
    b = batch_of(enc, [0, 3, 9])
    out = model(**b, step=1)

    with torch.no_grad():
        q, k = unit(enc(b["query"])), unit(enc(b["positive"]))
        corpus = unit(enc(enc.tokenize(DOCS)))
        exclude = b["exclude"]
        ex_groups = GROUPS[exclude]
        cands = exact_bank_candidates(q, corpus, corpus_ids, exclude, 3)
        q_groups = torch.where(queue_ids >= 0, GROUPS[queue_ids.clamp(min=0)], -1)
        masks = [false_negative_mask(b["ids"], GROUPS[b["ids"]], exclude, ex_groups),
                 false_negative_mask(queue_ids, q_groups, exclude, ex_groups),
                 torch.zeros(3, 3, dtype=torch.bool)]
        assert masks[1][1].any()  # the queue holds doc 3, query 1's positive: masked
        cand_ids = torch.stack([torch.tensor([int(((corpus - c).abs().sum(1) < 1e-6).nonzero()[0]) for c in row])
                                for row in cands])
        deduped = dedupe_masks([GROUPS[b["ids"]], q_groups, GROUPS[cand_ids]], masks)
        assert deduped[1][0].sum() > masks[1][0].sum()  # doc 3 is in the batch and in the queue: once
        ref = reference_loss(q, k, [k, queue_keys, cands], deduped, T)
        if gradient == "query_only":
            ref = ref + reference_loss(q, k, [k], deduped[:1], T)
    torch.testing.assert_close(out["loss"].detach(), ref, atol=1e-5, rtol=1e-5)
    assert out["neg_logits"].shape == (3, 3 + 6 + 3)


def test_mochi_pool_is_drawn_from_the_union_and_matches_materialised_mixing():
    """With MoCHi, the loss equals CE over real logits plus q.h for h built explicitly from the union."""
    enc = ToyTextEncoder()
    mochi = MoCHiConfig(n_hard=6, n_mix=6, n_query_mix=3)
    bank = BankSettings(candidates=2, backend="torch", device="cpu")
    model = TextMoCo(enc, GROUPS, queue_size=4, temperature=T, mochi=mochi, bank=bank,
                     bank_corpus=BankCorpus(torch.arange(len(DOCS)), DOCS), seed=3, gradient="joint")
    model(**batch_of(enc, [5, 6, 7]), step=0)
    queue_keys = model.queue.keys.clone()
    bank_before = copy.deepcopy(model.bank)
    b = batch_of(enc, [0, 1, 2])
    out = model(**b, step=1)
    with torch.no_grad():
        q, k = unit(enc(b["query"])), unit(enc(b["positive"]))
        _, cands = bank_before.candidates(q, 2, exclude=b["exclude"])
        negatives = (k, queue_keys, cands)
        neg = out["neg_logits"]
        plan = mixing.sample_plan(neg, 6, 6, 3, generator=model._step_generator(1, q.device))
        h = mixing.synthesize(q, negatives, plan)
        synthetic = torch.einsum("bd,bsd->bs", q, h)
        logits = torch.cat([(q * k).sum(1, keepdim=True), neg, synthetic], dim=1) / T
        ref = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    # The pool spans the blocks: its columns index the concatenation [in-batch | queue | bank].
    assert plan.hard_idx.max() >= 3 + 4 or plan.hard_idx.min() < 3
    torch.testing.assert_close(out["loss"].detach(), ref, atol=1e-5, rtol=1e-5)


def test_bank_refresh_replaces_stale_embeddings_and_batches_update_in_place():
    enc = ToyTextEncoder()
    bank = BankSettings(candidates=2, refresh_every=3, backend="torch", device="cpu")
    model = TextMoCo(enc, GROUPS, queue_size=0, temperature=T, bank=bank,
                     bank_corpus=BankCorpus(torch.arange(len(DOCS)), DOCS))
    opt = torch.optim.SGD(enc.parameters(), lr=5.0)
    for step in range(3):
        out = model(**batch_of(enc, [0, 1, 2]), step=step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert [r["step"] for r in model.refresh_log] == [0]
    # In place: the rows of the last batch hold its keys, computed before the optimiser step.
    torch.testing.assert_close(model.bank.embeddings[:3], out["k"])
    with torch.no_grad():
        fresh = unit(enc(enc.tokenize(DOCS)))
    assert not torch.allclose(model.bank.embeddings[3:], fresh[3:], atol=1e-3)  # stale
    model(**batch_of(enc, [3, 4, 5]), step=3)  # refresh due at step 3, before the forward
    assert [r["step"] for r in model.refresh_log] == [0, 3]
    torch.testing.assert_close(model.bank.embeddings[6:], fresh[6:], atol=1e-6, rtol=0)


def test_momentum_key_encoder_gets_no_gradient_and_trails_the_query_encoder():
    enc = ToyTextEncoder()
    model = TextMoCo(enc, GROUPS, key_encoder="momentum", momentum=0.5, queue_size=8, temperature=T)
    opt = torch.optim.SGD(enc.parameters(), lr=1.0)
    w0 = enc.emb.weight.detach().clone()
    for step in range(2):
        out = model(**batch_of(enc, [0, 1, 2]), step=step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in model.key_encoder.parameters())
    w1, key_w = enc.emb.weight.detach(), model.key_encoder.emb.weight
    # After the second update: key = 0.5 * w0 + 0.5 * (weights after step 1) != w1.
    assert not torch.allclose(key_w, w1) and not torch.allclose(key_w, w0)


def test_bad_settings_are_clear_errors():
    enc = ToyTextEncoder()
    with pytest.raises(ValueError, match=r"more than the corpus holds \(10 documents\)"):
        TextMoCo(enc, GROUPS, bank=BankSettings(candidates=11), bank_corpus=BankCorpus(torch.arange(10), DOCS))
    with pytest.raises(ValueError, match="no negatives"):
        TextMoCo(enc, GROUPS, queue_size=0, in_batch_negatives=False)
    with pytest.raises(ValueError, match="key_encoder"):
        TextMoCo(enc, GROUPS, key_encoder="ema")
    assert math.isfinite(TextMoCo(enc, GROUPS, queue_size=0)(**batch_of(enc, [0, 1]), step=0)["loss"].item())


def test_positive_aware_ceiling_masks_negatives_above_a_share_of_the_positive_score():
    enc = ToyTextEncoder()
    model = TextMoCo(enc, GROUPS, queue_size=0, temperature=T, max_neg_pos_ratio=0.5)
    b = batch_of(enc, [0, 1, 2, 3, 4, 5])
    out = model(**b, step=0)
    with torch.no_grad():
        q, k = unit(enc(b["query"])), unit(enc(b["positive"]))
        scores = q @ k.t()
        want = (scores > 0.5 * scores.diag().view(-1, 1)) | torch.eye(6, dtype=torch.bool)
    assert want.any() and not want.all()
    assert torch.equal(torch.isinf(out["neg_logits"]), want)
    with pytest.raises(ValueError, match="max_neg_pos_ratio"):
        TextMoCo(enc, GROUPS, max_neg_pos_ratio=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_text_step_is_finite_and_close_to_fp32(device, tmp_path):
    """In-batch + queue + bank + MoCHi with a tiny BERT (no dropout) under bf16 autocast, against fp32."""
    from eval_helpers import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    device_checks.check_bf16_text_step(device, bert)
