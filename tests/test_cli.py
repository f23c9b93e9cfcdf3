"""End to end through the CLI, as a user runs it: train -> export (verified) -> a real `bentoml serve`
process on 127.0.0.1 -> real HTTP requests with real image files -> predict; plus the error contract."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from tests.helpers import run_cli
from transferkit.serving.processes import free_port


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("server not ready in time")


@pytest.mark.slow
def test_train_export_serve_predict(tiny_run, tmp_path):
    proc = run_cli("export", str(tiny_run), "--format", "onnx")
    assert "passed" in proc.stdout and proc.stdout.strip().splitlines()[-1].endswith("export")
    verify = json.loads((tiny_run / "export" / "verify.json").read_text())
    assert verify["formats"]["onnx"]["passed"] and set(verify["formats"]["onnx"]["heads"]) == {"mnist", "fashion-mnist"}
    manifest = json.loads((tiny_run / "export" / "manifest.json").read_text())
    assert manifest["formats"]["onnx"]["servable"] and manifest["bentoml"]["tag"]

    # a real test image from MNIST's test split, saved as a PNG file
    from transferkit.data import load_dataset
    from transferkit.preprocess import Preprocessing

    ds = load_dataset("mnist", Preprocessing(image_size=28), limit=5)
    png = tmp_path / "digit.png"
    Image.fromarray(ds.test.images[0][..., 0], mode="L").save(png)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png.read_bytes()[:40])

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "transferkit", "serve", str(tiny_run), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_ready(url, server)
        labels = json.loads((tiny_run / "labels.json").read_text())["heads"]
        r = httpx.post(f"{url}/predict", files={"image": ("digit.png", png.read_bytes(), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        heads = r.json()["heads"]
        assert set(heads) == set(labels)
        for head, preds in heads.items():
            assert len(preds) == 5
            assert {p["label"] for p in preds} <= set(labels[head])
            scores = [p["score"] for p in preds]
            assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001

        bad = httpx.post(f"{url}/predict", files={"image": ("corrupt.png", corrupt.read_bytes(), "image/png")})
        assert 400 <= bad.status_code < 500 and "corrupt" in bad.text.lower()
        assert httpx.get(f"{url}/livez").status_code == 200
        again = httpx.post(f"{url}/predict", files={"image": ("digit.png", png.read_bytes(), "image/png")}, timeout=60)
        assert again.status_code == 200 and again.json()["heads"] == heads  # still serving, same answer

        out = run_cli("predict", str(png), "--url", url)
        answer = json.loads(out.stdout)
        assert answer[0]["heads"] == heads
        failed = run_cli("predict", str(corrupt), "--url", url, check=False)
        assert failed.returncode == 2 and "corrupt" in failed.stderr.lower()
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_errors_are_one_line_and_nonzero(tmp_path):
    for args in (["eval", str(tmp_path)], ["export", str(tmp_path)], ["serve", str(tmp_path)]):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("transferkit: error:"), (args, proc.stderr)
        assert proc.stderr.count("\n") == 1
    for command in ("eval", "export", "serve", "benchmark", "build"):  # a missing run folder: said in one line
        proc = run_cli(command, str(tmp_path / "nosuchrun"), check=False)
        assert proc.returncode == 2 and proc.stderr == (
            f"transferkit: error: {tmp_path / 'nosuchrun'}: no such folder; pass the run folder `transferkit train` "
            "printed\n"
        ), (command, proc.stderr)
    proc = run_cli("predict", str(tmp_path / "missing.png"), check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = run_cli("train", "--data", "digits", "--no-such-option", check=False)
    assert proc.returncode == 2 and proc.stderr == (
        "transferkit: error: unrecognized arguments: --no-such-option (see `transferkit train --help`)\n"
    )


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    """A corrupt model.pt makes torch raise its own error (not a TransferkitError): still one line naming the
    exception type and exit status 2; --debug shows the full traceback."""
    from transferkit.config import TrainConfig
    from transferkit.preprocess import Preprocessing
    from transferkit.runs import Labels, save_run_metadata

    run = tmp_path / "run"
    run.mkdir()
    save_run_metadata(
        run,
        TrainConfig(data=["digits"], image_size=32),
        Preprocessing(image_size=32),
        Labels(heads={"digits": [str(i) for i in range(10)]}, datasets={"digits": "digits"}),
    )
    (run / "model.pt").write_bytes(b"this is not a state dict\n" * 20)
    proc = run_cli("eval", str(run), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert re.match(r"transferkit: error: [A-Za-z_.]+: .+ \(re-run with --debug for the traceback\)$", proc.stderr)
    debug = run_cli("--debug", "eval", str(run), check=False)  # `eval RUN --debug`: test_main_exit_statuses
    assert debug.returncode not in (0, 2) and "Traceback (most recent call last)" in debug.stderr
    assert "transferkit: error:" not in debug.stderr


def test_main_exit_statuses(monkeypatch, capsys):
    """In-process: a user-facing error, a bug and Ctrl-C, each with its exit status and one stderr line."""
    from transferkit import cli
    from transferkit.errors import ConfigError

    def raising(exc):
        def command(args):
            raise exc

        return command

    cases = [
        (ConfigError("bad --lr; pass a number"), 2, "transferkit: error: bad --lr; pass a number\n"),
        (KeyError("head"), 2, "transferkit: error: KeyError: 'head' (re-run with --debug for the traceback)\n"),
        (ValueError("a\n  b"), 2, "transferkit: error: ValueError: a b (re-run with --debug for the traceback)\n"),
        (KeyboardInterrupt(), 130, "transferkit: interrupted\n"),
    ]
    for exc, status, stderr in cases:
        monkeypatch.setattr(cli, "cmd_build", raising(exc))
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["build", "RUN"])
        assert exit_info.value.code == status and capsys.readouterr().err == stderr, exc
    monkeypatch.setattr(cli, "cmd_build", raising(KeyError("head")))
    with pytest.raises(KeyError):
        cli.main(["build", "RUN", "--debug"])


def test_help_lists_every_command():
    out = run_cli("--help").stdout
    for command in ("train", "eval", "export", "benchmark", "serve", "predict", "build"):
        assert command in out
    train_help = run_cli("train", "--help").stdout
    for flag in ("--sampling", "--freeze-epochs", "--layer-decay", "--ema", "--unlabeled", "--init", "--resume"):
        assert flag in train_help
    assert "--debug" in out


def test_every_train_option_has_help_text():
    """`train --help` text is each TrainConfig field's trailing comment: a field without one has empty help."""
    import dataclasses

    from transferkit.cli import _field_help
    from transferkit.config import TrainConfig

    helps = _field_help()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not helps.get(f.name)]
    assert not missing, f"TrainConfig fields without a comment (empty --help): {missing}"


def test_export_takes_device_and_verify_images(tiny_run, tmp_path):
    import shutil

    import torch

    if not torch.cuda.is_available():  # refused before any work, naming the flag
        proc = run_cli("export", str(tiny_run), "--device", "cuda", check=False)
        assert proc.returncode == 2 and "--device cuda: torch finds no CUDA device" in proc.stderr, proc.stderr
    proc = run_cli("export", str(tiny_run), "--verify-images", "0", check=False)
    assert proc.returncode == 2 and "--verify-images must be auto or >= 1" in proc.stderr, proc.stderr
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    run_cli("export", str(run), "--format", "onnx", "--verify-images", "24")
    verify = json.loads((run / "export" / "verify.json").read_text())
    assert verify["formats"]["onnx"]["passed"]
    assert {n for per_head in verify["images"].values() for n in per_head.values()} == {24}, verify["images"]


def test_export_of_a_run_whose_data_moved_says_how_and_takes_data(digits_folder, tmp_path):
    """A run trained on an image folder that is gone (another machine): export names the fix, and --data points
    verification at the folder's new place."""
    import shutil

    folder = tmp_path / "shots"
    shutil.copytree(digits_folder, folder)
    run = tmp_path / "run"
    run_cli(
        "train",
        "--data",
        f"imagefolder:{folder}",
        "--limit",
        "120",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "32",
        "--out",
        str(run),
    )
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    proc = run_cli("export", str(run), "--verify-images", "32", check=False)
    assert proc.returncode == 2 and "--data shots=imagefolder:PATH" in proc.stderr, proc.stderr
    run_cli("export", str(run), "--verify-images", "32", "--data", f"shots=imagefolder:{moved}")
    verify = json.loads((run / "export" / "verify.json").read_text())
    assert verify["formats"]["onnx"]["passed"]
    wrong = run_cli("export", str(run), "--data", f"nope=imagefolder:{moved}", check=False)
    assert wrong.returncode == 2 and "the run has no dataset 'nope'; its datasets: shots" in wrong.stderr


def test_no_help_string_types_a_default_and_every_help_shows_it():
    """A default is written once, where the option takes it: no help string in any command holds "(default:";
    --help appends it, read from the option (its argparse default, or the dataclass field it comes from)."""
    from transferkit.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them nowhere public
    typed = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, command in commands.items()
        for action in command._actions  # noqa: SLF001
        if "(default:" in (action.help or "")
    ]
    assert not typed, f"help strings that type their default: {typed}"
    serve, train = commands["serve"].format_help(), commands["train"].format_help()
    assert "port to listen on (default: 3000)" in " ".join(serve.split())
    epochs = " ".join(train.split("\n  --epochs EPOCHS", 1)[1].split("\n  --", 1)[0].split())
    assert epochs.endswith("(default: 3)"), epochs  # a TrainConfig field's default, shown from the dataclass
