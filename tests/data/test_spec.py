"""DatasetSpec: one grammar for --data, --unlabeled, config files and labels.json."""

from pathlib import Path

import pytest

from transferkit.config import TrainConfig
from transferkit.data import DatasetSpec, check_dataset_name, load_dataset
from transferkit.errors import ConfigError, DataError
from transferkit.preprocess import Preprocessing


@pytest.mark.parametrize(
    "text, source, path, head, name",
    [
        ("mnist", "mnist", None, None, "mnist"),
        ("digits=mnist", "digits", None, "mnist", "digits"),
        ("imagefolder:~/x", "imagefolder:~/x", "~/x", None, "x"),
        ("imagefolder:~/x=digits", "imagefolder:~/x", "~/x", "digits", "x"),
        ("imagefolder:/data/flowers/", "imagefolder:/data/flowers/", "/data/flowers/", None, "flowers"),
    ],
)
def test_parse_and_round_trip(text, source, path, head, name):
    spec = DatasetSpec.parse(text)
    assert (spec.source, spec.path, spec.head, spec.name) == (source, path, head, name)
    assert str(spec) == text and DatasetSpec.parse(str(spec)) == spec
    assert DatasetSpec.parse(spec) is spec


def test_without_head_an_equals_sign_is_part_of_the_path():
    spec = DatasetSpec.parse("imagefolder:/data/a=b", with_head=False)
    assert spec.path == "/data/a=b" and spec.head is None and spec.name == "a=b"
    assert DatasetSpec.parse("mnist=").head is None and str(DatasetSpec.parse("mnist=")) == "mnist"


def test_resolved_makes_folder_paths_absolute_and_keeps_the_head(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = DatasetSpec.parse("imagefolder:imgs=mnist").resolved()
    assert str(spec) == f"imagefolder:{tmp_path.resolve() / 'imgs'}=mnist"
    assert DatasetSpec.parse("mnist").resolved() == DatasetSpec("mnist")
    assert DatasetSpec.parse("imagefolder:.").name == tmp_path.resolve().name


@pytest.mark.parametrize("text, message", [("imagefolder:", "needs a path"), ("=mnist", "has no name")])
def test_malformed_specs_are_refused(text, message):
    with pytest.raises(DataError, match=message):
        DatasetSpec.parse(text)


def test_check_and_load_take_a_spec():
    assert check_dataset_name("digits") == DatasetSpec("digits")
    with pytest.raises(DataError, match="unknown dataset 'mnist=x'"):  # --data takes no =HEAD
        check_dataset_name("mnist=x")
    ds = load_dataset(DatasetSpec("digits", head="mnist"), Preprocessing(image_size=16), limit=8)
    assert ds.name == "digits" and ds.spec == DatasetSpec("digits")


def test_two_folders_with_one_name_are_refused_before_loading(tmp_path):
    a, b = tmp_path / "a" / "imgs", tmp_path / "b" / "imgs"  # empty folders: loading them would fail differently
    with pytest.raises(ConfigError, match="the same name"):
        TrainConfig(data=[f"imagefolder:{a}", f"imagefolder:{b}"]).validate()


@pytest.mark.parametrize(
    "data, heads, weights",
    [(["mnist", "fashion-mnist"], "separate", [1.0]), (["mnist"], "shared", [1.0, 2.0])],
)
def test_head_weight_counts_that_cannot_fit_are_refused_before_loading(data, heads, weights):
    with pytest.raises(ConfigError, match=f"head_weights has {len(weights)} values"):
        TrainConfig(data=data, heads=heads, head_weights=weights).validate()
    TrainConfig(data=["mnist", "digits"], heads="shared", head_weights=[1.0]).validate()  # known only after loading


def test_unlabeled_specs_are_checked_without_their_head():
    TrainConfig(data=["mnist"], unlabeled=["digits=mnist", f"imagefolder:{Path.cwd()}=mnist"]).validate()
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        TrainConfig(data=["mnist"], unlabeled=["nope=mnist"]).validate()
