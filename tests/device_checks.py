"""Test bodies shared by the test suite and ``benchmarks/gpu_check.py``, each taking a device.

Every ``check_*`` function builds its data on the CPU with a seeded generator (so the CPU and a GPU
see the same numbers), runs the code under test on ``device``, raises ``AssertionError`` on a
mismatch and returns a small dict of what it measured (largest errors, where an index lived) for
the GPU check's report. The tests call them for every device in :data:`DEVICES`; the GPU check
calls them with the lent GPU (or the CPU under ``--dry-run``).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mochi_retrieval import mixing
from mochi_retrieval.bank import FaissNegativeBank
from mochi_retrieval.loss import MoCHiConfig, contrastive_loss, info_nce_from_logits
from mochi_retrieval.mixing import sample_plan, synthesize, synthetic_logits
from mochi_retrieval.queue import MomentumQueue
from mochi_retrieval.search import faiss_num_gpus, l2_normalize, search

#: The CPU, and CUDA where torch sees a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

F64 = torch.float64
Device = torch.device | str


def unit(*shape: int, seed: int = 0, device: Device = "cpu", dtype: torch.dtype = torch.float32):
    """Seeded random unit rows (along the last dim), drawn on the CPU, then moved. Shape ``shape``."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).to(device, dtype)


def device_generator(device: Device, seed: int) -> torch.Generator:
    """A seeded generator on ``device`` (sampling on a GPU needs a GPU generator)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------------------- mixing


def check_closed_form(device: Device, n_mix: int = 7, n_query_mix: int = 5) -> dict[str, float]:
    """float64: closed-form synthetic logits equal the materialised ones, in value and in gradient wrt q."""
    q = unit(6, 8, seed=0, device=device, dtype=F64).requires_grad_(True)
    bank = unit(40, 8, seed=1, device=device, dtype=F64)
    logits = q @ bank.t()
    plan = sample_plan(logits, 10, n_mix, n_query_mix, generator=device_generator(device, 3))
    weights = unit(6, n_mix + n_query_mix, seed=4, device=device, dtype=F64)
    closed = synthetic_logits(q, logits, bank, plan)
    (g_closed,) = torch.autograd.grad((closed * weights).sum(), q, retain_graph=True)
    material = torch.einsum("bd,bsd->bs", q, synthesize(q, bank, plan))
    (g_material,) = torch.autograd.grad((material * weights).sum(), q)
    torch.testing.assert_close(closed, material, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_closed, g_material, rtol=1e-10, atol=1e-10)
    return {"max_value_err": _max_err(closed, material), "max_grad_err": _max_err(g_closed, g_material)}


def check_closed_form_blocks(device: Device) -> dict[str, float]:
    """float64: a queue (K, D) followed by per-query candidates (B, C, D) is one column space."""
    q = unit(6, 8, seed=0, device=device, dtype=F64).requires_grad_(True)
    bank = unit(40, 8, seed=1, device=device, dtype=F64)
    cands = unit(6, 9, 8, seed=7, device=device, dtype=F64)
    logits = torch.cat([q @ bank.t(), torch.einsum("bd,bcd->bc", q, cands)], dim=1)
    plan = sample_plan(logits, 12, 6, 4, generator=device_generator(device, 5))
    full = torch.cat([bank.expand(6, -1, -1), cands], dim=1)  # (B, K + C, D) materialised
    torch.testing.assert_close(synthesize(q, (bank, cands), plan), synthesize(q, full, plan))
    closed = synthetic_logits(q, logits, (bank, cands), plan)
    material = torch.einsum("bd,bsd->bs", q, synthesize(q, full, plan))
    torch.testing.assert_close(closed, material, rtol=1e-10, atol=1e-10)
    g1 = torch.autograd.grad(closed.sum(), q, retain_graph=True)[0]
    g2 = torch.autograd.grad(material.sum(), q)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)
    return {"max_value_err": _max_err(closed, material), "max_grad_err": _max_err(g1, g2)}


def check_closed_form_float32(device: Device, b: int = 32, k: int = 2048, d: int = 64, n_hard: int = 128,
                              n_mix: int = 64, n_query_mix: int = 32) -> dict[str, float]:
    """float32 at a training-like scale (paper scale on a GPU): the two forms agree to float rounding."""
    q = unit(b, d, seed=10, device=device).requires_grad_(True)
    queue = unit(k, d, seed=11, device=device)
    logits = q @ queue.t()
    plan = sample_plan(logits, n_hard, n_mix, n_query_mix, generator=device_generator(device, 12))
    closed = synthetic_logits(q, logits, queue, plan)
    g_closed = torch.autograd.grad(closed.sum(), q, retain_graph=True)[0]
    material = torch.einsum("bd,bsd->bs", q, synthesize(q, queue, plan))
    g_material = torch.autograd.grad(material.sum(), q)[0]
    torch.testing.assert_close(closed, material, rtol=0, atol=2e-5)
    torch.testing.assert_close(g_closed, g_material, rtol=0, atol=2e-4 * max(1, (n_mix + n_query_mix) / 64))
    return {"max_value_err": _max_err(closed, material), "max_grad_err": _max_err(g_closed, g_material),
            "shape": f"B={b} K={k} D={d} MoCHi({n_hard}, {n_mix}, {n_query_mix})"}


def _same_sets(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got.sort(1).values, want.sort(1).values), "top-N sets differ"


def check_hard_pool(device: Device, n: int = 300) -> dict[str, int]:
    """The fast top-N (mixing.hard_pool and its thresholding path) selects exactly torch.topk's sets."""
    scores = torch.randn(16, 8192, generator=torch.Generator().manual_seed(n)).to(device)
    want = torch.topk(scores, n, dim=1).indices
    _same_sets(mixing.hard_pool(scores, n), want)
    _same_sets(mixing._threshold_topk(scores, n), want)  # the CPU fast path, run on this device too
    # Large values only at the sampled (strided) columns: too few pass the threshold; the fallback is exact.
    misleading = torch.randn(4, 8192, generator=torch.Generator().manual_seed(0))
    misleading[:2, ::mixing._FAST_STRIDE] += 100.0
    misleading = misleading.to(device)
    _same_sets(mixing._threshold_topk(misleading, 512), torch.topk(misleading, 512, dim=1).indices)
    _same_sets(mixing.hard_pool(misleading, 512), torch.topk(misleading, 512, dim=1).indices)
    return {"rows": 16, "columns": 8192, "misleading_rows": 4}


# ---------------------------------------------------------------------------- loss


def check_identical_keys(device: Device) -> dict[str, float]:
    """Positive and all M negatives equal: every logit equal, loss = log(M + 1)."""
    q = unit(4, 16, device=device)
    same = q[:1].expand(4, -1).clone()
    out = contrastive_loss(same, same.clone(), q[:1].expand(50, -1).clone(), temperature=0.2)
    assert math.isclose(out.loss.item(), math.log(51), rel_tol=1e-6), (out.loss.item(), math.log(51))
    return {"loss_err": abs(out.loss.item() - math.log(51))}


def check_cross_entropy_reference(device: Device) -> dict[str, float]:
    """info_nce_from_logits equals F.cross_entropy over [pos, queue, synthetic] / T with target 0."""
    q, k = unit(5, 8, seed=1, device=device), unit(5, 8, seed=2, device=device)
    bank = unit(30, 8, seed=3, device=device)
    synth = unit(5, 7, seed=9, device=device)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.t(), synth], 1) / 0.07
    ref = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long, device=device))
    got = info_nce_from_logits((q * k).sum(1), q @ bank.t(), 0.07, synth)
    torch.testing.assert_close(got, ref)
    return {"loss_err": _max_err(got, ref)}


def check_mochi_loss_reference(device: Device) -> dict[str, float]:
    """contrastive_loss with MoCHi equals the cross-entropy over materialised synthetic points, in value and
    gradient."""
    q = unit(4, 8, seed=4, device=device).requires_grad_(True)
    k, bank = unit(4, 8, seed=5, device=device), unit(32, 8, seed=6, device=device)
    mochi = MoCHiConfig(n_hard=8, n_mix=4, n_query_mix=2)
    out = contrastive_loss(q, k, bank, 0.1, mochi=mochi, generator=device_generator(device, 0))
    h = synthesize(q, bank, out.plan)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.t(), torch.einsum("bd,bsd->bs", q, h)], 1)
    ref = F.cross_entropy(logits / 0.1, torch.zeros(4, dtype=torch.long, device=device))
    torch.testing.assert_close(out.loss, ref)
    g1 = torch.autograd.grad(out.loss, q, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, q)[0]
    torch.testing.assert_close(g1, g2)
    return {"loss_err": _max_err(out.loss, ref), "grad_err": _max_err(g1, g2)}


def check_info_nce(device: Device) -> dict[str, dict[str, float]]:
    """The three InfoNCE references above."""
    return {"identical_keys": check_identical_keys(device), "cross_entropy": check_cross_entropy_reference(device),
            "mochi_materialised": check_mochi_loss_reference(device)}


# ---------------------------------------------------------------------------- queue


def check_queue(device: Device) -> dict[str, int]:
    """Ring order against a Python reference (K=7, batches of 3 wrap around), a batch longer than
    the queue, exclusion masks and the state_dict round trip, with the queue on ``device``."""
    q = MomentumQueue(7, 4).to(device)
    ref, ptr = list(q.keys.clone()), 0
    for step in range(5):
        batch = unit(3, 4, seed=step, device=device)
        q.add(batch, ids=torch.arange(3, device=device) + 10 * step)
        for row in batch:
            ref[ptr] = row
            ptr = (ptr + 1) % 7
        torch.testing.assert_close(q.keys, torch.stack(ref))
        assert int(q.ptr) == ptr
    assert int(q.num_added) == 15

    long_q = MomentumQueue(4, 4).to(device)
    long_q.add(unit(10, 4, seed=2, device=device), ids=torch.arange(10, device=device))
    torch.testing.assert_close(long_q.keys, _ring_tail(unit(10, 4, seed=2, device=device), 4))

    m = MomentumQueue(6, 4).to(device)
    m.add(unit(4, 4, device=device), ids=torch.tensor([5, 6, 7, 8], device=device),
          labels=torch.tensor([0, 1, 0, 2], device=device))
    mask = m.exclusion_mask(ids=torch.tensor([6, 9], device=device), labels=torch.tensor([0, 2], device=device))
    assert mask.tolist() == [[True, True, True, False, False, False], [False, False, False, True, False, False]]

    restored = MomentumQueue(7, 4).to(device)
    restored.load_state_dict(q.state_dict())
    for name in ("keys", "ids", "labels", "ptr", "num_added"):
        assert torch.equal(getattr(q, name), getattr(restored, name)), name
    return {"size": 7, "writes": 15}


def _ring_tail(rows: torch.Tensor, size: int) -> torch.Tensor:
    """What a ring of ``size`` slots holds after writing ``rows`` one at a time from slot 0."""
    out = [None] * size
    for i, row in enumerate(rows):
        out[i % size] = row
    return torch.stack(out)


# ---------------------------------------------------------------------------- FAISS bank and search

BANK_CASES = {
    "plain": {},
    "exclude": {"exclude": True},
    "text_dupes": {"exclude": True, "groups": True},
    "rank_window": {"exclude": True, "skip_top": 7},
    "ceiling": {"exclude": True, "groups": True, "ceiling": 0.3},
    "window_and_ceiling": {"skip_top": 40, "ceiling": 0.5},
}


def bank_data(n: int = 1500, d: int = 24, b: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) unit corpus and (B, D) raw queries, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return l2_normalize(torch.randn(n, d, generator=g)), torch.randn(b, d, generator=g)


def bank_reference(emb, queries, k, exclude=None, groups=None, skip_top=0, ceiling=None) -> torch.Tensor:
    """Brute force straight from the definition: full sort, filter in Python. (B, k) rows."""
    scores = l2_normalize(queries) @ emb.T
    out = []
    for r in range(len(queries)):
        pos = set(exclude[r]) if exclude is not None else set()
        bad_groups = {int(groups[p]) for p in pos} if groups is not None else set()
        order = scores[r].argsort(descending=True).tolist()
        alive = [i for i in order if i not in pos and int(groups[i] if groups is not None else -1) not in bad_groups]
        alive = alive[skip_top:]
        if ceiling is not None:
            alive = [i for i in alive if scores[r, i] <= ceiling]
        out.append(alive[:k])
    return torch.tensor(out)


def bank_positives(b: int, n: int, seed: int = 1) -> list[set[int]]:
    """0-3 random positive ids per query."""
    g = torch.Generator().manual_seed(seed)
    return [set(torch.randint(0, n, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist())
            for _ in range(b)]


def check_bank_case(device: Device, case: str) -> dict[str, bool]:
    """Both bank backends (on ``device``: a GPU FAISS index and GPU torch storage when asked for and
    possible) return exactly the brute-force candidates for one filter case."""
    opts = BANK_CASES[case]
    emb, q = bank_data()
    n, k = len(emb), 20
    groups = torch.arange(n) // 3 if opts.get("groups") else None  # runs of 3 "identical texts"
    excl = bank_positives(len(q), n) if opts.get("exclude") else None
    ref = bank_reference(emb, q, k, excl, groups, opts.get("skip_top", 0), opts.get("ceiling"))
    bank_device = "cuda" if torch.device(device).type == "cuda" else "cpu"
    got, on_gpu = {}, {}
    for backend in ("faiss", "torch"):
        bank = FaissNegativeBank(backend=backend, device=bank_device, slack=4)
        bank.refresh(emb, text_group=groups)
        idx, vec = bank.candidates(q.to(device), k, exclude=excl, skip_top=opts.get("skip_top", 0),
                                   max_similarity=opts.get("ceiling"))
        assert idx.shape == (len(q), k) and idx.dtype == torch.long and idx.device.type == torch.device(device).type
        assert vec.shape == (len(q), k, emb.shape[1]) and vec.dtype == torch.float32 and not vec.requires_grad
        torch.testing.assert_close(vec.cpu(), emb[idx.cpu()])
        got[backend], on_gpu[backend] = idx.cpu(), bank.use_gpu
    assert torch.equal(got["faiss"], got["torch"]), "faiss and torch backends disagree"
    assert torch.equal(got["torch"], ref), "backends disagree with the brute-force reference"
    return {"faiss_index_on_gpu": on_gpu["faiss"], "torch_bank_on_gpu": on_gpu["torch"]}


def check_bank(device: Device) -> dict[str, object]:
    """:func:`check_bank_case` for every case of :data:`BANK_CASES`."""
    results = {case: check_bank_case(device, case) for case in BANK_CASES}
    return {"cases": len(results), **results["plain"]}


def check_search(device: Device) -> dict[str, object]:
    """Exact search on ``device`` against the CPU, FAISS (GPU when it has one) against torch, and
    retrieval metrics computed from a search on ``device`` against the same on the CPU."""
    from mochi_retrieval.eval.retrieval import RetrievalEvaluator
    from mochi_retrieval.metrics import Qrels

    g = torch.Generator().manual_seed(0)
    q, c = l2_normalize(torch.randn(300, 32, generator=g)), l2_normalize(torch.randn(4000, 32, generator=g))
    s_cpu, i_cpu = search(q, c, 50, backend="torch")
    s_dev, i_dev = search(q.to(device), c.to(device), 50, backend="torch")
    agree_dev = float((i_dev.cpu() == i_cpu).float().mean())
    assert agree_dev > 0.999, f"torch search on {device} agrees with the CPU on {agree_dev:.4f} of ranks"
    torch.testing.assert_close(s_dev.cpu(), s_cpu, atol=1e-5, rtol=0)
    use_gpu = faiss_num_gpus() > 0 and torch.device(device).type == "cuda"
    s_f, i_f = search(q, c, 50, backend="faiss", use_gpu=use_gpu)
    agree_faiss = float((i_f == i_cpu).float().mean())
    assert agree_faiss > 0.999, f"faiss (gpu={use_gpu}) agrees with torch on {agree_faiss:.4f} of ranks"
    torch.testing.assert_close(s_f, s_cpu, atol=1e-5, rtol=0)

    rel = {f"q{i}": {f"d{(7 * i) % 4000}": 1, f"d{(13 * i + 1) % 4000}": 2} for i in range(300)}
    qrels = Qrels.from_dict(rel, [f"q{i}" for i in range(300)], [f"d{j}" for j in range(4000)])
    queries = l2_normalize(q + 0.5 * c[torch.tensor([(7 * i) % 4000 for i in range(300)])])
    metrics = {}
    for where in ("cpu", device):
        ev = RetrievalEvaluator([""] * 300, [""] * 4000, qrels, recall_ks=(1, 10, 100), backend="torch",
                                device=where, show_progress=False)
        metrics[str(where)] = ev.evaluate_embeddings(queries.to(where), c.to(where)).metrics
    for name, value in metrics["cpu"].items():
        assert math.isclose(metrics[str(device)][name], value, abs_tol=1e-6), (name, metrics[str(device)][name], value)
    return {"torch_rank_agreement": agree_dev, "faiss_rank_agreement": agree_faiss, "faiss_on_gpu": use_gpu,
            "ndcg@10": metrics["cpu"]["ndcg@10"]}


# ---------------------------------------------------------------------------- bf16 steps


def _grad_vector(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in module.parameters() if p.grad is not None])


def _compare_steps(loss32: torch.Tensor, loss16: torch.Tensor, g32: torch.Tensor, g16: torch.Tensor,
                   loss_rtol: float, min_cosine: float) -> dict[str, float]:
    assert torch.isfinite(loss16) and torch.isfinite(g16).all(), "bf16 step is not finite"
    assert torch.isfinite(loss32) and torch.isfinite(g32).all(), "fp32 step is not finite"
    rel = abs(loss16.item() - loss32.item()) / max(abs(loss32.item()), 1e-6)
    cosine = float(F.cosine_similarity(g16, g32, dim=0))
    assert rel <= loss_rtol, f"bf16 loss {loss16.item():.5f} vs fp32 {loss32.item():.5f} (relative {rel:.4f})"
    assert cosine >= min_cosine, f"bf16 gradient direction differs from fp32: cosine {cosine:.4f}"
    return {"loss_fp32": loss32.item(), "loss_bf16": loss16.item(), "loss_rel_diff": rel, "grad_cosine": cosine}


def check_bf16_moco_step(device: Device, arch: str = "resnet18", encoder_kwargs: dict | None = None,
                         image_size: int = 32, batch: int = 8, channels_last: bool = True) -> dict[str, float]:
    """One MoCo-v2 + MoCHi step under bf16 autocast (channels-last) is finite and close to fp32.

    Measured on a CPU with this random narrow ResNet-18: loss within 0.5 %, gradient cosine 0.94-0.96
    (bf16 keeps 8 bits of mantissa); a wrong layout or a dropped term would fall far below 0.9."""
    from mochi_retrieval.encoders import create_encoder
    from mochi_retrieval.moco import MoCo

    kwargs = {"width": 8, "small_images": True} if encoder_kwargs is None else encoder_kwargs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MoCo(create_encoder(arch, **kwargs), head_hidden_dim=64, head_out_dim=32, queue_size=256,
                     mochi=MoCHiConfig(16, 8, 4), shuffle_bn=False)
    device = torch.device(device)
    twin = copy.deepcopy(model).to(device)
    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    views = torch.randn(2, batch, 3, image_size, image_size, generator=g).to(device)
    ids = torch.arange(batch, device=device)
    losses, grads = [], []
    for net, bf16 in ((model, False), (twin, True)):
        vq, vk = views[0], views[1]
        if bf16 and channels_last:
            net.to(memory_format=torch.channels_last)
            vq, vk = vq.contiguous(memory_format=torch.channels_last), vk.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(vq, vk, ids=ids, step=0)
        out["loss"].backward()
        losses.append(out["loss"].detach())
        grads.append(_grad_vector(net.query_net))
    return _compare_steps(losses[0], losses[1], grads[0], grads[1], loss_rtol=0.02, min_cosine=0.9)


def check_bf16_text_step(device: Device, model_dir: Path, bank_backend: str = "faiss") -> dict[str, float]:
    """One TextMoCo step (in-batch + queue + FAISS bank + MoCHi) under bf16 autocast is finite and
    close to fp32. ``model_dir``: a transformers model folder without dropout (see make_tiny_bert)."""
    from mochi_retrieval.bank import BankSettings
    from mochi_retrieval.encoders import HFTextEncoder
    from mochi_retrieval.text_model import BankCorpus, TextMoCo

    device = torch.device(device)
    from eval_helpers import WORDS as words  # the tiny tokenizer's vocabulary

    rng = torch.Generator().manual_seed(0)
    docs = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=rng)) for _ in range(40)]
    queries = [" ".join(d.split()[:3]) for d in docs]
    groups = torch.arange(len(docs))
    bank = BankSettings(candidates=4, backend=bank_backend, device="cuda" if device.type == "cuda" else "cpu")
    corpus = BankCorpus(torch.arange(len(docs)), docs)
    encoder = HFTextEncoder(model_dir, max_length=32)
    model = TextMoCo(encoder, groups, queue_size=32, temperature=0.05, mochi=MoCHiConfig(8, 4, 2),
                     bank=bank, bank_corpus=corpus)
    twin = copy.deepcopy(model).to(device)
    model = model.to(device)
    idx = list(range(8))
    q_tok = {k: v.to(device) for k, v in encoder.tokenize([queries[i] for i in idx]).items()}
    d_tok = {k: v.to(device) for k, v in encoder.tokenize([docs[i] for i in idx]).items()}
    ids = torch.tensor(idx, device=device)
    losses, grads = [], []
    for net, bf16 in ((model, False), (twin, True)):
        net.refresh_bank()  # in fp32 for both, so both steps see the same candidates
        net.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(q_tok, d_tok, ids, step=1)
        out["loss"].backward()
        losses.append(out["loss"].detach())
        grads.append(_grad_vector(net.query_encoder))
    result = _compare_steps(losses[0], losses[1], grads[0], grads[1], loss_rtol=0.05, min_cosine=0.9)
    return {**result, "bank_on_gpu": model.bank.use_gpu}
