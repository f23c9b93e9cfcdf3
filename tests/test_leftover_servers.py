"""The session-end check (tests/conftest.py) finds server processes this session started, and only those."""

import os
import subprocess
import sys
import time

from tests.helpers import SESSION_ENV, server_processes


def _sleeper(*, env: dict) -> subprocess.Popen:
    """A process whose command line looks like `bentoml serve` (the words are an ignored argument)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "bentoml serve"], env=env)


def test_finds_this_sessions_servers_and_not_others():
    mark = {SESSION_ENV: os.environ[SESSION_ENV]}
    since = time.time() - 1
    ours = _sleeper(env=dict(os.environ))
    other = _sleeper(env={**os.environ, SESSION_ENV: "another-session", "BENTOML_HOME": "/elsewhere"})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the exec into python must have happened for the cmdline to match
            found = {p.pid for p in server_processes(since, mark)}
            if ours.pid in found:
                break
            time.sleep(0.05)
        assert ours.pid in found and other.pid not in found
        assert ours.pid in {p.pid for p in server_processes(since, {"BENTOML_HOME": os.environ["BENTOML_HOME"]})}
        assert not server_processes(time.time() + 60, mark)  # started before `since`
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait(timeout=10)
    assert ours.pid not in {p.pid for p in server_processes(since, mark)}
