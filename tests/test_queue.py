"""Momentum queue: ring order, wrap-around, masks, state, and two processes vs one."""
import os

import device_checks
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from device_checks import DEVICES

from mochi_retrieval.distributed import replicas_agree
from mochi_retrieval.queue import NO_ID, MomentumQueue


def keys(n, d=4, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_initial_keys_are_unit_rows():
    q = MomentumQueue(100, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(100))
    assert len(q) == 100 and q.dim == 16 and int(q.ptr) == 0
    assert (q.ids == NO_ID).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ring_order_wrap_masks_and_state_on_device(device):
    """K = 7 with batches of 3: writes wrap across the end of the buffer; a batch longer than the queue;
    exclusion masks; state_dict round trip; all with the queue on ``device``."""
    device_checks.check_queue(device)


def test_batch_longer_than_queue_keeps_newest():
    q = MomentumQueue(4, 4)
    q.add(keys(2, seed=1))
    batch = keys(10, seed=2)
    q.add(batch, ids=torch.arange(10))
    ref_q = MomentumQueue(4, 4)
    ref_q.add(keys(2, seed=1))
    for i in range(10):
        ref_q.add(batch[i : i + 1], ids=torch.tensor([i]))
    torch.testing.assert_close(q.keys, ref_q.keys)
    assert torch.equal(q.ids, ref_q.ids) and int(q.ptr) == int(ref_q.ptr)


def test_exclusion_mask_same_instance_and_label():
    q = MomentumQueue(6, 4)
    q.add(keys(4), ids=torch.tensor([5, 6, 7, 8]), labels=torch.tensor([0, 1, 0, 2]))
    mask = q.exclusion_mask(ids=torch.tensor([6, 9]))
    assert mask.tolist() == [[False, True, False, False, False, False], [False] * 6]
    mask = q.exclusion_mask(ids=torch.tensor([6, 9]), labels=torch.tensor([0, 2]))
    assert mask.tolist() == [[True, True, True, False, False, False], [False, False, False, True, False, False]]
    assert q.exclusion_mask() is None


def test_state_dict_round_trip():
    q = MomentumQueue(9, 4)
    q.add(keys(5), ids=torch.arange(5), labels=torch.arange(5) % 2)
    r = MomentumQueue(9, 4)
    r.load_state_dict(q.state_dict())
    for name in ("keys", "ids", "labels", "ptr", "num_added"):
        assert torch.equal(getattr(q, name), getattr(r, name))


def test_bad_input():
    with pytest.raises(ValueError, match="size"):
        MomentumQueue(0, 4)
    q = MomentumQueue(5, 4)
    with pytest.raises(ValueError, match="keys must be"):
        q.add(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ids"):
        q.add(keys(2), ids=torch.arange(3))


# Global batches per step, split between 2 ranks; rank 1 gets a short last batch.
GLOBAL_SIZES = [(3, 3), (3, 3), (3, 3), (2, 1)]


def _rank_main(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = MomentumQueue(10, 4, generator=torch.Generator().manual_seed(0))
        for step, sizes in enumerate(GLOBAL_SIZES):
            batch = keys(sum(sizes), seed=step)
            lo = sum(sizes[:rank])
            mine = slice(lo, lo + sizes[rank])
            q.add(batch[mine], ids=torch.arange(sum(sizes))[mine] + 100 * step)
        torch.save(q.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        agree = replicas_agree(dict(q.named_buffers()))
        if rank == 1:  # one process drifts: the check must name the buffer
            q.keys[0, 0] += 1e-3
        drift = replicas_agree(dict(q.named_buffers()))
        torch.save({"agree": agree, "drift": drift}, os.path.join(out_dir, f"check{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_hold_the_single_process_queue(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = MomentumQueue(10, 4, generator=torch.Generator().manual_seed(0))
    for step, sizes in enumerate(GLOBAL_SIZES):
        single.add(keys(sum(sizes), seed=step), ids=torch.arange(sum(sizes)) + 100 * step)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            assert torch.equal(state[name], value), (rank, name)
        check = torch.load(tmp_path / f"check{rank}.pt", weights_only=True)
        assert check == {"agree": [], "drift": ["keys"]}
