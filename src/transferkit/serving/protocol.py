"""uvicorn's httptools protocol, with each response sent to the socket in one write.

uvicorn writes a response's status line and headers when the app sends `http.response.start`, and the body
when it sends `http.response.body`: two send() calls, two TCP segments, and two reads and wake-ups for the
client. For a small answer (a few hundred bytes of JSON) that doubles the per-request cost on both sides of a
loopback or a LAN: measured with `hey` at 64 clients on a 32 px model, one write per response took the server
from 2,436 to 2,723 req/s and cut the load generator's CPU per request from 161 to 126 us (docs/serving.md).

`CoalescingTransport` collects what the protocol writes during one turn of the event loop and sends it as one
buffer at the end of that turn (`loop.call_soon`): the head and body of a response sent back to back leave
together; a streamed body still leaves chunk by chunk, one turn at a time. BentoML builds its uvicorn config
with `http="auto"` and offers no setting for the protocol class, so `install()` points uvicorn's "auto" entry
at this class in the worker before uvicorn loads its config. Without httptools (or if something else already
replaced "auto") nothing changes, and /metrics says which parser runs (stack.py).

The same hook can put an ASGI middleware in front of everything BentoML wraps around its app (`front`): the
service uses it for POST /predict (http_app.PredictFastPath) when none of the middleware it would skip is
wanted, which saved another 11% of CPU per small request (3,002 -> 3,340 req/s in the run above).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

UVICORN_AUTO = "uvicorn.protocols.http.auto:AutoHTTPProtocol"
THIS_PROTOCOL = f"{__name__}:CoalescingHttpToolsProtocol"
ASGIWrapper = Callable[[Any], Any]
_FRONT: ASGIWrapper | None = None  # install(front=...): wraps the app uvicorn hands each connection


class CoalescingTransport:
    """A transport whose writes within one event-loop turn leave as a single send; everything else is the
    wrapped transport's."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()  # `Connection: close` answers are written, then the socket is closed
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@functools.cache
def _protocol_class() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        stack_name = "httptools+coalesced"  # what stack.py reports on /metrics

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if _FRONT is not None:
                self.app = _FRONT(self.app)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    return CoalescingHttpToolsProtocol


def __getattr__(name: str) -> Any:
    # uvicorn imports the class by name when it loads its config; built lazily so that importing this module
    # never needs httptools
    if name == "CoalescingHttpToolsProtocol":
        return _protocol_class()
    raise AttributeError(name)


def install(front: ASGIWrapper | None = None) -> bool:
    """Make uvicorn's `http="auto"` this protocol in this process; False (and no change) without httptools or
    when "auto" was already pointed elsewhere. `front` (an ASGI middleware class) is put around the whole app
    uvicorn serves, outside BentoML's own middleware."""
    global _FRONT
    try:
        import httptools  # noqa: F401
        from uvicorn import config
    except ImportError:
        return False
    if config.HTTP_PROTOCOLS.get("auto") not in (UVICORN_AUTO, THIS_PROTOCOL):
        return False
    config.HTTP_PROTOCOLS["auto"] = THIS_PROTOCOL
    _FRONT = front
    return True
