"""How well the support-view detector finds the queue's false negatives, on a trained checkpoint, against
simpler label-free rankings: precision (share of flagged entries of the query's class) and recall (share of
the query's class among its top 256 entries that is flagged) per top-k, for S support views aggregated by
mean or max, for the key alone (``support_with_key`` with S = 0: no extra cost) and for the query's own scores
(q.n, what MoCHi's hard pool ranks by). ``--more`` adds two rankings that no option builds yet, to find out
whether a better detector exists: the key's neighbourhood (an entry scored by its mean similarity to the key's
10 nearest entries, a second-order similarity) and clean views (every training image encoded un-augmented by
the key network in eval mode, the query's image scored against the entries' images). Forward passes only;
nothing is trained.

    python benchmarks/studies/fnc_detector.py CHECKPOINT [--batches 8] [--ks 10 32 64 128 256] [--views 1 2 4]
        [--more] [--no-write] [overrides ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))
from common import OneCpuProcess, append_results, markdown_table  # noqa: E402

from mochi_retrieval.config import load_config  # noqa: E402
from mochi_retrieval.false_negatives import RECALL_TOP, flag_top_k, support_scores  # noqa: E402
from mochi_retrieval.training import build_data, build_model  # noqa: E402

CONFIG = Path(__file__).parents[2] / "configs" / "fashion_mnist_resnet18.yaml"


def precision_recall(flags: torch.Tensor, same: torch.Tensor, in_top: torch.Tensor) -> tuple[float, float]:
    """(flagged of the query's class / flagged, flagged among the class's top-256 entries / those entries)."""
    precision = (flags & same).sum() / flags.sum().clamp(min=1)
    recall = (flags & same & in_top).sum() / (same & in_top).sum().clamp(min=1)
    return precision.item(), recall.item()


NEIGHBOURS = 10


@torch.no_grad()
def clean_embeddings(cfg, model, entry_labels: torch.Tensor, entry_ids: torch.Tensor) -> torch.Tensor:
    """(N, D) unit key-network embeddings (eval mode, head included) of every un-augmented training image, in
    the order of the training ids (checked against the labels the queue holds)."""
    from mochi_retrieval.encoders.encoding import eval_mode
    from mochi_retrieval.eval.features import encode_dataset, load_classification_data

    train, _, _ = load_classification_data(cfg.data.root, model.key_net, cfg.data.image_size, None, None)
    with eval_mode(model.key_net):
        emb, labels = encode_dataset(lambda x: F.normalize(model.key_net(x).float(), dim=1), train, 256,
                                     "clean views", True)
    known = entry_ids >= 0
    if not torch.equal(labels[entry_ids[known]], entry_labels[known]):
        raise SystemExit("the training images' order differs from the ids the queue holds")
    return emb


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ks", type=int, nargs="+", default=[10, 32, 64, 128, 256])
    p.add_argument("--more", action="store_true", help="add the neighbourhood and clean-view rankings")
    p.add_argument("--no-write", action="store_true", help="print only (no section in RESULTS.md)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    s_max = max(args.views)
    cfg = load_config(CONFIG, [*args.overrides, "false_negatives.handling=eliminate",
                               f"false_negatives.support_views={s_max}"])
    data = build_data(cfg, OneCpuProcess())
    model = build_model(cfg, data.steps_per_epoch, 1)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.train()  # BatchNorm as in training (split, keys shuffled): the queue was written that way
    queue, entry_labels = model.queue.keys, model.queue.labels
    clean = clean_embeddings(cfg, model, entry_labels, model.queue.ids) if args.more else None
    rankings: dict[str, list[torch.Tensor]] = {}
    masks, sames, tops = [], [], []
    for _, batch in zip(range(args.batches), data.epoch(state["epoch"])):
        q = model.encode_queries(batch["view_q"])
        k = model.encode_keys(batch["view_k"])
        support = torch.stack([model.encode_keys(v) for v in batch["view_support"]])
        same = entry_labels.view(1, -1) == batch["labels"].view(-1, 1)
        mask = model.queue.ids.view(1, -1) == batch["ids"].view(-1, 1)  # the query's own image
        q_scores = (q @ queue.T).masked_fill(mask, float("-inf"))
        in_top = torch.zeros_like(mask).scatter_(1, torch.topk(q_scores, RECALL_TOP, dim=1).indices, True)
        masks.append(mask), sames.append(same), tops.append(in_top)
        rankings.setdefault("query q.n", []).append(q @ queue.T)
        rankings.setdefault("key k.n (S = 0, with key)", []).append(k @ queue.T)
        for s in args.views:
            for agg in ("mean", "max"):
                rankings.setdefault(f"S = {s}, {agg}", []).append(support_scores(support[:s], queue, agg))
                both = torch.cat([support[:s], k.unsqueeze(0)])
                rankings.setdefault(f"S = {s} + key, {agg}", []).append(support_scores(both, queue, agg))
        if clean is not None:
            near = torch.topk((k @ queue.T).masked_fill(mask, float("-inf")), NEIGHBOURS, dim=1).indices
            rankings.setdefault(f"key's {NEIGHBOURS} nearest entries, mean e.n", []).append(
                torch.einsum("bjd,md->bm", queue[near], queue) / NEIGHBOURS)
            rankings.setdefault("clean views (eval mode, no augmentation)", []).append(
                clean[batch["ids"]] @ clean[model.queue.ids].T)
    mask, same, in_top = torch.cat(masks), torch.cat(sames), torch.cat(tops)
    rows = []
    for name, parts in rankings.items():
        scores = torch.cat(parts)
        cells = [name]
        for kk in args.ks:
            pr, rc = precision_recall(flag_top_k(scores, mask, kk), same, in_top)
            cells.append(f"{pr:.2f} / {rc:.2f}")
        rows.append(cells)
    share = same.float().mean().item()
    head = (f"`{args.checkpoint}` (epoch {state['epoch']}, step {state['global_step']}), {mask.shape[0]} queries, "
            f"queue {queue.shape[0]}; the query's class is {share:.3f} of the queue")
    table = markdown_table(["ranking", *(f"top {kk}: precision / recall" for kk in args.ks)], rows)
    print(head, "\n\n", table, sep="")
    if not args.no_write:
        append_results("fashion_mnist: the support-view detector's precision and recall", f"{head}\n\n{table}")


if __name__ == "__main__":
    main()
