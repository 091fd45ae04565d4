"""bank.rerank and bank.rows_dir: a code index's shortlist ordered by exact scores, and rows kept in a
memory-mapped file. Checked against brute force, against the exact bank (a shortlist of every row is exact
search), under 2 processes (shards) and through the training program (same weights as the flat bank)."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_bank_shard import clustered

from mochi_retrieval.bank import BankSettings, FaissNegativeBank
from mochi_retrieval.bank.index import MISSING_SCORE, rerank_exact

pytest.importorskip("faiss")

def test_rerank_exact_orders_the_shortlist_by_brute_force_scores():
    g = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    q = torch.randn(7, 8, generator=g)
    short = torch.stack([torch.randperm(50, generator=g)[:12] for _ in range(7)])
    short[2, 5:] = -1  # the index found only 5 rows for query 2
    for chunk in (1 << 24, 8 * 12):  # one chunk, and one query per chunk
        scores, found = rerank_exact(q, rows, short, 10, chunk_floats=chunk)
        for b in range(7):
            listed = [r for r in short[b].tolist() if r >= 0]
            want = sorted(listed, key=lambda r: -float(q[b] @ rows[r]))[:10]
            assert found[b, : len(want)].tolist() == want
            torch.testing.assert_close(scores[b, : len(want)], q[b] @ rows[want].T)
        assert found[2, 5:].tolist() == [-1] * 5 and (scores[2, 5:] == MISSING_SCORE).all()
    # more asked for than shortlisted: padded
    scores, found = rerank_exact(q, rows, short[:, :3], 6)
    assert (found[:, 3:] == -1).all() and (found[:, :3] >= 0).all()


def _banks(rows_dir, n=600, d=16, rerank=1000, spec="IVF8,PQ4x4", params="nprobe=8"):
    emb = clustered(n, d, 3)
    exact = FaissNegativeBank("faiss", "cpu")
    coded = FaissNegativeBank("faiss", "cpu", index=spec, search_params=params, rerank=rerank, rows_dir=rows_dir)
    for bank in (exact, coded):
        bank.refresh(emb, step=0)
    return exact, coded


def _mapped_files(folder: Path) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]


def test_a_shortlist_of_every_row_reranked_from_rows_on_disk_is_exact_search(tmp_path):
    folder = tmp_path / "rows"
    exact, coded = _banks(folder)
    q = clustered(30, 16, 4)
    excl = torch.randint(0, 600, (30, 2), generator=torch.Generator().manual_seed(0))
    for bank in (exact, coded):  # writes reach the mapped rows and the codes
        bank.update(torch.arange(0, 200, 2), clustered(100, 16, 9), step=1)
    want, got = exact.candidates(q, 12, exclude=excl, skip_top=2), coded.candidates(q, 12, exclude=excl, skip_top=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(coded.stamps, exact.stamps) and coded.last_recall == 1.0
    # The rows are in an unlinked file under rows_dir: mapped, nothing left in the folder.
    assert list(folder.iterdir()) == [] and any("(deleted)" in line for line in _mapped_files(folder))
    # The checkpoint round trip holds the rows bit for bit, again on disk.
    again = FaissNegativeBank("faiss", "cpu", index="IVF8,PQ4x4", search_params="nprobe=8", rerank=1000,
                              rows_dir=folder)
    again.load_state_dict(coded.state_dict())
    assert torch.equal(again.embeddings, coded.embeddings) and torch.equal(again.stamps, coded.stamps)
    assert torch.equal(again.candidates(q, 12, exclude=excl)[0], exact.candidates(q, 12, exclude=excl)[0])


def test_reranking_recovers_what_coarse_codes_lose(tmp_path):
    """4-bit codes of 2 dimensions misorder close neighbours (recall@16 0.38 here); the rows' exact scores over
    an 8x shortlist put them back in order (0.94)."""
    emb = clustered(2000, 16, 3)
    recall = {}
    for rerank in (1, 8):
        bank = FaissNegativeBank("faiss", "cpu", index="IVF8,PQ8x4", search_params="nprobe=8", rerank=rerank,
                                 rows_dir=tmp_path if rerank > 1 else None, recall_queries=200)
        bank.refresh(emb, step=0)
        recall[rerank] = bank.last_recall
    assert recall[1] < 0.5 and recall[8] > 0.9, recall


def test_bad_rerank_and_rows_dir_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="'rerank': must be an int >= 1"):
        BankSettings(index="IVF16,Flat", rerank=0)
    with pytest.raises(ValueError, match=r"'rerank': must be 1 with bank.index='Flat'"):
        BankSettings(rerank=4)
    with pytest.raises(ValueError, match=r"'rows_dir': must be null with backend='torch'"):
        BankSettings(backend="torch", rows_dir=str(tmp_path))
    with pytest.raises(ValueError, match="rerank must be an int >= 1"):
        FaissNegativeBank("faiss", "cpu", index="IVF8,Flat", rerank=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bank = FaissNegativeBank("faiss", "cpu", rows_dir=str(blocker / "rows"))
    with pytest.raises(ValueError, match=r"bank.rows_dir=.*a_file/rows.*cannot create the rows' file"):
        bank.refresh(clustered(20, 8, 0))
    assert blocker.read_text() == "x"


def _shard_main(rank, world, init_file, rows_dir):
    from test_bank_shard import CASES, N, ask, data

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    emb, ids, groups = data()
    whole = FaissNegativeBank("faiss", "cpu")
    whole.refresh(emb, ids=ids, text_group=groups, step=0)
    part = FaissNegativeBank("faiss", "cpu", shard=True, index="IVF2,PQ4x4", search_params="nprobe=2",
                             rerank=1000, rows_dir=f"{rows_dir}/{rank}")
    part.refresh(emb[rank::world], ids=ids, text_group=groups, step=0)
    assert len(part) == N
    for case in CASES:
        (want_ids, want_vecs), _ = ask(whole, rank, case)
        (got_ids, got_vecs), _ = ask(part, rank, case)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_vecs, want_vecs), case
    dist.destroy_process_group()


def test_sharded_reranked_banks_on_disk_equal_one_process_with_the_exact_bank(tmp_path):
    mp.spawn(_shard_main, args=(2, str(tmp_path / "init"), str(tmp_path / "rows")), nprocs=2, join=True)


def test_training_with_a_reranked_code_bank_on_disk_matches_the_flat_bank(tiny_text_model_dir, tmp_path):
    """Every row shortlisted: the same candidates as the flat bank, so the same trained weights."""
    from test_text_train import CONFIG, make_tiny_beir, text_overrides

    from mochi_retrieval import train
    from mochi_retrieval.eval.models import load_model

    data = make_tiny_beir(tmp_path / "beir")
    common = {"mochi.enabled": "false", "bank.mined_negatives": 1, "train.max_steps": 3, "moco.queue_size": 0}
    coded = {"bank.index": "IVF2,PQ4x4", "bank.search_params": "nprobe=2", "bank.rerank": 1000,
             "bank.rows_dir": str(tmp_path / "rows")}
    outs = {}
    for name, extra in (("flat", {}), ("coded", coded)):
        outs[name] = tmp_path / name
        assert train.main([str(CONFIG), *text_overrides(tiny_text_model_dir, data, outs[name],
                                                        **common, **extra)]) == 0
    records = [json.loads(line) for line in (outs["coded"] / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bank_index_recall"] == 1.0
    assert "IVF2,PQ4x4" in (outs["coded"] / "config.yaml").read_text()
    assert (tmp_path / "rows").is_dir() and not list((tmp_path / "rows").iterdir())  # mapped there, unlinked
    texts = ["red cat", "the small fox ran over the lazy dog"]
    flat, coded_emb = (load_model(outs[n] / "model").encode_texts(texts) for n in ("flat", "coded"))
    torch.testing.assert_close(coded_emb, flat, atol=1e-6, rtol=0)
