"""In-process micro-batching with admission control: concurrent requests share one runtime call.

    batcher = MicroBatcher(run_batch, max_batch=32, max_wait_ms=2, max_queue=256)
    with batcher.admit(n_images):          # raises Overloaded when the worker already holds max_queue images
        logits = await batcher.submit(pixels)   # uint8 (n,S,S,3) -> {head: float32 (n, classes)}

Why in-process: a batching step behind an internal HTTP hop (base64 pixels, a client connection per call)
costs more per image than the model itself on a CPU and fails under load when its connections are reset.
Here requests put their decoded pixels on an asyncio queue in the worker that received them; one task drains
the queue into batches of up to `max_batch` images and runs each batch in a dedicated thread, so the event
loop keeps accepting, parsing and decoding while the model runs. While one batch runs, the next one fills:
under load, batches grow by themselves. `max_wait_ms` is how long a batch waits for requests that were
admitted but are still being decoded; a request alone in its worker runs at once, so batching costs an
idle server no latency.

Back-pressure: `admit` counts images from the moment a request is accepted until it is answered (decoding,
queued or running). Past `max_queue` the request is refused at once (the caller answers 503 with Retry-After),
so a flood gets fast refusals instead of an ever-growing queue and timeouts for everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("transferkit.serving")

RunBatch = Callable[[np.ndarray], dict]  # a batch -> {key: array whose first axis is the batch}
Combine = Callable[[list[np.ndarray]], np.ndarray]  # the requests' arrays -> one batch


class Overloaded(Exception):
    """The worker holds max_queue images already; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Item:
    pixels: np.ndarray  # uint8 (n,S,S,3), or whatever else `combine` joins (n first)
    future: asyncio.Future = field(repr=False)


class WorkerBudget:
    """What a worker admits at once, shared by the batchers of every model it serves: images from the moment a
    request is accepted until it is answered, and bytes (bodies as they stream in, then decoded pixels). Past
    either limit a request is refused at once (Overloaded: 503 with Retry-After)."""

    def __init__(self, max_queue: int = 256, max_bytes: int = 0) -> None:
        self.max_queue = max_queue
        self.max_bytes = max_bytes  # bytes of bodies and decoded pixels requests may hold at once; 0: no bound
        self.admitted = 0  # images between admit and answer
        self.held_bytes = 0
        self._lock = threading.Lock()
        self._images_per_s = 0.0  # smoothed rate at which answered images leave the worker, for Retry-After
        self._last_done = 0.0

    @contextlib.contextmanager
    def admit(self, images: int = 1) -> Iterator[_Admission]:
        admission = _Admission(self)
        try:
            admission.add(images)
            yield admission
        finally:
            admission.release()

    def _take(self, images: int) -> None:
        with self._lock:
            if self.admitted + images > self.max_queue:
                raise Overloaded(
                    f"the server is at capacity ({self.admitted} images in progress, limit {self.max_queue} per "
                    "worker); retry shortly",
                    self.retry_after_s(),
                )
            self.admitted += images

    def _give(self, images: int) -> None:
        with self._lock:
            self.admitted -= images

    def _take_bytes(self, n: int) -> None:
        with self._lock:
            if self.max_bytes and self.held_bytes + n > self.max_bytes:
                raise Overloaded(
                    f"the server is at capacity ({self.held_bytes >> 20} MB of requests in progress, limit "
                    f"{self.max_bytes >> 20} MB per worker); retry shortly",
                    self.retry_after_s(),
                )
            self.held_bytes += n

    def _give_bytes(self, n: int) -> None:
        with self._lock:
            self.held_bytes -= n

    def retry_after_s(self) -> int:
        """Seconds until the current backlog should have drained (at least 1: Retry-After takes whole seconds)."""
        if self._images_per_s <= 0:
            return 1
        return max(1, min(30, math.ceil(self.admitted / self._images_per_s)))

    def observe(self, images: int) -> None:
        """A batch of `images` was answered: the worker's drain rate (decode, queue and model together)."""
        now = time.monotonic()
        interval, self._last_done = now - self._last_done, now
        if interval < 1.0:  # back-to-back batches
            rate = images / max(interval, 1e-3)
            self._images_per_s = rate if self._images_per_s == 0 else 0.9 * self._images_per_s + 0.1 * rate


def new_runtime_executor() -> ThreadPoolExecutor:
    """The one thread a worker's runtime calls run in."""
    return ThreadPoolExecutor(1, thread_name_prefix="transferkit-batch")


class MicroBatcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
        combine: Combine = np.concatenate,
        max_bytes: int = 0,
        budget: WorkerBudget | None = None,
        executor: ThreadPoolExecutor | None = None,
        on_the_way: Callable[[], int] | None = None,
    ) -> None:
        self.run_batch = run_batch
        # admission: the worker's, shared with the batchers of its other models; or this batcher's own
        self.budget = budget or WorkerBudget(max_queue, max_bytes)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch  # called with each batch's image count (metrics)
        # requests for this batcher accepted and not answered (decoding, queued or running), where the budget is
        # shared with other models' batchers; None: every image the budget admitted is on its way here
        self.on_the_way = on_the_way
        self.combine = combine  # requests may bring different kinds of input (service.py: pixels or tensors)
        self._queue: asyncio.Queue[_Item] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._carry: _Item | None = None  # an item that did not fit the previous batch
        self._task: asyncio.Task | None = None
        # One thread: runtime calls never overlap inside a worker (the runtime has its own intra-op threads, as
        # many as the worker's share of the cores). A worker serving several models gives every model's batcher
        # the same one (`executor`, which the worker owns): their calls take turns, while the next batch fills.
        self._owns_executor = executor is None
        self._executor = executor or new_runtime_executor()

    # ---- admission (the budget's) -------------------------------------------------------------------------
    def admit(self, images: int = 1) -> contextlib.AbstractContextManager[_Admission]:
        return self.budget.admit(images)

    @property
    def admitted(self) -> int:
        return self.budget.admitted

    @property
    def max_bytes(self) -> int:
        return self.budget.max_bytes

    @property
    def max_queue(self) -> int:
        return self.budget.max_queue

    def retry_after_s(self) -> int:
        return self.budget.retry_after_s()

    # ---- batching ----------------------------------------------------------------------------------------
    async def submit(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Queue n images (uint8 (n,S,S,3) pixels, or what `combine` accepts) for the next batch; -> the
        `run_batch` answer's rows for these n images, in order."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:  # first use, or the instance moved to a new loop
            self._loop, self._queue, self._carry = loop, asyncio.Queue(), None
            self._task = None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name="transferkit-batcher")
        future = loop.create_future()
        await self._queue.put(_Item(pixels, future))
        return await future

    async def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _gather(self) -> list[_Item]:
        """Block for the first live item, then take more until max_batch images or max_wait has passed."""
        loop = asyncio.get_running_loop()
        items: list[_Item] = []
        count = 0
        deadline = 0.0
        while count < self.max_batch:
            item = await self._next(None if not items else deadline - loop.time())
            if item is None:
                break
            if item.future.done():  # the request timed out or its client went away while it waited
                continue
            if items and count + len(item.pixels) > self.max_batch:
                self._carry = item
                break
            if not items:
                deadline = loop.time() + self.max_wait
            items.append(item)
            count += len(item.pixels)
            if self._queue.empty() and self._nothing_more_coming(items, count):
                break  # no other request is on its way to this batcher: waiting would only add latency
        return items

    def _nothing_more_coming(self, items: list[_Item], count: int) -> bool:
        if self.on_the_way is not None:
            return self.on_the_way() <= len(items)
        return self.admitted <= count

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            if not items:
                continue
            batch = items[0].pixels if len(items) == 1 else self.combine([i.pixels for i in items])
            try:
                logits = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error; the loop goes on
                logger.exception("runtime call failed for a batch of %d images", len(batch))
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._observe(len(batch))
            start = 0
            for item in items:
                n = len(item.pixels)
                if not item.future.done():
                    item.future.set_result({h: v[start : start + n] for h, v in logits.items()})
                start += n

    def _observe(self, images: int) -> None:
        if self.on_batch is not None:
            self.on_batch(images)
        self.budget.observe(images)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)


class _Admission:
    """What one request holds in a worker: images (known once it is parsed), and bytes: its body as it streams in,
    then its images' decoded pixels, so a few small requests that would cost much memory wait their turn too."""

    def __init__(self, budget: WorkerBudget) -> None:
        self.budget = budget
        self.images = 0
        self.bytes = 0

    def add(self, images: int) -> None:
        self.budget._take(images)
        self.images += images

    def add_bytes(self, n: int) -> None:
        self.budget._take_bytes(n)
        self.bytes += n

    def release(self) -> None:
        if self.images:
            self.budget._give(self.images)
            self.images = 0
        if self.bytes:
            self.budget._give_bytes(self.bytes)
            self.bytes = 0
