"""Study: does a rolling-refreshed bank favour its freshly embedded rows when it picks hard negatives?

Issue 26's whole-corpus runs serve rows about half as old as the bank's mean (the staleness monitors). The
reading to test: the encoder moves during training, so for the current queries a row embedded long ago scores
differently from what it would score now; if the old rows score systematically lower than their fresh
selves, mining takes its negatives mostly from the recently refreshed slice (a bias of selection, not of
relevance). This study takes a finished run's last checkpoint (model and bank with its staleness stamps),
re-embeds rows with the final model and compares, for the run's own training queries:

A. the score shift fresh - stale, q.e_fresh - q.e_stale, by row age, on a random sample of old and young rows;
C. the drift correction (``bank.drift_correction``) on the old rows alone: half of them replaced by their
   fresh embeddings (as if a rolling refresh had just re-embedded them), m(now) measured paired on 56 of
   those, the other half estimated as normalise(e + m) (the library's rule), e + m, or by a least-squares
   linear map fitted on the 500 re-embedded pairs; each query's top-16 against its top-16 by fresh
   embeddings, 5 random splits;
B. the ranking that mining uses: each query's top ``--top`` rows of the stored (stale) bank, re-scored with
   fresh embeddings of the same rows: how many of the stale top-8 stay in the fresh top-8, and the share of
   young rows in the top-8 by stale scores against by fresh scores (same candidates, so relevance cancels).

    python benchmarks/studies/bank_drift.py runs/bench_text_all/ours_bank_all_rolling_seed0

Prints a table and appends it to benchmarks/RESULTS.md (``--no-write``: print only).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common

import torch  # noqa: E402
from common import append_results, markdown_table  # noqa: E402

from mochi_retrieval.config import load_config  # noqa: E402
from mochi_retrieval.training.text import build_encoder, build_text_model, load_pairs  # noqa: E402


def load_run(run: Path, checkpoint: str):
    """The run's model with the checkpoint's weights, and the bank's stored rows (embeddings, ids, stamps)."""
    cfg = load_config(run / "config.yaml", [])
    pairs = load_pairs(cfg)
    model = build_text_model(cfg, pairs, build_encoder(cfg), batches_per_epoch=cfg.train.max_steps or 1)
    state = torch.load(run / "checkpoints" / checkpoint, map_location="cpu", weights_only=False)
    weights = dict(state["model"])
    bank = weights.pop("_extra_state", None)  # checkpoints written before the bank.* keys kept it here
    if bank is None:
        bank = {k: weights.pop(k) for k in list(weights) if k.startswith("bank.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.startswith("bank.")]:
        raise ValueError(f"{run}/{checkpoint}: state does not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if "bank.stamps" not in bank:
        raise ValueError(f"{run}/{checkpoint}: the checkpoint holds no bank with staleness stamps")
    if not torch.equal(bank["bank.ids"], model.bank_corpus.ids):
        raise ValueError(f"{run}/{checkpoint}: the stored bank's rows are not the corpus the config builds")
    return cfg, pairs, model, bank, state["global_step"]


def correction_variants(q: torch.Tensor, stored: torch.Tensor, fresh: torch.Tensor, seed: int,
                        trials: int = 5, slice_rows: int = 56) -> list[list[str]]:
    """Part C. q (Q, D) queries; stored, fresh (n, D) the old rows as stored and re-embedded now. Rows of the
    table: variant, share of the top-16 that is re-embedded (the truth's is about 0.5), overlap with the
    fresh top-16, each the mean over ``trials`` random splits."""
    g = torch.Generator().manual_seed(seed)
    truth = (q @ fresh.T).topk(16, dim=1).indices
    scores: dict[str, list[tuple[float, float]]] = {}
    for _ in range(trials):
        perm = torch.randperm(len(stored), generator=g)
        redone, stale = perm[: len(perm) // 2], perm[len(perm) // 2:]
        move = (fresh[redone[:slice_rows]] - stored[redone[:slice_rows]]).mean(0)  # m(now), paired
        ones = torch.ones(len(redone), 1)
        x = torch.cat([stored[redone], ones], 1)
        w = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1]), x.T @ fresh[redone])  # ridge, 1.0
        estimates = {"stored rows (no correction)": stored[stale],
                     "normalise(e + m) (bank.drift_correction)": torch.nn.functional.normalize(stored[stale] + move),
                     "e + m": stored[stale] + move,
                     "linear map fitted on the re-embedded pairs": torch.nn.functional.normalize(
                         torch.cat([stored[stale], ones[: len(stale)]], 1) @ w),
                     "fresh rows (the truth)": fresh[stale]}
        is_redone = torch.zeros(len(stored), dtype=torch.bool)
        is_redone[redone] = True
        for name, est in estimates.items():
            rows = fresh.clone()
            rows[stale] = est
            top = (q @ rows.T).topk(16, dim=1).indices
            overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, truth)) / top.numel()
            scores.setdefault(name, []).append((is_redone[top].float().mean().item(), overlap))
    return [[name, f"{torch.tensor(v)[:, 0].mean():.3f}", f"{torch.tensor(v)[:, 1].mean():.3f}"]
            for name, v in scores.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--checkpoint", default="last.pt")
    p.add_argument("--queries", type=int, default=256, help="training queries scored")
    p.add_argument("--sample", type=int, default=1000, help="rows of each age group in part A")
    p.add_argument("--top", type=int, default=16, help="stale top rows per query re-scored in part B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--save", type=Path, help="also save the queries and part A's rows here (torch.save)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    cfg, pairs, model, bank, step = load_run(args.run, args.checkpoint)
    emb, stamps = bank["bank.embeddings"], bank["bank.stamps"]  # (N, D) stored unit rows, (N,) steps written
    texts = model.bank_corpus.texts
    update = step // max(1, cfg.train.grad_accum_steps)
    age = update - stamps  # (N,)
    young = stamps > stamps.min()  # re-embedded during training (rolling slices); the rest: the initial pass
    print(f"bank {tuple(emb.shape)}, step {update}: {int(young.sum())} rows re-embedded during training "
          f"(mean age {age[young].float().mean():.0f}), {int((~young).sum())} from the initial pass (age "
          f"{age[~young].float().mean():.0f})")
    g = torch.Generator().manual_seed(args.seed)
    query_rows = torch.randperm(len(pairs), generator=g)[: args.queries]
    q = model._embed([cfg.data.query_prefix + pairs[int(i)].query for i in query_rows], False, "queries")  # (Q, D)

    # A: the score shift by age group, on a random sample of each group
    rows_a = torch.cat([pick[torch.randperm(pick.numel(), generator=g)[: args.sample]]
                        for pick in (young.nonzero().view(-1), (~young).nonzero().view(-1))])
    fresh_a = model._embed([texts[int(r)] for r in rows_a], True, "fresh rows (A)")  # (n, D)
    shift = q @ fresh_a.T - q @ emb[rows_a].T  # (Q, n)
    is_young = young[rows_a]
    drift = (fresh_a * emb[rows_a]).sum(1)  # cosine between a row's stored and fresh embedding
    if args.save:
        torch.save({"q": q, "stored": emb[rows_a], "fresh": fresh_a, "young": young[rows_a],
                    "stamps": stamps[rows_a]}, args.save)
    stored_a = emb[rows_a]
    # The part of the drift that is one translation per age group: each group's mean moves, the rest stays.
    mean_stored = {g: stored_a[is_young == g].mean(0) for g in (True, False)}
    mean_fresh = {g: fresh_a[is_young == g].mean(0) for g in (True, False)}
    centred = torch.cat([torch.nn.functional.cosine_similarity(
        stored_a[is_young == g] - mean_stored[g], fresh_a[is_young == g] - mean_fresh[g]) for g in (True, False)])
    centred_young = torch.cat([torch.ones(int(is_young.sum()), dtype=torch.bool),
                               torch.zeros(int((~is_young).sum()), dtype=torch.bool)])
    # Ranking among the sampled rows: the fresh top-16 is the truth; the stored scores, and the stored scores
    # moved by the group's mean shift q.(mu_now - mu_group) (mu_now: the mean of all fresh rows), against it.
    mu_now = fresh_a.mean(0)
    offset = torch.where(is_young.view(1, -1), q @ (mu_now - mean_stored[True]).view(-1, 1),
                         q @ (mu_now - mean_stored[False]).view(-1, 1))  # (Q, n)
    truth = (q @ fresh_a.T).topk(16, dim=1).indices
    ranked = {"stored scores": (q @ stored_a.T).topk(16, dim=1).indices,
              "stored + group mean shift": (q @ stored_a.T + offset).topk(16, dim=1).indices,
              "fresh scores (truth)": truth}

    correction = correction_variants(q, emb[rows_a][~is_young], fresh_a[~is_young], args.seed)

    # B: each query's stale top rows (positives included: the shift is what matters), re-scored fresh
    stale_scores, top = (q @ emb.T).topk(args.top, dim=1)  # (Q, top)
    uniq, inverse = top.reshape(-1).unique(return_inverse=True)
    fresh_u = model._embed([texts[int(r)] for r in uniq], True, "fresh rows (B)")  # (U, D)
    fresh_scores = (q.unsqueeze(1) * fresh_u[inverse].view(*top.shape, -1)).sum(-1)  # (Q, top)
    k = min(8, args.top)
    by_stale = torch.arange(args.top).expand_as(top)[:, :k]  # the stale order is top's own column order
    by_fresh = fresh_scores.topk(k, dim=1).indices
    kept = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(by_stale, by_fresh)])
    young_top = young[top]  # (Q, top)
    shift_b = fresh_scores - stale_scores

    def mean(x: torch.Tensor) -> str:
        return f"{x.float().mean():.4f}" if x.numel() else "-"

    rows = [
        ["A: rows sampled", str(int(is_young.sum())), str(int((~is_young).sum()))],
        ["A: mean age (steps)", mean(age[rows_a][is_young]), mean(age[rows_a][~is_young])],
        ["A: cosine(stored, fresh) of a row", mean(drift[is_young]), mean(drift[~is_young])],
        ["A: score shift q.e_fresh - q.e_stale, all pairs", mean(shift[:, is_young]), mean(shift[:, ~is_young])],
        ["B: stale top rows (query, row pairs)", str(int(young_top.sum())), str(int((~young_top).sum()))],
        ["B: score shift on those pairs", mean(shift_b[young_top]), mean(shift_b[~young_top])],
    ]
    rows.append(["A: centred cosine(stored, fresh) (group means removed)", mean(centred[centred_young]),
                 mean(centred[~centred_young])])
    ranking = [[name, mean(is_young[idx].float()),
                mean(torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 16 for a, b in zip(idx, truth)]))]
               for name, idx in ranked.items()]
    share = [["B: young share of the top-8 by stale scores", mean(young_top.gather(1, by_stale))],
             ["B: young share of the top-8 by fresh scores (same rows)", mean(young_top.gather(1, by_fresh))],
             ["B: young share of the corpus", mean(young)],
             ["B: stale top-8 rows still in the fresh top-8", mean(kept)]]
    text = "\n".join([
        f"Run `{args.run}` at step {update} ({args.checkpoint}); {len(query_rows)} of its training queries, "
        f"embedded with the final model; rows re-embedded with the same model (eval mode). 'young' = re-embedded "
        f"during training by the rolling refresh, 'old' = embedded by the initial pass. "
        f"{time.perf_counter() - start:.0f} s.", "",
        markdown_table(["measure", "young rows", "old rows"], rows), "",
        markdown_table(["part A: top-16 of the sampled rows by", "young share", "overlap with the fresh top-16"],
                       ranking), "",
        markdown_table(["part C: the stale half estimated as", "re-embedded share of the top-16",
                        "overlap with the fresh top-16"], correction), "",
                markdown_table(["selection (part B, top-8 of each query's stale top-" + str(args.top) + ")", "value"],
                       share)])
    print(text)
    if not args.no_write:
        append_results("text_retrieval: does the rolling bank favour fresh rows? (issue 26)", text)


if __name__ == "__main__":
    main()
