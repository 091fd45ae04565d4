"""Where the text step's gradient goes, source by source, against written-out references; the document
collapse that detached negatives cause in one softmax, as a regression test; GradCache; MoCHi's cap;
given negatives masked by tokenised input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from test_text_model import ToyTextEncoder
from torch import nn

from mochi_retrieval.loss import MoCHiConfig, contrastive_loss
from mochi_retrieval.monitors import mean_pairwise_cosine
from mochi_retrieval.text_model import BankCorpus, BankSettings, TextMoCo

T = 0.05


class WordEncoder(ToyTextEncoder):
    """Texts of tokens ``dI`` (documents) and ``qI`` (queries) from disjoint vocabularies; the embedding
    of a text is the mean of its token rows, so a one-token text's embedding is one row of ``emb``."""

    def __init__(self, n: int, clustered_queries: bool = False, seed: int = 1) -> None:
        nn.Module.__init__(self)
        self.n = n
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(2 * n + 1, self.output_dim, generator=g)
        if clustered_queries:  # as in a pretrained model: queries start close together
            w[n + 1:] = 2 * torch.randn(self.output_dim, generator=g) + 0.5 * w[n + 1:]
        self.emb = nn.Embedding(2 * n + 1, self.output_dim, padding_idx=0)
        with torch.no_grad():
            self.emb.weight.copy_(w)
        self.vocab = {f"{kind}{i}": self.row(f"{kind}{i}") for kind in "dq" for i in range(n)}

    def row(self, token: str) -> int:
        return int(token[1:]) + 1 + (self.n if token[0] == "q" else 0)


N = 8
DOCS = [f"d{i}" for i in range(N)]
QUERIES = [f"q{i}" for i in range(N)]


def batch(enc, idx, docs=DOCS, queries=QUERIES):
    ids = torch.tensor(idx)
    return {"query": enc.tokenize([queries[i] for i in idx]), "positive": enc.tokenize([docs[i] for i in idx]),
            "ids": ids, "exclude": ids.view(-1, 1)}


def make_model(enc, gradient, **kw):
    bank = BankSettings(candidates=2, mined_negatives=1, backend="torch", device="cpu", update_with_keys=False)
    return TextMoCo(enc, torch.arange(N), queue_size=3, temperature=T, gradient=gradient, bank=bank,
                    bank_corpus=BankCorpus(torch.arange(N), DOCS), **kw)


def reference_loss(Q, D, idx, queue_ids, gradient):
    """Written out from the rule: per query, entries in source order in-batch, mined (top-1 bank doc
    outside the batch), queue, bank (next 2), each id counted once (first source) and the own positive
    dropped. Joint: one CE with gradient wherever a vector carries it. Query-only: CE over all entries
    with documents detached, plus CE over the gradient-carrying entries with the query detached."""
    q, docs = F.normalize(Q, dim=1), F.normalize(D, dim=1)
    qb = q[idx]
    ranked = []
    for i, qi in enumerate(qb.detach()):
        order = [int(j) for j in torch.argsort(docs.detach() @ qi, descending=True) if int(j) not in idx]
        ranked.append(order)
    mined = [r[0] for r in ranked]
    total_q, total_d = 0.0, 0.0
    for i, pos in enumerate(idx):
        entries = [(j, True) for j in idx] + [(j, True) for j in mined] + [(j, False) for j in queue_ids] \
            + [(j, False) for j in ranked[i][1:3]]
        seen_sources, kept = {}, []
        for source, group in ((0, entries[:3]), (1, entries[3:6]), (2, entries[6:9]), (3, entries[9:])):
            for j, grad in group:
                if j == pos or seen_sources.get(j, source) < source:
                    continue
                seen_sources.setdefault(j, source)
                kept.append((j, grad))

        def ce(query, entries_, detach_docs):
            vec = docs.detach() if detach_docs else docs
            logits = torch.stack([query @ vec[pos]] + [query @ (vec[j] if g else docs.detach()[j])
                                                       for j, g in entries_]) / T
            return torch.logsumexp(logits, 0) - logits[0]
        if gradient == "joint":
            total_q = total_q + ce(qb[i], kept, False)
        else:
            total_q = total_q + ce(qb[i], kept, True)
            total_d = total_d + ce(qb[i].detach(), [e for e in kept if e[1]], False)
    return (total_q + total_d) / len(idx)


@pytest.mark.parametrize("gradient", ["query_only", "joint"])
def test_gradient_into_queries_and_documents_matches_the_written_reference(gradient):
    enc = WordEncoder(N)
    model = make_model(enc, gradient)
    model(**batch(enc, [5, 6, 7]), step=0)  # fills the queue with docs 5, 6, 7
    enc.zero_grad()
    idx = [0, 1, 2]
    out = model(**batch(enc, idx), step=1)
    out["loss"].backward()
    W = enc.emb.weight.detach().clone()
    Q = W[[enc.row(t) for t in QUERIES]].clone().requires_grad_()
    D = W[[enc.row(t) for t in DOCS]].clone().requires_grad_()
    ref = reference_loss(Q, D, idx, [5, 6, 7], gradient)
    ref.backward()
    torch.testing.assert_close(out["loss"].detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    grad = enc.emb.weight.grad
    torch.testing.assert_close(grad[[enc.row(t) for t in QUERIES]], Q.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad[[enc.row(t) for t in DOCS]], D.grad, atol=1e-5, rtol=1e-4)
    mined = set(out["monitors"]) and out["monitors"]["mass_mined"]
    assert 0 < mined < 1


def test_query_only_gives_documents_the_in_batch_gradient_whatever_the_detached_sources():
    """Form against form: with a queue and bank vectors on, the documents' gradient equals the one of
    in-batch (+ mined) training without them."""
    def doc_grad(queue_size, candidates):
        enc = WordEncoder(N)
        bank = BankSettings(candidates=candidates, mined_negatives=1, backend="torch", device="cpu",
                            update_with_keys=False)
        model = TextMoCo(enc, torch.arange(N), queue_size=queue_size, temperature=T, bank=bank,
                         bank_corpus=BankCorpus(torch.arange(N), DOCS))
        out = model(**batch(enc, [0, 1, 2]), step=0)
        out["loss"].backward()
        return enc.emb.weight.grad[[enc.row(t) for t in DOCS]]
    plain = doc_grad(0, 0)
    torch.testing.assert_close(doc_grad(4, 2), plain, atol=1e-6, rtol=1e-5)


def train_doc_cosine(queue_size: int, gradient: str, steps: int = 60) -> float:
    n = 24
    docs = [f"d{i} d{(7 * i + 3) % n}" for i in range(n)]
    queries = [f"q{i}" for i in range(n)]
    enc = WordEncoder(n, clustered_queries=True)
    model = TextMoCo(enc, torch.arange(n), queue_size=queue_size, temperature=T, gradient=gradient)
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randperm(n, generator=g)[:6].tolist()
        out = model(**batch(enc, idx, docs, queries), step=step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        return float(mean_pairwise_cosine(F.normalize(enc(enc.tokenize(docs)), dim=1)))


def test_a_detached_queue_does_not_collapse_the_documents():
    """Regression test of the collapse measured on MiniLM (doc-doc cosine 0.15 -> 0.47 with a queue): queries
    start clustered, as in a pretrained model; in one softmax the detached queue takes the mass that would
    push documents apart and they follow their queries into one cluster."""
    in_batch = train_doc_cosine(0, "query_only")
    balanced = train_doc_cosine(64, "query_only")
    joint = train_doc_cosine(64, "joint")
    assert balanced <= in_batch + 0.02
    assert joint > in_batch + 0.3  # the failure the rule prevents still happens without it


def test_grad_cache_chunks_give_the_loss_and_gradient_of_one_pass_with_dropout(tiny_text_model_dir):
    from mochi_retrieval.encoders import create_encoder

    class Chunked(nn.Module):
        """The reference: the same encoder run chunk by chunk with a graph (same dropout draws)."""

        def __init__(self, net, size):
            super().__init__()
            self.net, self.size, self.output_dim = net, size, net.output_dim

        def tokenize(self, texts):
            return self.net.tokenize(texts)

        def forward(self, tokens):
            n = tokens["input_ids"].shape[0]
            return torch.cat([self.net({k: v[i:i + self.size] for k, v in tokens.items()})
                              for i in range(0, n, self.size)])

    words = "the cat dog bird fish sat ran on mat house tree red blue fox".split()
    docs = [" ".join(words[i:i + 4]) for i in range(8)]
    queries = [" ".join(words[i + 1:i + 3]) for i in range(8)]
    enc = create_encoder("hf_text", model_path=str(tiny_text_model_dir), max_length=16).train()
    ref_enc = Chunked(copy.deepcopy(enc), 3).train()
    cached = TextMoCo(enc, torch.arange(8), queue_size=4, temperature=T, grad_cache_chunk=3)
    plain = TextMoCo(ref_enc, torch.arange(8), queue_size=4, temperature=T)
    losses = []
    for model, net in ((cached, enc), (plain, ref_enc)):
        torch.manual_seed(7)
        b = {"query": net.tokenize(queries), "positive": net.tokenize(docs), "ids": torch.arange(8)}
        out = model(**b, step=0)
        out["loss"].backward()
        losses.append(out["loss"].detach())
    torch.testing.assert_close(losses[0], losses[1])
    pairs = [(name, p.grad, p_ref.grad) for (name, p), p_ref in
             zip(enc.named_parameters(), ref_enc.net.parameters(), strict=True) if p_ref.grad is not None]
    scale = max(float(g.abs().max()) for _, _, g in pairs)  # float32 sums in another order
    for name, got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-3, msg=lambda m: name + m)
    with pytest.raises(ValueError, match="grad_cache_chunk"):
        TextMoCo(enc, torch.arange(8), grad_cache_chunk=0)


def test_mochi_cap_drops_synthetic_points_above_the_positive():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    k = F.normalize(q + 0.8 * torch.randn(4, 8, generator=g), dim=1)
    negs = F.normalize(q.repeat(6, 1) + 0.5 * torch.randn(24, 8, generator=g), dim=1)
    capped = MoCHiConfig(n_hard=8, n_mix=8, n_query_mix=8, cap_at_positive=True)
    out = contrastive_loss(q, k, negs, T, mochi=capped, generator=torch.Generator().manual_seed(1))
    free = contrastive_loss(q, k, negs, T, mochi=MoCHiConfig(n_hard=8, n_mix=8, n_query_mix=8),
                            generator=torch.Generator().manual_seed(1))
    above = free.synthetic_logits > free.pos_logits.unsqueeze(1)
    assert above.any() and not above.all()
    assert torch.equal(torch.isinf(out.synthetic_logits), above)
    assert out.loss < free.loss


def test_given_negatives_equal_to_a_positive_after_truncation_are_masked():
    enc = WordEncoder(N)
    table = {(enc.row(d),): i for i, d in enumerate(DOCS)}
    model = TextMoCo(enc, torch.arange(N), queue_size=0, temperature=T, token_groups=table)
    b = batch(enc, [0, 1, 2])
    b["negatives"] = enc.tokenize(["d1", "d5", "d6"])  # query 0's given negative "d1" is query 1's positive
    out = model(**b, step=0)
    masked = torch.isinf(out["neg_logits"])  # columns: positives 0, 1, 2 then given negatives d1, d5, d6
    assert masked[1, 3] and not masked[0, 3] and not masked[2, 3]
    assert masked[:, 4:].sum() == 0
