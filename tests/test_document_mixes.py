"""MoCHi among the documents that carry gradient (``mochi.document_mixes``): the document term's synthetic
points, materialised with their gradient, against the formulas written out from the plan's draws."""
import torch
import torch.nn.functional as F

from mochi_retrieval.core import ContrastiveCore, MoCoConfig
from mochi_retrieval.loss import MoCHiConfig, info_nce_from_logits
from mochi_retrieval.negatives import Source

T = 0.05


def _step(document_mixes: bool, cap: bool = False):
    g = torch.Generator().manual_seed(0)
    b, m, c, d = 4, 6, 5, 8
    q = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
    k_raw = torch.randn(b, d, generator=g).requires_grad_()
    docs_raw = torch.randn(m, d, generator=g).requires_grad_()  # shared block, with gradient (in-batch-like)
    stored = F.normalize(torch.randn(b, c, d, generator=g), dim=2)  # per-query detached block (bank-like)
    k, docs = F.normalize(k_raw, dim=1), F.normalize(docs_raw, dim=1)
    mask = torch.zeros(b, m, dtype=torch.bool)
    mask[0, 1] = True  # one false negative
    sources = [Source("in_batch", docs, torch.arange(m), torch.arange(m), True, mask),
               Source("bank", stored, torch.full((b, c), -1), torch.full((b, c), -1), False,
                      torch.zeros(b, c, dtype=torch.bool))]
    mochi = MoCHiConfig(n_hard=4, n_mix=3, n_query_mix=2, beta_max=0.3, document_mixes=document_mixes,
                        cap_at_positive=cap)
    core = ContrastiveCore(MoCoConfig(queue_size=0, temperature=T, gradient="query_only"), total_steps=None,
                           mochi=mochi, seed=0)
    core._init_negatives(0, d, None, 0)
    out, loss = core.contrastive_step(q, k, sources, ids=None, groups=None, epoch=1.0, step=3, documents_grad=True,
                                      dedupe=False)
    return q, k, docs, mask, core, out, loss, (k_raw, docs_raw)


def test_document_mixes_add_the_formulas_document_term():
    q, k, docs, mask, core, out, loss, leaves = _step(True)
    _, _, _, _, _, out_off, loss_off, leaves_off = _step(False)
    plan = core.last_document_plan
    assert plan is not None and plan.hard_idx.shape == (4, 4)
    # The union term is unchanged: its draws come first from the step's generator.
    torch.testing.assert_close(out.synthetic_logits, out_off.synthetic_logits)
    qd = q.detach()
    pos = (qd * k).sum(1)
    neg = (qd @ docs.T).masked_fill(mask, float("-inf"))
    assert not (plan.hard_idx == 1)[0].any()  # the masked document is never in query 0's pool
    synth = []
    for r in range(4):  # written out per query from the definitions h = n(a n_i + (1-a) n_j), h' = n(b q + (1-b) n_j)
        pool = docs[plan.hard_idx[r]]
        pairs = [F.normalize(a * pool[i] + (1 - a) * pool[j], dim=0)
                 for i, j, a in zip(plan.pair_i[r], plan.pair_j[r], plan.alpha[r])]
        mixes = [F.normalize(b_ * qd[r] + (1 - b_) * pool[j], dim=0) for j, b_ in zip(plan.query_j[r], plan.beta[r])]
        synth.append(torch.stack([qd[r] @ h for h in pairs + mixes]))
    with_synth = info_nce_from_logits(pos, neg, T, torch.stack(synth))
    without = info_nce_from_logits(pos, neg, T)
    torch.testing.assert_close(loss - loss_off, with_synth - without, atol=1e-5, rtol=1e-5)
    # The synthetic points' gradient reaches the documents they were made from.
    g_on = torch.autograd.grad(loss, leaves, retain_graph=True)
    g_off = torch.autograd.grad(loss_off, leaves_off)
    g_ref = torch.autograd.grad(with_synth - without, leaves, allow_unused=True)
    for on, off, ref in zip(g_on, g_off, g_ref):
        torch.testing.assert_close(on - off, ref, atol=1e-5, rtol=1e-4)
    used = plan.hard_idx.unique()
    assert (g_on[1] - g_off[1])[used].abs().sum() > 0


def test_document_mixes_capped_at_the_positive_and_off_by_default():
    *_, core, out, loss, _ = _step(True, cap=True)
    assert torch.isfinite(loss)
    *_, core_off, _, _, _ = _step(False)
    assert core_off.last_document_plan is None
