"""Which HTTP stack this worker actually runs: the event loop and uvicorn's HTTP parser, read from the running
process rather than assumed from what is installed.

At small inputs the HTTP path, not the model, bounds the requests per second: uvicorn on the pure-Python h11
parser and the stock asyncio loop serves markedly fewer than on httptools and uvloop, which it picks only when
they are importable (`loop="auto"`, `http="auto"`, BentoML's settings). The worker logs what it found and
exports it on /metrics as `transferkit_http_stack{loop=...,parser=...} 1`, so a deployment that lost the fast
stack (a trimmed image, a changed dependency) shows it.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any


def http_stack() -> dict[str, str]:
    """{"loop": "uvloop" | "asyncio" | ..., "parser": "httptools" | "h11" | ...}; "none"/"unknown" outside a
    server (the class called directly)."""
    try:
        loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:
        loop_name = "none"
    parser = "unknown"
    server = _uvicorn_server()
    if server is not None:
        protocol = getattr(server.config, "http_protocol_class", None)
        if protocol is not None:
            parser = _parser_name(protocol)
    return {"loop": loop_name, "parser": parser}


def _uvicorn_server() -> Any:
    """The uvicorn.Server of this process: uvicorn installs its bound `handle_exit` as the SIGTERM handler."""
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return server if hasattr(server, "config") and type(server).__module__.startswith("uvicorn") else None


def _parser_name(protocol: type) -> str:
    if hasattr(protocol, "stack_name"):  # ours (protocol.py): httptools, one write per answer
        return protocol.stack_name
    module = protocol.__module__.rsplit(".", 1)[-1]  # uvicorn.protocols.http.httptools_impl -> httptools_impl
    return module.removesuffix("_impl")
