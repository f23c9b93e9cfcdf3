"""`transferkit score --engine ray`: the same rows as the local engine from a real Ray (a local one, and a
two-node cluster on 127.0.0.1), and a node killed mid-run: the job finishes or fails loudly, and the output is
never half written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers import run_cli
from transferkit.errors import ConfigError
from transferkit.scoring.job import score

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

# Ray turns 127.0.0.1 into the machine's outward address unless told this is a single-machine cluster; the
# cluster's nodes and every driver of these tests stay on loopback.
RAY_ENV = {
    **os.environ,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "60",
}
CLUSTER = """
import sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                         "include_dashboard": False})
second = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
print(cluster.address, flush=True)
for line in sys.stdin:  # "kill": the second node's processes get SIGKILL, as when its machine dies
    if line.strip() == "kill":
        cluster.remove_node(second, allow_graceful=False)
        print("killed", flush=True)
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Real pictures (scikit-learn's digits and photos) and the bad files a catalogue really has."""
    from sklearn.datasets import load_digits, load_sample_images

    root = tmp_path_factory.mktemp("ray-images")
    digits = load_digits()
    for i in range(40):
        (root / str(digits.target[i])).mkdir(exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(
            root / str(digits.target[i]) / f"{i:03d}.png"
        )
    Image.fromarray(load_sample_images().images[0]).save(root / "3" / "china.jpg", quality=90)
    (root / "5" / "notes.jpg").write_text("not a picture")
    return root


def _same_rows(ray_out: Path, local_out: Path) -> None:
    got = pq.read_table(ray_out)
    assert got.column("input_index").to_pylist() == list(range(got.num_rows))  # the folder reads in input order
    assert got.drop_columns(["input_index"]).equals(pq.read_table(local_out))


@pytest.fixture
def restored_environ():
    """ray.init sets variables of its own in os.environ (RAY_AUTH_MODE=token, ...); the processes later tests
    start must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_local_ray_gives_the_local_engines_rows(exported, images, tmp_path, restored_environ):
    run_dir = exported[0]
    local = score(run_dir, [f"imagefolder:{images}"], tmp_path / "local.parquet", top_k=3, batch_size=8)
    try:
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        got = score(
            run_dir, [f"imagefolder:{images}"], tmp_path / "ray.parquet", top_k=3, batch_size=8, engine="ray", workers=2
        )
        assert ray.is_initialized()  # a Ray the caller started is left to the caller
    finally:
        ray.shutdown()
    _same_rows(tmp_path / "ray.parquet", tmp_path / "local.parquet")
    assert got.images == local.images == 42 and dict(got.errors) == {"not an image": 1}
    assert got.correct == local.correct and got.labelled["digits"] == 41
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.parquet", "ray.parquet"]  # no staging left


def test_ray_refuses_what_it_cannot_write(exported, images, tmp_path):
    with pytest.raises(ConfigError, match="folder of Parquet files"):
        score(exported[0], [str(images)], tmp_path / "p.csv", engine="ray")
    with pytest.raises(ConfigError, match="give out="):
        score(exported[0], [str(images)], engine="ray")
    with pytest.raises(ConfigError, match="no Ray cluster answers there"):
        score(exported[0], [str(images)], tmp_path / "p.parquet", engine="ray", ray_address=f"127.0.0.1:{_free_port()}")
    assert not list(tmp_path.iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    """A real two-node Ray cluster on 127.0.0.1 (a head and a second node, one CPU each, separate raylets and
    object stores), run by a helper process that kills the second node when told to."""
    helper = subprocess.Popen(
        [sys.executable, "-c", CLUSTER], env=RAY_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        address = helper.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address

        def kill_second_node() -> None:
            helper.stdin.write("kill\n")
            helper.stdin.flush()
            assert helper.stdout.readline().strip() == "killed"

        yield address, kill_second_node
    finally:
        helper.stdin.close()
        helper.wait(timeout=120)


def test_a_two_node_cluster_gives_the_local_engines_rows(exported, images, cluster, tmp_path):
    address, _ = cluster
    args = ["score", str(exported[0]), "--input", str(images), "--top-k", "2", "--batch-size", "8"]
    run_cli(*args, "--out", str(tmp_path / "local.parquet"))
    done = run_cli(
        *args,
        "--out",
        str(tmp_path / "ray.parquet"),
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--workers",
        "2",
        env=RAY_ENV,
    )
    assert "scored 42 images" in done.stdout
    _same_rows(tmp_path / "ray.parquet", tmp_path / "local.parquet")


def test_a_node_killed_mid_run_never_leaves_half_an_output(exported, images, cluster, tmp_path):
    """Thousands of rows over both nodes; the second node's processes are killed (SIGKILL) once rows are being
    written. Ray Data retries the lost tasks on the head: the job ends with the whole output, or with an error
    and no output at all."""
    address, kill_second_node = cluster
    files = sorted(str(p) for p in images.rglob("*") if p.is_file())
    (tmp_path / "list.txt").write_text("\n".join(files * 80) + "\n")  # 3,360 rows
    args = ["score", str(exported[0]), "--input", str(tmp_path / "list.txt"), "--batch-size", "16", "--top-k", "2"]
    run_cli(*args, "--out", str(tmp_path / "local.parquet"))
    out = tmp_path / "ray.parquet"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "transferkit",
            *args,
            "--out",
            str(out),
            "--engine",
            "ray",
            "--ray-address",
            address,
            "--workers",
            "2",
        ],
        env=RAY_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob("ray.parquet.staging-*/rows/*.parquet")) and time.monotonic() < deadline:
        assert job.poll() is None, job.communicate()
        time.sleep(0.05)
    assert job.poll() is None, "the job must still be running when the node dies"
    kill_second_node()
    stdout, stderr = job.communicate(timeout=400)
    if job.returncode == 0:
        assert "scored 3,360 images" in stdout
        _same_rows(out, tmp_path / "local.parquet")
    else:
        assert job.returncode == 2 and "the Ray job failed" in stderr and "is unchanged" in stderr
        assert not out.exists()
    assert not list(tmp_path.glob("ray.parquet.staging-*"))  # the job's own staging is gone either way
