import pytest

from transferkit.config import TrainConfig, config_from_dict, parse_sampling
from transferkit.errors import ConfigError, TransferkitError


def test_values_are_typed_and_checked():
    cfg = config_from_dict({"data": "mnist, digits", "lr": "1e-3", "epochs": 2.0, "head_weights": "1,0.5"})
    assert cfg.data == ["mnist", "digits"] and cfg.lr == 0.001 and cfg.epochs == 2 and cfg.head_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        config_from_dict({"epochs": 1.5})
    with pytest.raises(ConfigError, match="compile must be true or false"):
        config_from_dict({"compile": "yes"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        config_from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "no datasets given"),
        ({"data": ["mnist", "mnist"]}, "twice"),
        ({"data": ["mnist"], "image_size": 8}, "too small"),
        ({"data": ["mnist"], "freeze_epochs": 5, "epochs": 3}, "freeze_epochs"),
        ({"data": ["mnist"], "pseudo_threshold": 1.5}, "pseudo_threshold"),
        ({"data": ["mnist"], "layer_decay": 0.0}, "layer_decay"),
        ({"data": ["mnist"], "ema": 1.0}, "ema"),
        ({"data": ["mnist"], "device": "tpu"}, "device"),
        ({"data": ["mnist"], "class_weights": "inverse"}, "class_weights"),
        ({"data": ["mnist"], "unlabeled": ["nope"]}, "unknown dataset"),
        ({"data": ["mnist"], "augment": "yes"}, "augment must be one of default, robust, none, got 'yes'"),
        ({"data": ["mnist"], "augment": "robust", "augment_severity": 11}, "augment_severity must be 1 to 10"),
        ({"data": ["mnist"], "augment_severity": 6}, "add --augment robust or drop it"),
        ({"data": ["mnist"], "adversarial_training": "pgd"}, "adversarial_training must be one of none, fgsm"),
        ({"data": ["mnist"], "adversarial_eps": "2/255,4/255"}, "adversarial_eps must be one budget"),
        ({"data": ["mnist"], "adversarial_training": "fgsm", "adversarial_eps": "1/0"}, "adversarial_eps must be one"),
        ({"data": ["mnist"], "adversarial_training": "fgsm", "adversarial_eps": 0.5}, "at most 16/255"),
        ({"data": ["mnist"], "adversarial_training": "fgsm", "teachers": ["."]}, "drop it or the teachers"),
    ],
)
def test_validate_refuses_bad_settings(values, message):
    with pytest.raises(TransferkitError, match=message):  # ConfigError, or DataError for dataset names
        config_from_dict(values).validate()


def test_configs_from_before_augment_took_a_name_still_load():
    """A run's config.yaml said `augment: true` or `false` when augment was a switch: it loads (and resumes) as
    default or none, and a new config says the name."""
    import yaml

    for old, new in ((True, "default"), (False, "none")):
        cfg = config_from_dict(yaml.safe_load(f"data: [mnist]\naugment: {str(old).lower()}\n")).validate()
        assert cfg.augment == new
        assert yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["augment"] == new
    assert TrainConfig().augment == "default" and TrainConfig().adversarial_training == "none"
    assert config_from_dict({"adversarial_eps": 0.008}).adversarial_eps == "0.008"


def test_sampling_specs():
    assert parse_sampling("proportional") == 1.0 and parse_sampling("balanced") == 0.0
    assert parse_sampling("temperature:0.3") == 0.3
    with pytest.raises(ConfigError):
        parse_sampling("temperature:")


def test_defaults_validate_with_data():
    assert TrainConfig(data=["digits"]).validate().backbone == "mobilenet_v2"


def test_batch_size_auto_is_the_default_and_is_measured_on_a_cpu():
    """`--batch-size auto` (0 in the config) picks the largest batch whose measured step fits the budget; the
    measurement leaves the model's weights, BatchNorm statistics and the global RNG as they were."""
    import torch

    from transferkit.config import TrainConfig, config_from_dict
    from transferkit.model import MultiHeadModel, create_backbone
    from transferkit.training.batch_size import auto_batch_size
    from transferkit.training.memory import CANDIDATES, MemoryEstimate

    assert TrainConfig().batch_size == 0 and config_from_dict({"batch_size": "auto"}).batch_size == 0
    model = MultiHeadModel(create_backbone("mobilenet_v2", "none"), {"h": ["a", "b"]}, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    batch, how = auto_batch_size(model, 32, torch.device("cpu"), 4.0, distributed=False, images=20_000, epochs=3)
    assert batch in CANDIDATES and how.startswith("batch size auto: batch ") and "a training step measured" in how
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and torch.equal(
        rng, torch.get_rng_state()
    )
    # the choice itself: the largest candidate whose step fits
    estimate = MemoryEstimate(fixed_bytes=2**30, per_image_bytes=90 * 2**20, budget_bytes=4 * 2**30)
    assert estimate.choose() == 32 and MemoryEstimate(0, 10 * 2**30, 2**30).choose() == 8
    # --robust-views 2 puts each image through the model three times: the same budget fits a third the batch
    three_views = MemoryEstimate(fixed_bytes=2**30, per_image_bytes=90 * 2**20, budget_bytes=4 * 2**30, views=3)
    assert three_views.choose() == 8 and "x 3 views" in three_views.describe(8)
    assert auto_batch_size(model, 32, torch.device("cpu"), 4.0, distributed=True, images=20_000, epochs=3)[0] == 128


def test_command_line_values_are_read_by_their_type_not_as_yaml():
    """`--weights no` is the weights name "no" (YAML would make it false); NaN and infinity are refused where a
    number must be finite, from the command line and from a config file alike; `none` unsets an optional number."""
    from transferkit.cli import _parse_value
    from transferkit.config import config_from_dict

    assert _parse_value("weights", "no") == "no" and _parse_value("track", "none") == "none"
    assert _parse_value("ema", "none") is None and _parse_value("lr", "1e-3") == "1e-3"
    config = config_from_dict({"data": ["digits"], "weights": _parse_value("weights", "no"), "lr": "1e-3"})
    assert config.weights == "no" and config.lr == 0.001
    for values in ({"lr": "nan"}, {"lr": float("inf")}, {"head_weights": "1,nan"}, {"ema": float("nan")}):
        with pytest.raises(ConfigError, match="finite"):
            config_from_dict({"data": ["digits"], **values})
