"""Exported files are checked against manifest.json (size, then sha256) before serving loads them."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from pathlib import Path

import pytest

from transferkit.errors import ArtifactMismatchError, TransferkitError
from transferkit.manifest import Manifest, read_manifest


@pytest.fixture
def export_copy(exported, tmp_path) -> tuple[Path, Manifest]:
    """A private copy of the shared export dir and its manifest (the shared one is never modified)."""
    run_dir, _ = exported
    target = shutil.copytree(Path(run_dir) / "export", tmp_path / "export")
    return target, read_manifest(target)


def test_untouched_export_verifies(export_copy):
    export_dir, manifest = export_copy
    assert "model.onnx" in manifest.files
    manifest.check_files(export_dir)
    manifest.check_files(export_dir, names=["model.onnx"])


def test_the_stored_bentoml_model_verifies(exported):
    """The BentoML model holds only the servable files, so those are the ones to check there."""
    import bentoml

    _, result = exported
    assert result.bentoml_tag
    model_dir = Path(bentoml.models.get(result.bentoml_tag).path)
    manifest = read_manifest(model_dir)
    names = [name for f in manifest.servable() for name in manifest.artifacts[f].all_files]
    assert names == ["model.onnx", "reference-onnx.npz"] and list(manifest.files) == names  # exactly what is stored
    manifest.check_files(model_dir, names=names)


def test_a_flipped_byte_names_the_file_both_hashes_and_the_fix(export_copy):
    export_dir, manifest = export_copy
    path = export_dir / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatchError) as info:
        manifest.check_files(export_dir)
    message = str(info.value)
    assert str(path) in message
    assert manifest.files["model.onnx"].sha256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert f"transferkit export {manifest.run_dir}" in message
    assert isinstance(info.value, TransferkitError)  # the CLI prints it as a one-line error


def test_a_truncated_file_is_a_size_mismatch(export_copy):
    export_dir, manifest = export_copy
    path = export_dir / "model.onnx"
    data = path.read_bytes()[:1000]
    path.write_bytes(data)
    with pytest.raises(ArtifactMismatchError, match="size mismatch") as info:
        manifest.check_files(export_dir)
    message = str(info.value)
    assert "model.onnx" in message and "actual 1000" in message
    assert manifest.files["model.onnx"].sha256 in message and hashlib.sha256(data).hexdigest() in message
    assert "transferkit export" in message


def test_a_missing_file_is_an_error(export_copy):
    export_dir, manifest = export_copy
    (export_dir / "model.onnx").unlink()
    with pytest.raises(ArtifactMismatchError, match="missing") as info:
        manifest.check_files(export_dir)
    assert "model.onnx" in str(info.value) and "transferkit export" in str(info.value)


def test_only_listed_files_and_requested_names_are_checked(export_copy):
    export_dir, manifest = export_copy
    (export_dir / "model.onnx").write_bytes(b"replaced")
    manifest.check_files(export_dir, names=[])  # nothing requested
    older = dataclasses.replace(manifest, files={})
    older.check_files(export_dir)  # every listed file (none) checks out
    with pytest.raises(ArtifactMismatchError, match="lists no sha256"):  # requested but without a hash: no load
        manifest.check_files(export_dir, names=["model.trt"])
    with pytest.raises(ArtifactMismatchError):
        manifest.check_files(export_dir, names=["model.onnx"])


def test_the_fix_falls_back_to_the_export_dirs_run(export_copy):
    export_dir, manifest = export_copy
    manifest = dataclasses.replace(manifest, run_dir="")
    (export_dir / "model.onnx").unlink()
    with pytest.raises(ArtifactMismatchError, match=re.escape(f"transferkit export {export_dir.parent}")):
        manifest.check_files(export_dir)


def test_the_runtime_runs_the_bytes_that_were_checked_not_a_file_swapped_after_the_check(export_copy):
    """read_verified reads each file once and checks it; ONNX Runtime then loads those bytes, so replacing the
    file between the check and the load changes nothing, where loading by path would run the replacement."""
    import numpy as np

    from transferkit.errors import ArtifactMismatchError
    from transferkit.runtimes.runtime import OnnxRuntime

    export_dir, manifest = export_copy
    verified = manifest.read_verified(export_dir, ["model.onnx"])
    (export_dir / "model.onnx").write_bytes(b"swapped after the check")
    runtime = OnnxRuntime().load(export_dir, manifest, verified)
    batch = np.zeros((2, 3, manifest.image_size, manifest.image_size), np.float32)
    assert all(v.shape[0] == 2 for v in runtime.run(batch).values())
    with pytest.raises(ArtifactMismatchError, match="model.onnx: size mismatch"):
        manifest.read_verified(export_dir, ["model.onnx"])
