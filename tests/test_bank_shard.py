"""The sharded bank (``bank.shard``) against one process holding the whole bank, on gloo with 2 and 3 processes:
the candidates (exclusions, groups, ceiling, rank window, queries left short), writes, the rolling refresh
and the state of each shard; and the checks that need no second process."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mochi_retrieval.bank import BankSettings, FaissNegativeBank

N, D = 203, 16


def clustered(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) unit rows around 8 centres: ties are unlikely, neighbours are close."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g)
    x = centres[torch.randint(0, 8, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def data():
    emb = clustered(N, D, 0)
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(1)) * 3 + 5  # distinct external ids
    groups = torch.arange(N) // 2  # pairs of rows share a group (identical texts)
    groups[::7] = -1
    return emb, ids, groups


def queries(rank: int):
    """This process's queries (a different count and exclusion width per process) and their rules."""
    emb, ids, _ = data()
    g = torch.Generator().manual_seed(10 + rank)
    b = 3 + 2 * rank
    q = emb[torch.randint(0, N, (b,), generator=g)] + 0.05 * torch.randn(b, D, generator=g)
    exclude = ids[torch.randint(0, N, (b, 1 + rank), generator=g)]
    exclude[0, -1] = -1
    exclude_groups = torch.randint(-1, N // 2, (b, 2), generator=g)
    ceiling = torch.full((b,), 0.97)
    ceiling[-1] = -5.0  # nothing left under it: padded with allow_fewer
    return q, exclude, exclude_groups, ceiling


CASES = [
    dict(k=5),
    dict(k=7, skip_top=3, use_groups=True, exclude_text_dupes=True),
    dict(k=4, use_groups=True, ceiling=True, allow_fewer=True),
    dict(k=60, skip_top=20, exclude_text_dupes=True, max_similarity=0.9),  # re-search rounds
]


def ask(bank, rank, case):
    q, exclude, exclude_groups, ceiling = queries(rank)
    kwargs = dict(exclude=exclude, exclude_text_dupes=case.get("exclude_text_dupes", False),
                  skip_top=case.get("skip_top", 0), allow_fewer=case.get("allow_fewer", False),
                  exclude_groups=exclude_groups if case.get("use_groups") else None,
                  max_similarity=ceiling if case.get("ceiling") else case.get("max_similarity"))
    return bank.candidates(q, case["k"], **kwargs), bank.last_stamps


def _rank_main(rank, world, init_file, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    emb, ids, groups = data()
    whole = FaissNegativeBank(backend, "cpu")
    whole.refresh(emb, ids=ids, text_group=groups, step=0)
    part = FaissNegativeBank(backend, "cpu", shard=True)
    part.refresh(emb[rank::world], ids=ids, text_group=groups, step=0)
    assert part.sharded and len(part) == N and part.embeddings.shape[0] == len(range(rank, N, world))
    with pytest.raises(ValueError, match=f"hold {5 * world} rows between them but ids has {N}"):
        FaissNegativeBank(backend, "cpu", shard=True).refresh(emb[:5], ids=ids)

    def same(step_note):
        for case in CASES:
            (want_ids, want_vecs), want_stamps = ask(whole, rank, case)
            (got_ids, got_vecs), got_stamps = ask(part, rank, case)
            assert torch.equal(got_ids, want_ids), (step_note, case, got_ids, want_ids)
            assert torch.equal(got_vecs, want_vecs) and torch.equal(got_stamps, want_stamps), (step_note, case)
        assert torch.equal(part.staleness(4), whole.staleness(4))

    same("refresh")
    # Writes (keys of every process, the same on each): a shard writes the rows it holds.
    new = clustered(30, D, 5)
    written = ids[torch.arange(0, 60, 2)]
    whole.update(written, new, step=3)
    part.update(written, new, step=3)
    same("update")
    assert torch.equal(part.mean_age(4), whole.mean_age(4))
    # Each shard saves and restores its own rows.
    state = part.state_dict()
    assert state["embeddings"].shape[0] == part.embeddings.shape[0] and state["layout"].tolist() == [world, N]
    again = FaissNegativeBank(backend, "cpu", shard=True)
    again.load_state_dict(state)
    assert torch.equal(again.embeddings, part.embeddings) and torch.equal(again.stamps, part.stamps)
    part = again
    same("restored")
    with pytest.raises(ValueError, match=f"sharded over 5 process\\(es\\) but this run has {world}"):
        FaissNegativeBank(backend, "cpu", shard=True).load_state_dict({**state, "layout": torch.tensor([5, N])})
    dist.destroy_process_group()


@pytest.mark.parametrize("world, backend", [(2, "faiss"), (3, "torch")])
def test_sharded_candidates_equal_one_process_holding_the_whole_bank(tmp_path, world, backend):
    mp.spawn(_rank_main, args=(world, str(tmp_path / "init"), backend), nprocs=world, join=True)


def _text_rank_main(rank, world, init_file):
    """Rolling refresh per shard in TextMoCo: after the initial pass and each step's slice, the shards hold
    exactly the rows of the replicated bank, with the same stamps, and serve the same candidates."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from test_text_model import DOCS, GROUPS, T, ToyTextEncoder, batch_of

    from mochi_retrieval.text_model import BankCorpus, TextMoCo

    models = {}
    for shard in (False, True):
        torch.manual_seed(0)
        enc = ToyTextEncoder()
        settings = BankSettings(candidates=2, backend="faiss", device="cpu", max_staleness=3, shard=shard,
                                mined_negatives=1, update_with_mined=True)
        models[shard] = (enc, TextMoCo(enc, GROUPS, queue_size=0, temperature=T, bank=settings,
                                       bank_corpus=BankCorpus(torch.arange(len(DOCS)), DOCS)))
    for step in range(4):
        losses = {}
        for shard, (enc, model) in models.items():
            torch.manual_seed(step)
            out = model(**batch_of(enc, [(step + rank) % 10, (step + 3 + rank) % 10]), step=step)
            losses[shard] = out["loss"].detach()
            with torch.no_grad():
                for p in enc.parameters():
                    p.add_(0.01 * (step + 1))  # move the encoder: each refresh writes new rows
        assert torch.equal(losses[True], losses[False]), (step, losses)
        whole, part = models[False][1].bank, models[True][1].bank
        assert torch.equal(part.embeddings, whole.embeddings[rank::world]), step
        assert torch.equal(part.stamps, whole.stamps[rank::world]), step
    assert "bank.embeddings" not in models[True][1].replicated_state()
    shard_state = models[True][1].bank_shard_state()
    assert shard_state["layout"].tolist() == [world, rank, len(DOCS)]
    dist.destroy_process_group()


def test_sharded_text_bank_refreshes_its_own_rows_and_trains_like_the_replicated_one(tmp_path):
    mp.spawn(_text_rank_main, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_one_process_shard_is_the_whole_bank_and_checks_the_layout():
    emb, ids, groups = data()
    whole, part = FaissNegativeBank("faiss", "cpu"), FaissNegativeBank("faiss", "cpu", shard=True)
    for bank in (whole, part):
        bank.refresh(emb, ids=ids, text_group=groups)
    q = queries(0)[0]
    assert not part.sharded and torch.equal(part.candidates(q, 6)[0], whole.candidates(q, 6)[0])
    state = part.state_dict()
    with pytest.raises(ValueError, match="sharded over 2 process"):
        part.load_state_dict({**state, "layout": torch.tensor([2, N])})
    with pytest.raises(ValueError, match="bank.shard=false"):
        whole.load_state_dict(state)


def test_two_process_sharded_text_run_resumed_equals_the_replicated_run(tiny_text_model_dir, tmp_path):
    """accelerate (gloo), 2 processes, 4 steps: the replicated bank uninterrupted against the sharded bank
    stopped after step 2 and resumed from its checkpoint (one file of rows per process): the same losses.
    Resuming that checkpoint with 1 process is a clear error. (Four launches: slower than the rest.)"""
    import json
    import os
    import subprocess
    import sys

    from test_text_train import CONFIG, make_tiny_beir, text_overrides

    beir = make_tiny_beir(tmp_path / "beir")
    config = json.loads((tiny_text_model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # same maths on every process
    (tiny_text_model_dir / "config.json").write_text(json.dumps(config))
    common = {"mochi.enabled": "false", "bank.mined_negatives": 1, "bank.max_pos_ratio": "null",
              "bank.max_staleness": 3, "bank.update_with_mined": "true", "train.checkpoint_every_steps": 1,
              "train.batch_size": 8, "train.max_steps": 4, "train.epochs": 2, "train.optimizer": "sgd",
              "moco.queue_size": 0,
              "train.lr": 0.5, "train.warmup_epochs": 0, "train.schedule": "constant"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def launch(procs, out, **extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *(["--multi_gpu"] if procs > 1 else []), "-m", "mochi_retrieval.train", str(CONFIG),
               *text_overrides(tiny_text_model_dir, beir, out, **{**common, **extra})]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    whole, part = tmp_path / "whole", tmp_path / "part"
    proc = launch(2, whole)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch(2, part, **{"bank.shard": "true", "train.max_steps": 2})
    assert proc.returncode == 0, proc.stderr[-3000:]
    def shard_files():
        return sorted(p.name for p in (part / "checkpoints").glob("*.bank-*"))

    assert shard_files() == [f"step-0000000{s}.bank-{r}-of-2.pt" for s in (1, 2) for r in (0, 1)]  # keep 2
    proc = launch(2, part, **{"bank.shard": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    assert losses(part) == losses(whole) and len(losses(whole)) == 4
    assert shard_files() == [f"step-0000000{s}.bank-{r}-of-2.pt" for s in (3, 4) for r in (0, 1)]  # old ones go
    proc = launch(1, part, **{"bank.shard": "true", "train.max_steps": 6})
    assert proc.returncode != 0 and "sharded over 2 process(es) but this run has 1" in proc.stderr
