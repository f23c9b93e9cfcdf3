"""The worker's drain (serving/drain.py): the wrapped handler (uvicorn's, in a worker) runs only once nothing is
in flight and traffic has stopped, or at the deadline.

SIGTERM is delivered here by calling the installed handler, as the interpreter does when the signal arrives:
a real signal to the test process itself (which holds ONNX Runtime, OpenVINO and torch threads by then) is left
to tests/serving/test_lifecycle.py, which sends it to a real server under load."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from transferkit.serving.drain import Drain


def sigterm() -> None:
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)


@pytest.fixture
def sigterm_recorder():
    calls: list[float] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: calls.append(time.monotonic()))
    yield calls
    signal.signal(signal.SIGTERM, previous)


def test_the_drain_waits_for_the_request_in_flight_and_for_quiet(sigterm_recorder):
    drain = Drain(window_s=10.0, quiet_s=0.3)

    async def scenario() -> tuple[float, float]:
        assert drain.install()
        with drain.request():
            start = time.monotonic()
            sigterm()
            await asyncio.sleep(0.05)
            assert drain.draining and not sigterm_recorder  # uvicorn's handler has not run yet
            await asyncio.sleep(0.5)  # the request still runs: no stop however quiet it is
            assert not sigterm_recorder
            drain.turn_away()  # a request that arrives now is answered 503, and restarts the quiet period
        finished = time.monotonic()
        for _ in range(100):
            if sigterm_recorder:
                break
            await asyncio.sleep(0.05)
        return start, finished

    start, finished = asyncio.run(scenario())
    assert len(sigterm_recorder) == 1 and drain.turned_away == 1
    assert sigterm_recorder[0] - finished >= 0.3 - 0.06  # the quiet period after the last arrival
    assert sigterm_recorder[0] - start < 3.0


def test_the_deadline_ends_a_drain_that_never_goes_quiet(sigterm_recorder):
    drain = Drain(window_s=0.6, quiet_s=5.0)

    async def scenario() -> float:
        drain.install()
        start = time.monotonic()
        sigterm()
        with drain.request():  # a request that outlasts the drain: uvicorn's own bound handles it
            while not sigterm_recorder and time.monotonic() - start < 5:
                await asyncio.sleep(0.05)
        return start

    start = asyncio.run(scenario())
    assert sigterm_recorder and 0.6 - 0.06 <= sigterm_recorder[0] - start < 2.0


def test_a_second_sigterm_stops_at_once(sigterm_recorder):
    drain = Drain(window_s=30.0)

    async def scenario() -> None:
        drain.install()
        with drain.request():
            sigterm()
            await asyncio.sleep(0.05)
            assert not sigterm_recorder
            sigterm()
            await asyncio.sleep(0.05)
            assert len(sigterm_recorder) == 1

    asyncio.run(scenario())


def test_install_outside_the_main_thread_changes_nothing():
    import threading

    result: list[bool] = []
    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=lambda: result.append(asyncio.run(_install(Drain(1.0)))))
    thread.start()
    thread.join()
    assert result == [False] and signal.getsignal(signal.SIGTERM) is before


async def _install(drain: Drain) -> bool:
    return drain.install()
