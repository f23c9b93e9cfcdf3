"""MicroBatcher on its own (no server): merging, order, admission, errors, abandoned requests, idle latency."""

import asyncio
import time

import numpy as np
import pytest

from transferkit.serving.batcher import MicroBatcher, Overloaded


class Recorder:
    """A runtime stand-in that records batch sizes and answers each image with its own first pixel."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay, self.fail = delay, fail

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.sizes.append(len(batch))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("engine failure")
        return {"head": batch[:, 0, 0, :1].astype(np.float32)}


def pixels(*values: int) -> np.ndarray:
    return np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])


async def _submit_many(batcher: MicroBatcher, groups: list[tuple[int, ...]]) -> list[list[float]]:
    async def one(values):
        with batcher.admit(len(values)):
            out = await batcher.submit(pixels(*values))
        return out["head"][:, 0].tolist()

    return await asyncio.gather(*(one(g) for g in groups))


def test_concurrent_requests_share_batches_and_get_their_own_answers_in_order():
    run = Recorder(delay=0.02)
    batcher = MicroBatcher(run, max_batch=8, max_wait_ms=20, max_queue=64)
    groups = [(i,) for i in range(20)] + [(100, 101, 102)]
    answers = asyncio.run(_submit_many(batcher, groups))
    assert answers == [[float(v) for v in g] for g in groups]
    assert max(run.sizes) <= 8 and sum(run.sizes) == 23 and len(run.sizes) < 23


def test_a_lone_request_does_not_wait_for_company():
    batcher = MicroBatcher(Recorder(), max_batch=32, max_wait_ms=500, max_queue=8)
    start = time.perf_counter()
    asyncio.run(_submit_many(batcher, [(7,)]))
    assert time.perf_counter() - start < 0.25


def test_admission_refuses_past_the_queue_and_releases_after_the_answer():
    batcher = MicroBatcher(Recorder(), max_batch=4, max_queue=3)
    with batcher.admit(2) as admission:
        with pytest.raises(Overloaded) as refused:
            admission.add(2)
        assert refused.value.retry_after >= 1 and batcher.admitted == 2
        with batcher.admit(1):
            assert batcher.admitted == 3
    assert batcher.admitted == 0


def test_a_runtime_error_reaches_every_waiting_request_and_the_batcher_goes_on():
    run = Recorder(fail=True)
    batcher = MicroBatcher(run, max_batch=8, max_wait_ms=5, max_queue=16)

    async def scenario():
        results = await asyncio.gather(*(batcher.submit(pixels(i)) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        run.fail = False
        return await batcher.submit(pixels(9))

    assert asyncio.run(scenario())["head"][0, 0] == 9.0


def test_an_abandoned_request_is_not_run():
    run = Recorder(delay=0.2)
    batcher = MicroBatcher(run, max_batch=1, max_wait_ms=0, max_queue=16)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(pixels(1)))
        await asyncio.sleep(0.05)  # the first batch is running
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(pixels(2)), 0.05)  # gives up while queued
        third = await batcher.submit(pixels(3))
        await first
        return third

    assert asyncio.run(scenario())["head"][0, 0] == 3.0
    assert run.sizes == [1, 1]  # the abandoned image never reached the runtime


def test_the_same_batcher_serves_a_second_event_loop():
    batcher = MicroBatcher(Recorder(), max_batch=4, max_wait_ms=1, max_queue=8)
    assert asyncio.run(_submit_many(batcher, [(1,), (2,)])) == [[1.0], [2.0]]
    assert asyncio.run(_submit_many(batcher, [(3,)])) == [[3.0]]  # a new loop: new queue and drain task
