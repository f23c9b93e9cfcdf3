"""The one timing helper (transferkit.machine): medians of timed calls after untimed warm-up rounds, several calls
timed round-robin. A clock that each call moves on by a known amount makes the figures exact."""

import pytest

from transferkit import machine


class _Clock:
    """perf_counter for machine.py: it moves only when a call says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0
        self.order: list[str] = []  # which call ran, in the order they ran

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, durations: list[float]):
        spent = iter(durations)

        def run() -> None:
            self.order.append(name)
            self.now += next(spent)

        return run


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(machine.time, "perf_counter", fake)
    return fake


def test_calls_are_timed_round_robin_and_warm_up_rounds_are_left_out(clock):
    # the warm-up round's 9 s would move either median if it were counted
    a = clock.call("a", [9.0, 3.0, 1.0, 2.0])
    b = clock.call("b", [9.0, 10.0, 30.0, 20.0])
    assert machine.interleaved_medians([a, b], repeats=3, warmup=1) == [2.0, 20.0]
    assert clock.order == ["a", "b"] * 4  # one call of each per round: a busy spell slows both alike


def test_median_seconds_is_the_one_call_case(clock):
    call = clock.call("a", [5.0, 5.0, 3.0, 1.0, 2.0])
    assert machine.median_seconds(call, repeats=3) == 2.0  # two warm-up calls by default
    assert clock.order == ["a"] * 5
