"""Where the queue's false negatives sit, at a checkpoint of a Fashion-MNIST run: could an unsupervised
filter find them?

With 10 classes a tenth of the queue is the query's own class. This script takes a run's checkpoint
(weights and queue as training left them), encodes a few training batches as training does (two
augmented views, BatchNorm in the run's ``bn_splits`` groups, keys from the momentum network) and
reports, over those queries against the checkpoint's queue:

- the share of same-class entries at each band of similarity rank (rank 1 = the entry most similar
  to the query): the precision a "drop the top-k" filter would have;
- the softmax mass (at the run's temperature) that same-class entries take among the negatives, and
  how much of it lies in the top k: what such a filter could remove;
- the entries scoring above the query's own positive (the ``moco.max_neg_pos_ratio=1`` ceiling): how
  many per query and which share of them is same-class;
- the debiased InfoNCE of Chuang et al. (NeurIPS 2020) at class priors tau+: its negative term
  ``g = max((sum_n e^{q.n/T} - tau+ N e^{q.k/T}) / (1 - tau+), N e^{-1/T})``; the share of queries where
  the floor binds (the loss then gives their negatives no gradient) and the median of the correction
  ``tau+ N e^{q.k/T}`` over the negatives' sum, which the estimator assumes to be below 1;
- for a MoCHi run, the softmax mass of each part of the logits (positive, real negatives, pair mixes,
  query mixes), with the run's MoCHi settings and masks drawn on these queries: what the synthetic points
  take from the real negatives' gradient; and where the mixes push each query compared with the real
  negatives (cosines of the gradients' parts tangent to q, and the share of the mixes' push that is new).

    python benchmarks/studies/false_negatives.py --run runs/bench_fashion_mnist/mochi_seed1 \\
        [--checkpoint step-00005148.pt]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, fashion_mnist

import torch  # noqa: E402
from common import OneCpuProcess, append_results, markdown_table  # noqa: E402

from mochi_retrieval.config import load_config  # noqa: E402
from mochi_retrieval.loss import contrastive_loss  # noqa: E402
from mochi_retrieval.mixing import synthesize  # noqa: E402
from mochi_retrieval.training import build_data, build_model  # noqa: E402

BANDS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 256), (257, 1024), (1025, 4096))
TOP_K = (8, 32, 128, 256, 1024)
PRIORS = (0.1, 0.05, 0.02, 0.01)  # tau+: the class prior of 10 balanced classes, and smaller



@torch.no_grad()
def queue_statistics(run: Path, checkpoint: str, batches: int) -> dict[str, object]:
    """The statistics above for ``batches`` training batches of ``run`` at ``checkpoint``."""
    cfg = load_config(run / "config.yaml", [])
    data = build_data(cfg, OneCpuProcess())
    model = build_model(cfg, data.steps_per_epoch, 1)
    state = torch.load(run / "checkpoints" / checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.train()  # BatchNorm as in training (batch statistics, bn_splits groups); no gradient is taken
    q, k, labels, ids = [], [], [], []
    for step, batch in zip(range(batches), data.epoch(state["epoch"])):
        q.append(model.encode_queries(batch["view_q"]))
        k.append(model.encode_keys(batch["view_k"], step))
        labels.append(batch["labels"])
        ids.append(batch["ids"])
    q, k, labels, ids = torch.cat(q), torch.cat(k), torch.cat(labels), torch.cat(ids)  # (B, D), (B, D), (B,), (B,)
    keys, key_labels = model.queue.keys, model.queue.labels  # (K, D), (K,)
    if (key_labels < 0).any():
        raise ValueError(f"{run}/{checkpoint}: the queue still holds random initial keys; take a later checkpoint")
    scores = q @ keys.T  # (B, K)
    same = labels.view(-1, 1) == key_labels.view(1, -1)  # (B, K)
    order = scores.argsort(1, descending=True)
    same_ranked = same.gather(1, order).float()
    weight = torch.exp((scores - scores.amax(1, keepdim=True)) / cfg.moco.temperature)  # softmax numerators
    weight_ranked, total = weight.gather(1, order), weight.sum(1)
    same_mass = (weight * same).sum(1)
    above = scores > (q * k).sum(1, keepdim=True)
    t, n_neg = cfg.moco.temperature, scores.shape[1]
    lse_neg = torch.logsumexp(scores.double() / t, dim=1)  # (B,) log sum_n e^{q.n/T}
    debiased = {}
    for prior in PRIORS:
        log_corr = torch.log(torch.tensor(prior * n_neg, dtype=torch.float64)) + (q * k).sum(1).double() / t
        top = torch.maximum(lse_neg, log_corr)  # shift, so the differences of exponentials stay finite
        estimate = (torch.exp(lse_neg - top) - torch.exp(log_corr - top)) / (1 - prior)
        floor = n_neg * torch.exp(-1 / t - top)
        debiased[prior] = ((estimate < floor).double().mean().item(), torch.exp(log_corr - lse_neg).median().item())
    mass, geometry = softmax_mass_by_part(cfg, q, k, labels, ids, model.queue) if cfg.mochi.enabled else (None, None)
    return {"mass_by_part": mass, "geometry": geometry,
        "config": cfg, "queries": len(q), "step": state["global_step"], "epoch": state["epoch"],
        "bands": {band: same_ranked[:, band[0] - 1: band[1]].mean().item() for band in BANDS},
        "same_mass": (same_mass / total).mean().item(),
        "top_k": {n: ((weight_ranked[:, :n].sum(1) / total).mean().item(),
                      ((weight_ranked * same_ranked)[:, :n].sum(1) / same_mass).mean().item()) for n in TOP_K},
        "above_per_query": above.float().sum(1).mean().item(),
        "above_same": (above & same).sum().item() / max(1, int(above.sum())),
        "debiased": debiased,
    }


def softmax_mass_by_part(cfg, q, k, labels, ids, queue) -> dict[str, float]:
    """Mean softmax mass (at the run's T) of the positive, the real negatives, the pair mixes and the query
    mixes, with the masks the run trained with (own instance; own class under ``mask_same_label``)."""
    mask = queue.ids.view(1, -1) == ids.view(-1, 1)
    if cfg.moco.mask_same_label:
        mask |= queue.labels.view(1, -1) == labels.view(-1, 1)
    mochi = cfg.mochi.settings()
    out = contrastive_loss(q, k, queue.keys, cfg.moco.temperature, mochi=mochi, neg_mask=mask,
                           generator=torch.Generator().manual_seed(0))
    parts = {"positive": out.pos_logits.unsqueeze(1), "real negatives": out.neg_logits,
             "pair mixes": out.synthetic_logits[:, :mochi.n_mix],
             "query mixes": out.synthetic_logits[:, mochi.n_mix:]}
    p = torch.softmax(torch.cat(list(parts.values()), dim=1) / cfg.moco.temperature, dim=1)
    sizes = [t.shape[1] for t in parts.values()]
    p_parts = dict(zip(parts, p.split(sizes, dim=1)))
    mass = {name: part.sum(1).mean().item() for name, part in p_parts.items()}
    mixes = synthesize(q, queue.keys, out.plan)[:, :mochi.n_mix]  # (B, s, D) the pair mixes themselves
    pool = torch.zeros_like(out.neg_logits, dtype=torch.bool).scatter_(1, out.plan.hard_idx, True)
    p_real = p_parts["real negatives"]
    return mass, repulsion_geometry(q, {"pair mixes": torch.einsum("bs,bsd->bd", p_parts["pair mixes"], mixes),
                                        "hard pool": (p_real * pool) @ queue.keys,
                                        "other real": (p_real * ~pool) @ queue.keys})


def repulsion_geometry(q: torch.Tensor, pushes: dict[str, torch.Tensor]) -> dict[str, float]:
    """How the negatives' parts push each query. The InfoNCE gradient in q from negatives of softmax weights
    p_n is sum_n p_n n / T (detached mixes included, by the closed form); through the normalisation of q only
    its part tangent to q acts. Per query: the cosine between the pair mixes' push and the hard pool's (real
    entries) push, as a reference the cosine between the hard pool's and the other real entries', and the
    share of the mixes' push orthogonal to the real negatives' (the direction they add); medians."""
    tangent = {name: g - (g * q).sum(1, keepdim=True) * q for name, g in pushes.items()}  # (B, D) each
    real = tangent["hard pool"] + tangent["other real"]
    mix = tangent["pair mixes"]
    along = (mix * real).sum(1, keepdim=True) / (real * real).sum(1, keepdim=True).clamp_min(1e-30) * real
    cos = torch.nn.functional.cosine_similarity
    return {"cos(mixes, hard pool)": cos(mix, tangent["hard pool"]).median().item(),
            "cos(hard pool, other real)": cos(tangent["hard pool"], tangent["other real"]).median().item(),
            "mixes' push orthogonal to the real negatives' / mixes' push":
                ((mix - along).norm(dim=1) / mix.norm(dim=1).clamp_min(1e-30)).median().item(),
            "mixes' push / real negatives' push": (mix.norm(dim=1) / real.norm(dim=1).clamp_min(1e-30)).median().item()}


def report(run: Path, checkpoint: str, s: dict[str, object]) -> str:
    cfg = s["config"]
    head = (f"Run `{run}`, checkpoint `{checkpoint}` (step {s['step']}, after epoch {s['epoch']}); "
            f"{s['queries']} training queries against its queue of {cfg.moco.queue_size} keys; T = "
            f"{cfg.moco.temperature}; MoCHi {'on' if cfg.mochi.enabled else 'off'}, same-class mask "
            f"{'on' if cfg.moco.mask_same_label else 'off'} in training.")
    bands = markdown_table(["similarity ranks", "same-class share"],
                           [[f"{a}" if a == b else f"{a}-{b}", f"{v:.3f}"] for (a, b), v in s["bands"].items()])
    mass = markdown_table(["top k by similarity", "share of the negatives' softmax mass",
                           "share of the same-class mass"],
                          [[n, f"{a:.3f}", f"{b:.3f}"] for n, (a, b) in s["top_k"].items()])
    debiased = markdown_table(["debiased InfoNCE, class prior tau+", "share of queries at the floor",
                               "median correction / negatives' sum"],
                              [[prior, f"{a:.2f}", f"{b:.2f}"] for prior, (a, b) in s["debiased"].items()])
    lines = [f"- same-class entries take {s['same_mass']:.3f} of the negatives' softmax mass (a tenth of the "
             "entries);",
             f"- entries above the query's positive: {s['above_per_query']:.1f} per query, {s['above_same']:.3f} "
             "of them same-class."]
    if s["mass_by_part"] is not None:
        lines.append("- softmax mass by part of the logits (MoCHi, the run's settings and masks): " + ", ".join(
            f"{name} {value:.3f}" for name, value in s["mass_by_part"].items()) + ".")
        lines.append("- the negatives' push on the queries (tangent part of the gradient, medians over queries): "
                     + ", ".join(f"{name} {value:.3f}" for name, value in s["geometry"].items()) + ".")
    return "\n\n".join([head, bands, mass, debiased, "\n".join(lines)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, nargs="+", required=True, help="run folders (config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", default="last.pt", help="file name under <run>/checkpoints")
    p.add_argument("--batches", type=int, default=8, help="training batches to encode")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    body = "\n\n".join(report(run, args.checkpoint, queue_statistics(run, args.checkpoint, args.batches))
                       for run in args.run)
    print(body)
    if not args.no_write:
        append_results("fashion_mnist: where the queue's false negatives sit", body)


if __name__ == "__main__":
    main()
