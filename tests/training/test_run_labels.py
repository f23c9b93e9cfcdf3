"""labels.json records each dataset's spec; export verification reloads datasets by it, never by position."""

import json

import pytest
import torch

from transferkit.config import TrainConfig
from transferkit.errors import ConfigError, DataError
from transferkit.export.verify import dataset_sources
from transferkit.preprocess import Preprocessing
from transferkit.runs import Labels, Run, load_run, save_run_metadata
from transferkit.training import setup as training_setup
from transferkit.training.setup import build_setup

DIGITS = [str(i) for i in range(10)]


def test_labels_round_trip_and_old_files_without_specs():
    labels = Labels(heads={"mnist": DIGITS}, datasets={"mnist": "mnist"}, specs={"mnist": "mnist"})
    assert Labels.from_dict(json.loads(json.dumps(labels.to_dict()))) == labels
    old = Labels.from_dict({"heads": {"mnist": DIGITS}, "datasets": {"mnist": "mnist"}})
    assert old.specs == {}


def test_training_setup_records_every_dataset_spec(digits_folder, tmp_path):
    folder = f"imagefolder:{digits_folder}"
    config = TrainConfig(data=["digits", folder], image_size=32, limit=32, weights="none", heads="separate")
    setup = build_setup(config.validate(), torch.device("cpu"))
    assert setup.plan.labels.specs == {"digits": "digits", digits_folder.name: folder}
    assert (
        setup.model.preprocessing == setup.preprocessing == Preprocessing(image_size=32, jpeg_draft=True)
    )  # a new run
    save_run_metadata(tmp_path, config, setup.preprocessing, setup.plan.labels)
    assert json.loads((tmp_path / "labels.json").read_text())["specs"][digits_folder.name] == folder
    assert load_run(tmp_path).labels == setup.plan.labels


def _run(data: list[str], datasets: list[str], specs: dict[str, str]) -> Run:
    labels = Labels(heads={d: DIGITS for d in datasets}, datasets={d: d for d in datasets}, specs=specs)
    return Run(dir=None, config=TrainConfig(data=data), preprocessing=Preprocessing(), labels=labels)


def test_verification_uses_the_recorded_spec():
    # the folder's name no longer matches the dataset it held (moved, or reached through another link)
    run = _run(["imagefolder:/data/renamed"], ["digits_png"], {"digits_png": "imagefolder:/data/renamed"})
    assert dataset_sources(run) == {"digits_png": "imagefolder:/data/renamed"}


def test_old_runs_match_config_data_by_name_and_never_by_position():
    run = _run(["fashion-mnist", "imagefolder:/data/x/"], ["x", "fashion-mnist"], {})
    assert dataset_sources(run) == {"x": "imagefolder:/data/x/", "fashion-mnist": "fashion-mnist"}
    with pytest.raises(DataError, match=r"dataset\(s\) \['digits_png'\]"):
        dataset_sources(_run(["imagefolder:/data/renamed"], ["digits_png"], {}))


def test_backbone_input_size_is_refused_before_any_data_is_loaded(monkeypatch):
    def no_loading(*args):
        raise AssertionError("data was loaded before the input size was checked")

    monkeypatch.setattr(training_setup, "load_datasets", no_loading)
    config = TrainConfig(data=["digits"], backbone="vit_b_16", weights="none", image_size=32).validate()
    with pytest.raises(ConfigError, match="cannot take 32px"):
        build_setup(config, torch.device("cpu"))
