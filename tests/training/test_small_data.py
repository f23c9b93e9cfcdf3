"""Small datasets train well by default: the data floor of `--batch-size auto`, precise BatchNorm, and the warning
when validation trails training (docs/small_data.md measures the defaults across sizes)."""

import json

import numpy as np
import pytest
import torch
import yaml

from transferkit.config import TrainConfig, config_from_dict
from transferkit.errors import ConfigError
from transferkit.training import train
from transferkit.training.adaptation import batchnorms
from transferkit.training.batch_size import (
    MIN_DATA_BATCH,
    MIN_STEPS_PER_EPOCH,
    MIN_TOTAL_STEPS,
    choose,
    data_cap,
    steps,
)
from transferkit.training.fit_check import gap_warning
from transferkit.training.precise_bn import recompute
from transferkit.training.setup import build_setup


@pytest.mark.parametrize(
    ("images", "epochs", "memory", "batch"),
    [
        (400, 2, 128, 32),  # 13 steps an epoch at 32, under the floor, but the data alone goes no lower than 32
        (1_000, 3, 128, 32),  # 64 would give 16 steps an epoch, under 20
        (1_500, 3, 128, 64),  # 24 steps an epoch, 72 in all
        (2_000, 1, 128, 32),  # one epoch: 64 would give 32 steps in all, under 40
        (20_000, 3, 128, 128),  # large: memory decides
        (20_000, 3, 16, 16),  # memory below what the data allows: memory wins
        (400, 3, 8, 8),  # only memory takes the batch under 32
        (40, 3, 128, 32),  # too small for the floors at any batch the data is given
    ],
)
def test_auto_batch_is_the_largest_both_the_data_and_the_memory_allow(images, epochs, memory, batch):
    chosen, sentence = choose(images, epochs, memory)
    assert chosen == batch
    assert sentence.startswith(f"batch {batch}: {images} training images, {steps(images, batch)} steps an epoch")
    assert f"memory {memory}" in sentence and f"the data allows {data_cap(images, epochs)}" in sentence
    floors_met = steps(images, batch) >= MIN_STEPS_PER_EPOCH and steps(images, batch, epochs) >= MIN_TOTAL_STEPS
    assert ("not reached at batch" in sentence) == (not floors_met)
    assert chosen >= MIN_DATA_BATCH or chosen == memory  # the data alone never goes under MIN_DATA_BATCH
    if MIN_DATA_BATCH < chosen < memory:  # the data decided, and twice the batch would break a floor
        assert steps(images, chosen * 2) < MIN_STEPS_PER_EPOCH or steps(images, chosen * 2, epochs) < MIN_TOTAL_STEPS


def test_train_with_auto_batch_records_the_data_bound_choice_and_says_why(tmp_path, capfd):
    """200 digits, 32 px: memory allows 128 here, the data 32; config.yaml keeps the choice."""
    run = train(config_from_dict(dict(data=["digits"], limit=200, epochs=3, image_size=32, out=str(tmp_path / "r"))))
    err = capfd.readouterr().err
    assert "batch size auto: batch 32: 200 training images, 7 steps an epoch, 21 in all" in err
    assert "the data allows 32, memory 128" in err
    assert yaml.safe_load((run / "config.yaml").read_text())["batch_size"] == 32
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(r["precise_bn_images"] == 200 for r in metrics["history"])  # every epoch, all 200 images
    # a small real dataset trained with the defaults alone: 200 images, three epochs, a few seconds (85% here)
    assert metrics["best"]["val_acc_mean"] >= 0.75
    assert "best epoch 3: val digits" in err and "21 optimiser steps of 32 images" in err
    assert "warning: validation accuracy" not in err
    # the same images at the old default, batch 128 and no precise BatchNorm: 6 steps, near chance (10% here)
    old = dict(data=["digits"], limit=200, epochs=3, image_size=32, batch_size=128, precise_bn=0)
    run = train(config_from_dict({**old, "out": str(tmp_path / "old")}))
    assert json.loads((run / "metrics.json").read_text())["best"]["val_acc_mean"] <= 0.5


@pytest.fixture(scope="module")
def digits_setup():
    config = TrainConfig(data=["digits"], limit=300, image_size=32, batch_size=32, device="cpu").validate()
    torch.manual_seed(0)
    return build_setup(config, torch.device("cpu"))


def test_precise_bn_recomputes_running_statistics_and_leaves_the_weights(digits_setup):
    """The first BatchNorm's running mean becomes the mean of its input over the training images (un-augmented,
    normalised as at evaluation); no parameter moves."""
    model = digits_setup.model
    weights = {k: v.clone() for k, v in model.named_parameters()}
    first = batchnorms(model)[0]
    before = first.running_mean.clone()
    seen = []
    hook = first.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach().mean(dim=(0, 2, 3))))
    try:
        images = recompute(model, digits_setup, epoch=0, images=10_000)
    finally:
        hook.remove()
    assert images == len(digits_setup.pool.labels) == 300
    assert not torch.allclose(first.running_mean, before)  # ImageNet's statistics are gone
    expected = torch.stack(seen).mean(0)  # five chunks of 60 images: a plain mean of chunk means
    torch.testing.assert_close(first.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(weights[k], v) for k, v in model.named_parameters())
    assert model.training  # the mode the caller had
    # the same images give the same statistics: a resumed run recomputes exactly what it had
    again = first.running_var.clone()
    recompute(model, digits_setup, epoch=0, images=10_000)
    assert torch.equal(first.running_var, again)


def test_precise_bn_takes_at_most_the_images_asked_for_in_the_samplers_order(digits_setup):
    from transferkit.training.precise_bn import sample_indices

    labelled, unlabeled = sample_indices(digits_setup, epoch=1, images=100)
    assert unlabeled is None and len(labelled) == 100
    assert np.array_equal(labelled, np.concatenate(digits_setup.sampler.epoch_batches(1))[:100])
    assert recompute(digits_setup.model, digits_setup, epoch=0, images=0) == 0  # 0: off


def test_precise_bn_is_a_config_key_refused_when_negative():
    assert TrainConfig().precise_bn == 1024
    with pytest.raises(ConfigError, match="precise_bn must be >= 0"):
        TrainConfig(data=["digits"], precise_bn=-1).validate()


def test_the_gap_warning_names_the_causes_with_the_numbers():
    record = {"epoch": 2, "train_acc": 0.973, "val_acc_mean": 0.628, "val_acc": {"photos": 0.628}}
    text = gap_warning(record, steps=8, batch=128, fewest=(190, "cat", "photos"))
    assert "validation accuracy 62.8% is 34.5 points below training accuracy 97.3%" in text
    assert (
        f"8 in all at batch 128 (under {MIN_TOTAL_STEPS}" in text
        and "190 ('cat' in photos)" in text
        and "domain gap" in text
    )
    few = gap_warning(record, steps=300, batch=16, fewest=(12, "dog", "photos"))
    assert f"(under {MIN_TOTAL_STEPS}" not in few and "12 ('dog' in photos) (under 50" in few
    close = {"epoch": 3, "train_acc": 0.95, "val_acc_mean": 0.90, "val_acc": {"photos": 0.9}}
    assert gap_warning(close, steps=8, batch=128, fewest=(190, "cat", "photos")) is None


def test_a_run_written_before_precise_bn_resumes_without_it(tiny_run, tmp_path):
    """config.yaml without the key (an older run): 0, as it trained, so a resumed run goes on as it began."""
    import shutil

    from transferkit.runs import load_run

    assert load_run(tiny_run).config.precise_bn == 1024  # written now: the key is there
    old = shutil.copytree(tiny_run, tmp_path / "old")
    values = yaml.safe_load((old / "config.yaml").read_text())
    del values["precise_bn"]
    (old / "config.yaml").write_text(yaml.safe_dump(values))
    assert load_run(old).config.precise_bn == 0
