"""A real server under hostile clients (tests/serving/hostile.py): each attack gets the answer that refuses it
(or, where it is a valid request, a 200), never a 5xx; a normal client sending real images meanwhile is
answered 200 every time; no worker restarts; the server's memory stays within what the Kubernetes manifests
give the pod. How much each attack slows the normal client is measured by benchmarks/attacks.py
(docs/security.md), not asserted here.
"""

from __future__ import annotations

import pytest

from tests.serving import hostile
from transferkit.serving import start_server
from transferkit.serving.k8s import K8sOptions

WORKERS = 2
# what each attack may be answered: 503 where the worker's byte budget is taken by the other attackers
EXPECTED = {
    "WebP 2048x2048, one colour (at a 32 px model's limit)": {200, 503},
    "WebP 8000x8000, one colour": {413},
    "PNG 8000x8000, one bit": {413},
    "32 WebPs of 2000x2000 in one request": {413},
    "JSON nested 100,000 levels": {400},
    "v2 infer listing one output 200,000 times": {400},
    "gzip bomb to v2 infer (64 MB of zeros)": {413},
    "400 headers of 200 bytes": {431},
    "slowloris (a byte a second)": {408, 0},
}


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attacked")
    with start_server(exported[0], port=None, log_path=folder / "serve.log", workers=WORKERS) as handle:
        yield handle


@pytest.fixture(scope="module")
def payloads():
    return hostile.attacks(hostile.Payloads())


@pytest.mark.slow
def test_every_attack_is_refused_cheaply_while_a_normal_client_is_served(server, payloads):
    assert set(payloads) == set(EXPECTED)
    model = server.tag.split(":")[0]
    with hostile.ServerWatch(server.process.pid) as watch:
        workers_before = {p.pid for p in watch.tree()}
        for name, (attack, _) in payloads.items():
            with hostile.NormalClient(server.url) as normal, hostile.Attackers(attack, server.url, model, 4, 2.0) as a:
                pass
            seen = set(a.statuses)
            assert seen and seen <= EXPECTED[name], (name, a.statuses, a.errors, server.log_tail()[-2000:])
            assert set(normal.statuses) == {200}, (name, normal.statuses)
        workers_after = {p.pid for p in watch.tree()}
    assert workers_after == workers_before, "a worker was restarted"
    pod_limit = int(K8sOptions().memory_for("onnxruntime").removesuffix("Mi")) << 20
    assert watch.peak_rss < pod_limit, (watch.peak_rss >> 20, pod_limit >> 20)
    assert "Traceback" not in server.log_tail()
