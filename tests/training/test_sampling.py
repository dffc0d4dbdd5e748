import pytest
import torch

from training.sampling import derived_seed, epoch_batches


def test_ranks_split_each_global_batch_without_overlap():
    single = epoch_batches(100, 16, seed=0, epoch=3)
    shards = [epoch_batches(100, 16, seed=0, epoch=3, rank=rank, world_size=4) for rank in range(4)]
    assert single.shape == (6, 16) and all(shard.shape == (6, 4) for shard in shards)
    for step in range(6):
        joined = torch.cat([shard[step] for shard in shards])
        assert torch.equal(joined.sort().values, single[step].sort().values)


def test_an_epoch_visits_distinct_images_and_drops_only_the_last_partial_batch():
    batches = epoch_batches(100, 16, seed=0, epoch=0)
    assert batches.unique().numel() == 96


def test_the_order_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_batches(100, 16, seed=1, epoch=2), epoch_batches(100, 16, seed=1, epoch=2))
    assert not torch.equal(epoch_batches(100, 16, seed=1, epoch=2), epoch_batches(100, 16, seed=1, epoch=3))
    assert not torch.equal(epoch_batches(100, 16, seed=1, epoch=2), epoch_batches(100, 16, seed=2, epoch=2))


def test_derived_seeds_do_not_collide_where_sums_would():
    assert derived_seed(1, "augment", 2) != derived_seed(2, "augment", 1)
    assert 0 <= derived_seed(0) < 2**63


@pytest.mark.parametrize("batch, world", [(16, 3), (200, 1)])
def test_impossible_batches_are_refused(batch, world):
    with pytest.raises(ValueError, match="batch-size"):
        epoch_batches(100, batch, seed=0, epoch=0, world_size=world)
