import pytest

from transferkit.config import TrainConfig, config_from_dict, parse_sampling
from transferkit.errors import ConfigError, TransferkitError


def test_values_are_typed_and_checked():
    cfg = config_from_dict({"data": "mnist, digits", "lr": "1e-3", "epochs": 2.0, "head_weights": "1,0.5"})
    assert cfg.data == ["mnist", "digits"] and cfg.lr == 0.001 and cfg.epochs == 2 and cfg.head_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        config_from_dict({"epochs": 1.5})
    with pytest.raises(ConfigError, match="augment must be true or false"):
        config_from_dict({"augment": "yes"})
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
    ],
)
def test_validate_refuses_bad_settings(values, message):
    with pytest.raises(TransferkitError, match=message):  # ConfigError, or DataError for dataset names
        config_from_dict(values).validate()


def test_sampling_specs():
    assert parse_sampling("proportional") == 1.0 and parse_sampling("balanced") == 0.0
    assert parse_sampling("temperature:0.3") == 0.3
    with pytest.raises(ConfigError):
        parse_sampling("temperature:")


def test_defaults_validate_with_data():
    assert TrainConfig(data=["digits"]).validate().backbone == "mobilenet_v2"
