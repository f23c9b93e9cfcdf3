"""Options generated from their dataclasses (transferkit/options.py): every option has help and shows its
default once, and what the command line parses is what the dataclass gets."""

from __future__ import annotations

import dataclasses

import pytest

from transferkit.cli import build_parser
from transferkit.evaluation.robust_options import RobustnessOptions
from transferkit.export.job import ExportOptions
from transferkit.options import CLI, field_comments, flags, given, markdown_rows
from transferkit.serving.k8s import K8sOptions
from transferkit.serving.server import SETTING_FLAGS
from transferkit.serving.settings import ServingSettings


@pytest.mark.parametrize("cls", [ExportOptions, ServingSettings, K8sOptions, RobustnessOptions])
def test_every_option_field_has_help_and_one_default(cls):
    helps = field_comments(cls)
    option_fields = [f.name for f in dataclasses.fields(cls) if CLI in f.metadata]
    assert option_fields and all(len(helps.get(name, "")) > 10 for name in option_fields), helps
    rows = markdown_rows(cls)
    assert len(rows) == len(option_fields) and all(row.count("(default:") == 0 for row in rows)


def test_export_flags_reach_export_options():
    args = build_parser().parse_args(
        [
            "export",
            "RUN",
            "--max-acc-delta",
            "2",
            "--min-agreement",
            "0.9",
            "--slower-int8",
            "offer",
            "--int8-budget-s",
            "60",
            "--simplify",
        ]
    )
    options = ExportOptions(**given(args, ExportOptions))
    assert (options.max_acc_delta_points, options.min_top1_agreement, options.slower_int8) == (2.0, 0.9, "offer")
    assert options.int8_budget_s == 60.0 and options.simplify and options.calibration_images == 512
    defaults = ExportOptions(**given(build_parser().parse_args(["export", "RUN"]), ExportOptions))
    assert defaults == ExportOptions()


def test_eval_robustness_flags_reach_robustness_options():
    args = build_parser().parse_args(["eval", "RUN", "--corruptions", "noise,fog", "--attack", "pgd", "--eps", "2/255"])
    options = RobustnessOptions(**given(args, RobustnessOptions))
    assert options.corruption_names == ("gaussian_noise", "shot_noise", "impulse_noise", "fog")
    assert options.severity_levels == (1, 2, 3, 4, 5) and options.eps_values == (2 / 255,) and options.steps == 10
    assert not RobustnessOptions(**given(build_parser().parse_args(["eval", "RUN"]), RobustnessOptions)).active


def test_serve_flags_are_the_settings_fields_and_unset_means_not_given():
    assert SETTING_FLAGS == flags(ServingSettings)
    assert SETTING_FLAGS["timeout_s"] == "--timeout" and SETTING_FLAGS["max_batch"] == "--max-batch"
    assert "api_key" not in SETTING_FLAGS and "model" not in SETTING_FLAGS  # the key never goes in argv
    args = build_parser().parse_args(["serve", "RUN", "--timeout", "3", "--workers", "1"])
    assert given(args, ServingSettings) == {"timeout_s": 3.0, "workers": 1}  # the rest: environment, defaults


def test_build_k8s_flags_and_their_refusal_without_k8s():
    from transferkit.cli import _k8s_options
    from transferkit.errors import TransferkitError

    args = build_parser().parse_args(["build", "RUN", "--k8s-cpu", "500m", "--k8s-max-replicas", "6"])
    with pytest.raises(TransferkitError, match="--k8s-cpu, --k8s-max-replicas: only with --k8s DIR"):
        _k8s_options(args)
    assert given(args, K8sOptions, prefix="k8s-") == {"cpu": "500m", "max_replicas": 6}
