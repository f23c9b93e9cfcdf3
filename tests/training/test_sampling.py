import numpy as np
import pytest

from transferkit.training.sampling import CyclingSampler, MultiDatasetSampler, dataset_probabilities, shard


def test_proportional_is_one_pass_over_every_image():
    s = MultiDatasetSampler([100, 30, 7], batch_size=16, alpha=1.0, seed=0)
    batches = s.epoch_batches(0)
    flat = np.concatenate(batches)
    assert len(batches) == s.steps_per_epoch == 9
    assert sorted(flat.tolist()) == list(range(137))


def test_balanced_draws_each_dataset_equally_often():
    s = MultiDatasetSampler([1000, 50], batch_size=50, alpha=0.0, seed=1)
    flat = np.concatenate(s.epoch_batches(0))
    from_small = (flat >= 1000).mean()
    assert 0.45 < from_small < 0.55
    assert flat.max() < 1050  # indices stay inside the pool


def test_temperature_probabilities():
    p = dataset_probabilities([100, 25], alpha=0.5)
    np.testing.assert_allclose(p, [10 / 15, 5 / 15])
    s = MultiDatasetSampler([100, 25], batch_size=25, alpha=0.5, seed=2)
    flat = np.concatenate(s.epoch_batches(3))
    assert abs((flat >= 100).mean() - 1 / 3) < 0.1


def test_order_is_a_function_of_seed_and_epoch():
    a = MultiDatasetSampler([40, 40], 8, seed=5)
    b = MultiDatasetSampler([40, 40], 8, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a.epoch_batches(2), b.epoch_batches(2)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.epoch_batches(2), a.epoch_batches(3)))
    assert not np.array_equal(
        np.concatenate(a.epoch_batches(0)), np.concatenate(MultiDatasetSampler([40, 40], 8, seed=6).epoch_batches(0))
    )


def test_shards_partition_a_batch():
    batch = np.arange(11)
    parts = [shard(batch, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))


def test_cycling_sampler_covers_the_pool_across_steps():
    c = CyclingSampler(size=10, count=4, seed=0)
    seen = np.concatenate([c.batch(0, step) for step in range(5)])  # 20 draws = two full passes
    assert sorted(seen.tolist()) == sorted(list(range(10)) * 2)
    assert np.array_equal(c.batch(1, 2), CyclingSampler(10, 4, 0).batch(1, 2))


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        dataset_probabilities([10, 0], 1.0)
