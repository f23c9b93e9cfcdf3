"""Robustness evaluation (`transferkit eval --corruptions ... --attack ...`): FGSM and PGD against a case worked out
by hand, accuracy that falls with severity and with eps on a trained model, the adversarial images through an
exported artifact, what eval writes, and options refused before anything loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_cli
from transferkit.evaluation.attacks import exported_runtimes, fgsm, pgd, score_attacks
from transferkit.evaluation.corruption_eval import score_corruptions
from transferkit.evaluation.robust_options import CORRUPTION_FAMILIES, RobustnessOptions
from transferkit.runs import load_run


def _loaded(run_dir, images: int):
    from transferkit.data import load_dataset
    from transferkit.runs import load_run_model

    model, run = load_run_model(run_dir)
    datasets = [load_dataset(spec, run.preprocessing, limit=images) for spec in run.labels.specs.values()]
    return model, run, datasets


def test_fgsm_and_pgd_reach_the_corner_a_linear_model_predicts():
    """For a linear two-class model the loss rises along sign(w_other - w_true) everywhere: FGSM steps to that corner
    of the eps-ball, PGD (enough steps) ends there too; at eps 0 neither moves a pixel."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 12, generator=gen)
    x = torch.rand(6, 12, generator=gen) * 0.6 + 0.2
    x[0, :3] = 1.0  # already at the top of the pixel range: clipped there
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    loss_of = lambda z: F.cross_entropy(z @ weights.T, y, reduction="sum")  # noqa: E731
    eps = 0.05
    corner = (x + eps * torch.sign(weights[1 - y] - weights[y])).clamp(0, 1)
    assert torch.allclose(fgsm(loss_of, x, eps), corner)
    assert torch.allclose(pgd(loss_of, x, eps, steps=10, generator=torch.Generator().manual_seed(1)), corner)
    assert torch.equal(fgsm(loss_of, x, 0.0), x)
    assert torch.equal(pgd(loss_of, x, 0.0, steps=3, generator=torch.Generator().manual_seed(1)), x)


def test_accuracy_falls_with_severity_on_a_trained_model(probe_run):
    model, run, datasets = _loaded(probe_run, 48)
    options = RobustnessOptions(corruptions="all", severities="1,3,5", robust_images=48)
    result = score_corruptions(model, run, datasets, "test", options, "cpu")
    for dataset, row in result.cells.items():
        cell = next(c for c in row.values() if c.own)
        by_severity = {s: sum(cell.accuracy[c][s] for c in cell.accuracy) / len(cell.accuracy) for s in (1, 3, 5)}
        assert cell.clean > 0.6 and cell.clean >= by_severity[1] - 0.02, (dataset, cell.clean, by_severity)
        assert by_severity[1] > by_severity[3] > by_severity[5], (dataset, by_severity)
        assert by_severity[1] - by_severity[5] > 0.1
        for family, names in CORRUPTION_FAMILIES.items():  # each family on its own: a little slack for noise
            mean = {s: sum(cell.accuracy[c][s] for c in names) / len(names) for s in (1, 5)}
            assert mean[5] <= mean[1] + 0.05, (dataset, family, mean)


def test_fgsm_at_eps_zero_changes_nothing_and_a_large_eps_breaks_the_model(probe_run):
    model, run, datasets = _loaded(probe_run, 48)
    options = RobustnessOptions(attack="fgsm", eps="0,8/255", robust_images=48)
    cells = score_attacks(model, run, datasets, "test", options, "cpu")
    stronger = score_attacks(
        model, run, datasets, "test", RobustnessOptions(attack="pgd", eps="8/255", pgd_steps=3, robust_images=48), "cpu"
    )
    for dataset, row in cells.items():
        for head, cell in row.items():
            assert cell.pytorch[0.0] == cell.pytorch_uint8[0.0] == cell.clean > 0.6
            assert cell.pytorch[8 / 255] < cell.clean - 0.3, (dataset, cell)
            assert stronger[dataset][head].pytorch[8 / 255] <= cell.pytorch[8 / 255] + 0.05


def test_adversarial_images_go_through_the_exported_artifact_as_uint8(exported):
    run_dir, _ = exported
    model, run, datasets = _loaded(run_dir, 32)
    runtimes, skipped = exported_runtimes(run)
    assert list(runtimes) == ["onnx"] and not skipped
    options = RobustnessOptions(attack="fgsm", eps="4/255", robust_images=32)
    for row in score_attacks(model, run, datasets, "test", options, "cpu", runtimes).values():
        for cell in row.values():  # ONNX and PyTorch see the very same rounded pixels
            assert cell.artifacts["onnx"][4 / 255] == pytest.approx(cell.pytorch_uint8[4 / 255], abs=1.5 / cell.images)


def test_an_artifact_that_failed_the_gate_is_scored_only_when_asked(exported, tmp_path):
    run_dir, _ = exported
    copy = shutil.copytree(run_dir, tmp_path / "run")
    manifest = json.loads((copy / "export" / "manifest.json").read_text())
    manifest["formats"]["onnx"]["status"] = "export ok but verification failed"
    (copy / "export" / "manifest.json").write_text(json.dumps(manifest))
    run = load_run(copy)
    runtimes, skipped = exported_runtimes(run)
    assert not runtimes and "not servable: export ok but verification failed" in skipped["onnx"]
    runtimes, skipped = exported_runtimes(run, failed_gate=True)  # a benchmark's view: how far did it fall
    assert list(runtimes) == ["onnx"] and not skipped


def test_eval_writes_the_robustness_tables_heatmaps_and_report(tiny_run, tmp_path):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    reference = shutil.copytree(run_dir, tmp_path / "reference")
    proc = run_cli(
        "eval",
        str(run_dir),
        *("--corruptions", "fog,jpeg_compression", "--severities", "1,5", "--reference", str(reference)),
        *("--attack", "fgsm", "--eps", "0,8/255", "--robust-images", "16"),
    )
    assert "accuracy under corruptions" in proc.stdout and "FGSM (white-box" in proc.stdout
    robustness = json.loads((run_dir / "eval.json").read_text())["robustness"]
    corruptions = robustness["corruptions"]
    assert corruptions["corruptions"] == ["fog", "jpeg_compression"] and corruptions["severities"] == [1, 5]
    cell = corruptions["datasets"]["mnist"]["mnist"]
    assert cell["own"] and set(cell["accuracy"]["fog"]) == {"1", "5"} and cell["images"] == 16
    assert cell["ce"] == {"fog": 1.0, "jpeg_compression": 1.0}  # the reference is the same model
    attack = robustness["attack"]["datasets"]["fashion-mnist"]["fashion-mnist"]
    assert attack["pytorch"]["0"] == attack["clean"]
    report = (run_dir / "report.md").read_text()
    assert "## Robustness" in report and "rounded to uint8" in report
    assert "![robustness_mnist](robustness_mnist.png)" in report and (run_dir / "robustness_mnist.png").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--corruptions", "snow"], "--corruptions 'snow': not a corruption; use all, a family"),
        (["--corruptions", "noise", "--severities", "0-6"], "--severities '0-6': severities are whole numbers"),
        (["--corruptions", "blur", "--severities", "2-x"], "--severities '2-x'"),
        (["--attack", "pgd", "--eps", "1/0"], "--eps '1/0': give budgets on the 0..1 pixel scale"),
        (["--attack", "fgsm", "--eps", "2"], "--eps '2'"),
        (["--eps", "1/255"], "--eps: only with --attack fgsm|pgd"),
        (["--severities", "3"], "--severities: only with --corruptions"),
        (["--attack", "fgsm", "--pgd-steps", "5"], "--pgd-steps: FGSM takes one step"),
    ],
)
def test_eval_refuses_bad_robustness_options_before_reading_the_run(flags, message, tmp_path, capsys):
    from transferkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "no-such-run"), *flags])  # the option is checked before the run is read
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_refuses_a_reference_that_is_not_a_run_before_loading_data(tiny_run, tmp_path, capsys, monkeypatch):
    import transferkit.evaluation.matrix as matrix
    from transferkit.cli import main

    monkeypatch.setattr(matrix, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the refusal"))
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_run), "--corruptions", "all", "--reference", str(tmp_path / "gone")])
    assert "--reference: " in capsys.readouterr().err
