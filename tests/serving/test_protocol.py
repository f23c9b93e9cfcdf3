"""protocol.py: what uvicorn writes during one event-loop turn leaves in one send, and nothing is lost on close.

Real sockets (a connected pair) and a real asyncio transport; the write count is read from the transport the
wrapper sends through."""

from __future__ import annotations

import asyncio
import socket

import pytest

from transferkit.serving import protocol


class _Reader(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(True)


async def _pair():
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    _, reader = await loop.connect_accepted_socket(_Reader, theirs)
    writes: list[bytes] = []
    real_write = transport.write

    def counted(data: bytes) -> None:
        writes.append(bytes(data))
        real_write(data)

    transport.write = counted  # the real transport still sends; only the calls are counted
    return protocol.CoalescingTransport(transport, loop), transport, reader, writes


def test_writes_in_one_turn_leave_as_one_send():
    async def main():
        coalescing, transport, reader, writes = await _pair()
        coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        coalescing.write(b"{}")
        assert writes == []  # held until the end of this turn
        assert coalescing.get_write_buffer_size() == 40  # flow control sees what is held
        await asyncio.sleep(0)
        assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        coalescing.write(b"next")
        await asyncio.sleep(0)
        assert writes[1:] == [b"next"]  # a later turn: a write of its own
        coalescing.close()
        await asyncio.wait_for(reader.closed, 5)
        assert bytes(reader.data) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}next"

    asyncio.run(main())


def test_close_sends_what_is_held_first():
    async def main():
        coalescing, transport, reader, writes = await _pair()
        coalescing.write(b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\r\n")
        coalescing.close()  # same turn: a `Connection: close` answer must not be dropped
        await asyncio.wait_for(reader.closed, 5)
        assert bytes(reader.data).startswith(b"HTTP/1.1 503")
        assert transport.is_closing() and coalescing.is_closing()  # the rest is the real transport's

    asyncio.run(main())


def test_install_points_uvicorn_auto_here_once(monkeypatch):
    pytest.importorskip("httptools")
    from uvicorn import config
    from uvicorn.importer import import_from_string

    monkeypatch.setitem(config.HTTP_PROTOCOLS, "auto", protocol.UVICORN_AUTO)
    monkeypatch.setattr(protocol, "_FRONT", None)
    assert protocol.install(front=None)
    assert config.HTTP_PROTOCOLS["auto"] == protocol.THIS_PROTOCOL
    cls = import_from_string(config.HTTP_PROTOCOLS["auto"])
    assert cls.stack_name == "httptools+coalesced"
    # a choice someone else made is left alone
    monkeypatch.setitem(config.HTTP_PROTOCOLS, "auto", "elsewhere:Protocol")
    assert not protocol.install(front=None)
    assert config.HTTP_PROTOCOLS["auto"] == "elsewhere:Protocol"


def test_a_key_ring_takes_several_keys_and_keeps_its_keys_through_a_bad_rewrite(tmp_path, monkeypatch):
    from transferkit.serving import keys

    ring = keys.KeyRing("one, two\nthree\n")
    assert ring.keys == ("one", "two", "three") and ring.required
    assert ring.accepts("Bearer two") and ring.accepts("bearer  three ") and not ring.accepts("Bearer four")
    assert not ring.accepts("Basic two") and not ring.accepts("") and not keys.KeyRing(None).required
    path = tmp_path / "key"
    path.write_text("first\n")
    ring = keys.KeyRing(path.read_text(), str(path))
    monkeypatch.setattr(keys, "RELOAD_S", 0.0)
    path.write_text("")  # a Secret mid-update: empty for a moment
    assert ring.accepts("Bearer first")  # the keys already read stay
    path.write_text("second\n")
    assert ring.accepts("Bearer second") and not ring.accepts("Bearer first")
    path.unlink()
    assert ring.accepts("Bearer second")
