"""`transferkit score`: real images (scikit-learn's photos and digits) through the tiny run's verified ONNX
artifact, bad files as error rows, the three output formats, resume after kill -9, refused bad input."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.export.tiny import DIGITS, FASHION
from tests.helpers import run_cli
from transferkit.errors import ConfigError, TransferkitError
from transferkit.scoring.job import score
from transferkit.scoring.output import PartWriter, schema


def _save(image: Image.Image, path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of real pictures in sub-folders, with the files users really have beside them."""
    from sklearn.datasets import load_digits, load_sample_images

    root = tmp_path_factory.mktemp("photos")
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    _save(china, root / "b" / "china.jpg", "JPEG")
    _save(flower, root / "a" / "flower.webp", "WEBP")
    digits = load_digits()
    for i in range(3):
        _save(Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L"), root / f"digit{i}.png", "PNG")
    (root / "notes.jpg").write_text("not a picture")  # a text file named like a photo
    buf = io.BytesIO()
    china.save(buf, format="JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buf.getvalue()[:2000])
    _save(flower, root / "gif-named.png", "GIF")  # a real image in a format the server refuses
    (root / "readme.txt").write_text("skipped: not an image suffix")
    (root / ".hidden").mkdir()
    _save(china, root / ".hidden" / "skipped.jpg", "JPEG")
    return root


def test_a_folder_scores_in_order_with_an_error_row_per_bad_file(exported, photos, tmp_path):
    run_dir = exported[0]
    out = tmp_path / "preds.parquet"
    summary = score(run_dir, [str(photos)], out, top_k=3)
    table = pq.read_table(out).to_pylist()
    names = [Path(r["path"]).relative_to(photos).as_posix() for r in table]
    # a folder's own files first, then its sub-folders, each sorted
    assert names == [
        "digit0.png",
        "digit1.png",
        "digit2.png",
        "gif-named.png",
        "notes.jpg",
        "a/flower.webp",
        "b/china.jpg",
        "b/truncated.jpg",
    ]
    kinds = {n: r["error_kind"] for n, r in zip(names, table)}
    assert kinds == {
        "a/flower.webp": None,
        "b/china.jpg": None,
        "b/truncated.jpg": "corrupt",
        "digit0.png": None,
        "digit1.png": None,
        "digit2.png": None,
        "gif-named.png": "format",
        "notes.jpg": "not an image",
    }
    for row in table:
        if row["error_kind"]:
            assert row["error"].startswith(row["path"]) and row["digits_labels"] is None
            continue
        assert len(row["digits_labels"]) == 3 and set(row["digits_labels"]) <= set(DIGITS)
        assert set(row["fashion-mnist_labels"]) <= set(FASHION)
        assert row["digits_scores"] == sorted(row["digits_scores"], reverse=True) and 0 < sum(row["digits_scores"]) <= 1
    assert summary.images == 8 and dict(summary.errors) == {"corrupt": 1, "format": 1, "not an image": 1}
    assert not out.with_name(out.name + ".parts").exists()  # the parts are gone once the file is whole


def test_csv_and_jsonl_hold_the_same_rows_as_parquet(exported, photos, tmp_path):
    run_dir = exported[0]
    score(run_dir, [str(photos)], tmp_path / "p.parquet", top_k=2)
    score(run_dir, [str(photos)], tmp_path / "p.jsonl", top_k=2)
    score(run_dir, [str(photos)], tmp_path / "p.csv", top_k=2)
    expected = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == expected
    import csv

    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    assert [json.loads(r["digits_labels"]) if r["digits_labels"] else None for r in rows] == [
        r["digits_labels"] for r in expected
    ]
    assert [r["error_kind"] or None for r in rows] == [r["error_kind"] for r in expected]


def test_list_files_and_the_python_iterator(exported, photos, tmp_path):
    run_dir = exported[0]
    (tmp_path / "list.txt").write_text(f"{photos / 'b' / 'china.jpg'}\n# a comment\n\n../missing.png\n")
    with open(tmp_path / "list.csv", "w") as f:
        f.write(f"path,label\n{photos / 'digit0.png'},0\n")
    rows = list(score(run_dir, [str(tmp_path / "list.txt"), str(tmp_path / "list.csv")], top_k=1))
    assert [Path(r["path"]).name for r in rows] == ["china.jpg", "missing.png", "digit0.png"]
    assert [r["error_kind"] for r in rows] == [None, "missing", None]
    assert rows[1]["path"] == str(tmp_path / "../missing.png")  # relative to the list file's folder


def test_imagefolder_inputs_report_accuracy(exported, tmp_path):
    from sklearn.datasets import load_digits

    run_dir = exported[0]
    digits = load_digits()
    for i in range(40):
        _save(
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L"),
            tmp_path / "folder" / str(digits.target[i]) / f"{i}.png",
            "PNG",
        )
    summary = score(run_dir, [f"imagefolder:{tmp_path / 'folder'}"], tmp_path / "p.parquet")
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["digits_true"] for r in rows] == [Path(r["path"]).parent.name for r in rows]
    assert all(r["fashion-mnist_true"] is None for r in rows)  # the class names are digits only
    correct = sum(r["digits_labels"][0] == r["digits_true"] for r in rows)
    assert summary.labelled["digits"] == 40 and summary.correct["digits"] == correct
    assert "accuracy digits" in summary.describe()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch/folder", "no such file or folder"),
        ("imagefolder:{photos}", "no head of this model has all of its classes"),
        ("{photos}/readme.txt", None),  # a .txt list: its lines are paths (here, one missing file)
    ],
)
def test_bad_inputs_are_refused_before_scoring(exported, photos, tmp_path, spec, message):
    spec = spec.format(photos=photos)
    if message is None:
        rows = list(score(exported[0], [spec]))
        assert [r["error_kind"] for r in rows] == ["missing"]
        return
    with pytest.raises(ConfigError, match=message):
        score(exported[0], [spec], tmp_path / "p.parquet")
    assert not (tmp_path / "p.parquet.parts").exists()


def test_bad_options_are_refused(exported, photos, tmp_path):
    with pytest.raises(ConfigError, match="the suffix picks the format"):
        score(exported[0], [str(photos)], tmp_path / "p.xlsx")
    with pytest.raises(ConfigError, match="--top-k must be 1..100"):
        score(exported[0], [str(photos)], tmp_path / "p.csv", top_k=0)
    bad = tmp_path / "no-path.csv"
    bad.write_text("file\nx.jpg\n")
    with pytest.raises(ConfigError, match="no `path` column"):
        score(exported[0], [str(bad)], tmp_path / "p.csv")
    with pytest.raises(TransferkitError, match="does not exist"):
        score(tmp_path / "nosuchrun", [str(photos)], tmp_path / "p.csv")


def test_parts_of_another_job_are_never_mixed_in(tmp_path):
    table_schema = schema(["digits"], with_truth=False)
    row = {"path": "a.png", "digits_labels": ["1"], "digits_scores": [0.9], "error": None, "error_kind": None}
    PartWriter(tmp_path / "p.parquet", table_schema, {"top_k": 5}).commit([row])
    assert PartWriter(tmp_path / "p.parquet", table_schema, {"top_k": 5}).rows_done == 1  # the same job resumes
    with pytest.raises(ConfigError, match="unfinished job with other top_k"):
        PartWriter(tmp_path / "p.parquet", table_schema, {"top_k": 3})


def test_kill_9_then_the_same_command_resumes_to_the_same_file(exported, photos, tmp_path):
    """Thousands of rows in small parts; SIGKILL once a few parts are committed; the rerun's output equals an
    uninterrupted run's row for row (nothing missing, nothing twice)."""
    files = sorted(
        str(p) for p in photos.rglob("*") if p.suffix in (".png", ".jpg", ".webp") and ".hidden" not in p.parts
    )
    (tmp_path / "list.txt").write_text("\n".join(files * 600) + "\n")  # 4,800 rows
    args = [
        "score",
        str(exported[0]),
        "--input",
        str(tmp_path / "list.txt"),
        "--batch-size",
        "16",
        "--part-rows",
        "64",
        "--top-k",
        "2",
    ]
    whole = tmp_path / "whole.parquet"
    run_cli(*args, "--out", str(whole))
    out = tmp_path / "resumed.parquet"
    parts = out.with_name(out.name + ".parts")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferkit", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _no_process_left(str(out))  # the decode processes die with the job
    committed = len(list(parts.glob("part-*.parquet")))
    assert not out.exists() and 5 <= committed < 75, "the kill must land mid-run"
    done = run_cli(*args, "--out", str(out))
    assert f"{committed * 64:,} resumed" in done.stdout
    assert pq.read_table(out).equals(pq.read_table(whole))
    assert pq.read_table(out).num_rows == 4800 and not parts.exists()


def test_inference_streams_follow_the_cores_and_the_threads_asked_for(exported):
    from transferkit.machine import cpu_count
    from transferkit.scoring.engine import Scorer

    assert Scorer(exported[0], streams=None).streams == cpu_count()  # one single-threaded runtime per core
    one = Scorer(exported[0], threads=1, streams=None)
    assert one.streams == 1 and one.runtime.threads == 1  # never more threads than asked for


def _no_process_left(marker: str) -> None:
    """No process whose command line names `marker` outlives a few seconds (forked children keep it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        if not found:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes left behind: {found}")


def test_a_pipe_or_a_device_in_a_list_is_an_error_row_not_a_hang(exported, photos, tmp_path):
    """A FIFO with no writer would block a plain open() for ever, /dev/zero would fill memory: both are refused
    on the opened descriptor and the job goes on."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "list.txt").write_text(f"{fifo}\n/dev/zero\n{photos / 'digit0.png'}\n")
    rows = list(score(exported[0], [str(tmp_path / "list.txt")], top_k=1))
    assert [r["error_kind"] for r in rows] == ["unreadable", "unreadable", None]
    assert "not a regular file" in rows[0]["error"] and "not a regular file" in rows[1]["error"]


def test_csv_cells_that_would_run_as_spreadsheet_formulas_are_neutralised(exported, photos, tmp_path, monkeypatch):
    """A file named `=HYPERLINK(...).png`, scored by its relative name, must not become a formula in the CSV a
    spreadsheet opens."""
    import csv
    import shutil

    from transferkit.utils import csv_cell

    assert csv_cell("=1+1") == "'=1+1" and csv_cell("@SUM(A1)") == "'@SUM(A1)" and csv_cell("-2") == "'-2"
    assert csv_cell("photo.png") == "photo.png" and csv_cell(-0.5) == -0.5
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "digit0.png", folder / "=HYPERLINK(1).png")
    monkeypatch.chdir(folder)
    score(exported[0], ["*.png"], tmp_path / "p.csv", top_k=1)  # a glob in the folder: relative names
    with open(tmp_path / "p.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["path"] == "'=HYPERLINK(1).png" and row["error"] == ""


def test_a_resumed_job_whose_inputs_changed_since_is_refused_not_shifted(exported, photos, tmp_path, monkeypatch):
    """Rows are resumed by position: a folder that lost a file in between would put every later answer on the
    wrong file. The last committed row's path is checked against the input at its position."""
    import shutil

    from transferkit.scoring import output

    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(["digit0.png", "digit1.png", "digit2.png"] * 2):
        shutil.copy(photos / name, folder / f"{i}.png")
    out = tmp_path / "p.parquet"

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(output.PartWriter, "finish", interrupted)  # stops after every part is committed
    with pytest.raises(KeyboardInterrupt):
        score(exported[0], [str(folder)], out, top_k=1, batch_size=2, part_rows=2)
    monkeypatch.undo()
    (folder / "0.png").unlink()
    with pytest.raises(ConfigError, match=r"the inputs changed since the interrupted run: its row 6 was .*5\.png"):
        score(exported[0], [str(folder)], out, top_k=1, batch_size=2, part_rows=2)
    shutil.copy(photos / "digit0.png", folder / "0.png")  # as it was: the same command resumes
    summary = score(exported[0], [str(folder)], out, top_k=1, batch_size=2, part_rows=2)
    assert summary.resumed == 6 and pq.read_table(out).num_rows == 6
