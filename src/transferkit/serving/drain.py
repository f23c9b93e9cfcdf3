"""A worker's drain after SIGTERM: turn traffic away politely before uvicorn stops accepting.

Why not uvicorn's own graceful shutdown alone: a BentoML worker accepts on a socket that the arbiter holds open
for all workers. Once uvicorn stops accepting, connections that keep arriving (a load balancer that has not yet
removed the pod, a client's next request) wait in that socket's backlog until the arbiter exits, and are reset.
So on SIGTERM a worker first drains:

    /readyz answers 503 at once (the service's __is_ready__), so probes take it out of rotation;
    requests already accepted run to the end;
    requests that arrive get 503 with `Connection: close` and Retry-After, so clients go elsewhere;
    the drain ends when nothing is in flight and nothing arrived for QUIET_S, or at the deadline
    (TRANSFERKIT_DRAIN_S after the signal); only then does uvicorn's own shutdown run.

uvicorn installs its SIGTERM handler before the service starts; the service then wraps it (install()), and the
drain calls it when it ends, so uvicorn's shutdown and its re-raised signal behave exactly as before.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("transferkit.serving")

QUIET_S = 0.5  # no request for this long (and none in flight): the clients have gone elsewhere
POLL_S = 0.05


class Drain:
    def __init__(self, window_s: float, quiet_s: float = QUIET_S) -> None:
        self.window_s = window_s
        self.quiet_s = quiet_s
        self.draining = False
        self.active = 0  # /predict requests accepted and not yet answered
        self.last_arrival = 0.0
        self.turned_away = 0

    @contextmanager
    def request(self) -> Iterator[None]:
        """Around every /predict: counts it in flight and notes when traffic last arrived."""
        self.active += 1
        self.last_arrival = time.monotonic()
        try:
            yield
        finally:
            self.active -= 1

    def turn_away(self) -> None:
        """A request that arrived while draining (answered 503): traffic has not stopped yet."""
        self.turned_away += 1
        self.last_arrival = time.monotonic()

    def install(self) -> bool:
        """Wrap the current SIGTERM handler (uvicorn's) with the drain. Only the main thread may set signal
        handlers, and the drain needs the server's event loop: elsewhere (a test's in-process app, the class
        called directly) nothing is installed and False is returned."""
        if threading.current_thread() is not threading.main_thread():
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(sig: int, frame: Any) -> None:
            if self.draining:  # a second SIGTERM: stop now
                _call(previous, sig, frame)
                return
            self.draining = True
            loop.call_soon_threadsafe(lambda: loop.create_task(self._finish(lambda: _call(previous, sig, frame))))

        signal.signal(signal.SIGTERM, on_sigterm)
        return True

    async def _finish(self, stop: Callable[[], None]) -> None:
        start = time.monotonic()
        self.last_arrival = max(self.last_arrival, start)
        logger.info("SIGTERM: draining (503 to new requests, %d in flight; at most %.1f s)", self.active, self.window_s)
        while True:
            now = time.monotonic()
            if now - start >= self.window_s:
                break
            if self.active == 0 and now - self.last_arrival >= self.quiet_s:
                break
            await asyncio.sleep(POLL_S)
        logger.info(
            "drained in %.1f s (%d requests turned away, %d still in flight); stopping",
            time.monotonic() - start,
            self.turned_away,
            self.active,
        )
        stop()


def _call(handler: Any, sig: int, frame: Any) -> None:
    if callable(handler):
        handler(sig, frame)
    elif handler == signal.SIG_DFL:  # no handler before ours: the default action, i.e. exit
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)
