import pytest

from transferkit.errors import ConfigError
from transferkit.training.labels import LabelMap, class_index_map, match_head, normalize_class_name, plan_heads

DIGITS = [str(i) for i in range(10)]


def test_normalisation():
    assert normalize_class_name("  Ankle_Boot ") == normalize_class_name("ankle-boot") == "ankle boot"


def test_identical_class_names_share_one_head():
    plan = plan_heads([("mnist", DIGITS), ("digits", DIGITS)], "shared", LabelMap())
    assert list(plan.labels.heads) == ["mnist"]
    assert plan.labels.datasets == {"mnist": "mnist", "digits": "mnist"}


def test_shared_head_remaps_a_different_class_order():
    plan = plan_heads([("a", ["cat", "dog"]), ("b", ["Dog", "CAT"])], "shared", LabelMap())
    assert plan.labels.datasets["b"] == "a"
    assert plan.label_remap["b"] == [1, 0]


def test_separate_heads():
    plan = plan_heads([("mnist", DIGITS), ("digits", DIGITS)], "separate", LabelMap())
    assert list(plan.labels.heads) == ["mnist", "digits"]


def test_label_map_synonyms_make_heads_shareable(tmp_path):
    f = tmp_path / "map.yaml"
    f.write_text("kitty: cat\npuppy: dog\n")
    lm = LabelMap.from_file(f)
    plan = plan_heads([("a", ["cat", "dog"]), ("b", ["puppy", "kitty"])], "shared", lm)
    assert list(plan.labels.heads) == ["a"] and plan.label_remap["b"] == [1, 0]


def test_partial_overlap_maps_only_shared_names():
    assert class_index_map(["cat", "dog", "bird"], ["Dog", "fish", "cat"], LabelMap()) == {0: 2, 1: 0}
    heads = {"pets": ["cat", "dog"], "digits": DIGITS}
    assert match_head(["dog", "horse"], heads, LabelMap()) == "pets"
    assert match_head(["horse"], heads, LabelMap()) is None


def test_colliding_names_are_refused():
    with pytest.raises(ConfigError, match="collide"):
        plan_heads([("a", ["Cat", "cat"])], "shared", LabelMap())


def test_bad_label_map_file(tmp_path):
    f = tmp_path / "map.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        LabelMap.from_file(f)
