"""benchmarks/bank_scale.py on saved real embeddings: the sharded flat bank's candidates equal one
process's (the pinned ``--check-exact``), and a bad embeddings file is a clear error."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bank_scale  # noqa: E402


def clustered(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g)
    return centres[torch.randint(0, 20, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)


def test_real_embeddings_sharded_flat_equals_one_process(tmp_path, capsys):
    path = tmp_path / "emb.pt"
    torch.save(clustered(600, 32), path)
    assert bank_scale.main(["--embeddings", str(path), "--processes", "2", "--indexes", "Flat", "--check-exact",
                            "--repeats", "1", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| 536 | Flat | - | - | memory | 2 |" in out  # 600 rows - 64 held-out queries, 2 processes
    assert "sharded flat candidates equal one process's: yes" in out


def test_codes_in_memory_rows_on_disk_reranked_over_every_row_find_the_exact_neighbours(tmp_path, capsys):
    path = tmp_path / "emb.pt"
    torch.save(clustered(600, 32), path)
    rows_dir = tmp_path / "rows"
    assert bank_scale.main(["--embeddings", str(path), "--processes", "2", "--indexes", "IVF+PQ", "--nprobe", "64",
                            "--rerank", "1000", "--rows-dir", str(rows_dir), "--repeats", "1", "--no-write"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 536 | IVF")]
    assert len(table) == 2, table  # 1 and 2 processes
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "IVF32,PQ4" and cells[3:5] == ["1000x", "disk"], cells
        assert cells[7] == cells[8] and cells[-1] == "1.000", cells  # in memory: the index alone
    assert list(rows_dir.iterdir()) == []  # nothing left on disk


def test_real_rows_hold_out_the_queries(tmp_path):
    path = tmp_path / "emb.pt"
    x = clustered(300, 16)
    torch.save(x, path)
    rows, queries = bank_scale.real_rows(str(path), seed=3)
    assert rows.shape == (236, 16) and queries.shape == (64, 16)
    unit = torch.nn.functional.normalize(x, dim=1)
    together = torch.cat([rows, queries])  # a partition of the saved rows, normalised
    assert torch.allclose(together.sort(0).values, unit.sort(0).values)


@pytest.mark.parametrize("saved", [torch.zeros(3), torch.zeros(100, 8), {"rows": torch.zeros(300, 8)}])
def test_a_bad_embeddings_file_is_named(tmp_path, saved):
    path = tmp_path / "bad.pt"
    torch.save(saved, path)
    with pytest.raises(SystemExit, match=r"--embeddings .*bad\.pt: expected a saved \(N, D\) float tensor"):
        bank_scale.main(["--embeddings", str(path), "--no-write"])


def test_a_missing_embeddings_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bank_scale.main(["--embeddings", str(tmp_path / "none.pt"), "--no-write"])
    assert "none.pt: no such file" in capsys.readouterr().err


def test_ties_at_the_cut_may_differ_anything_else_may_not():
    ref_ids, ref_s = [[7, 3, 5, 9]], [[0.9, 0.8, 0.8, 0.5]]
    # the two rows tied at 0.8 swapped: the same candidates
    assert bank_scale.same_candidates([[7, 5, 3, 9]], [[0.9, 0.8, 0.8, 0.5]], ref_ids, ref_s)
    # a different row tied with the last one (0.5): the same candidates
    assert bank_scale.same_candidates([[7, 3, 5, 4]], [[0.9, 0.8, 0.8, 0.5]], ref_ids, ref_s)
    # a different row above the cut, or another score: not
    assert not bank_scale.same_candidates([[7, 3, 4, 9]], [[0.9, 0.8, 0.8, 0.5]], ref_ids, ref_s)
    assert not bank_scale.same_candidates([[7, 3, 5, 9]], [[0.9, 0.8, 0.7, 0.5]], ref_ids, ref_s)


def test_recall_counts_rows_tied_with_the_last_exact_one():
    exact = [[0.9, 0.8, 0.7, 0.7], [0.6, 0.5, 0.4, 0.3]]
    got = [[0.9, 0.7, 0.7, 0.6],  # 0.8 missed: 3 of 4 (a row tied at 0.7 counts)
           [0.6, 0.5, 0.4, 0.3]]  # all 4
    assert bank_scale.recall(got, exact) == 7 / 8
