"""An ASGI middleware that checks the shape of a /predict upload before BentoML parses it.

BentoML's own parsing answers some malformed uploads with a 500 (a binary file under an unknown field name is
decoded as UTF-8) or with a generic pydantic message. This check answers them with a 4xx and a sentence
naming the problem, and refuses oversized bodies while they stream in, before they are buffered:

    not multipart/form-data              415  send the image as a multipart file field `image`
    body over MAX_UPLOAD_BYTES           413
    no `image` field / not a file / two  400
    fields other than image, top_k       400

A request that passes is replayed unchanged to the BentoML app.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HINT = "send the image as multipart/form-data field `image`, e.g. curl -F image=@photo.jpg URL/predict"


class UploadProblem(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UploadCheck:
    """Guards `path` (POST only); other routes pass straight through."""

    def __init__(self, app: Callable, path: str = "/predict", max_bytes: int = 20 << 20,
                 fields: tuple[str, ...] = ("image", "top_k"), file_field: str = "image") -> None:  # fmt: skip
        self.app, self.path, self.max_bytes = app, path, max_bytes
        self.fields, self.file_field = fields, file_field

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
            await self._check_form(scope, body)
        except UploadProblem as exc:
            await _send_json(send, exc.status, {"error": str(exc)})
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
            got = headers.get("content-type") or "no content type"
            raise UploadProblem(415, f"expected multipart/form-data, got {got}; {HINT}")
        limit = self.max_bytes + (64 << 10)  # room for the multipart framing around the file
        if int(headers.get("content-length") or 0) > limit:
            raise UploadProblem(413, f"request body over the {self.max_bytes // 2**20} MB upload limit")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise UploadProblem(400, "the client disconnected before the upload finished")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise UploadProblem(413, f"request body over the {self.max_bytes // 2**20} MB upload limit")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _check_form(self, scope: Scope, body: bytes) -> None:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        async def once() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, once).form()
        except Exception as exc:  # noqa: BLE001 - malformed multipart framing
            raise UploadProblem(400, f"could not parse the multipart body ({exc}); {HINT}") from None
        try:
            names = list(form.keys())
            unknown = sorted(set(names) - set(self.fields))
            if unknown:
                raise UploadProblem(400, f"unknown form field(s) {unknown}; {self.path} takes {list(self.fields)}; {HINT}")
            images = form.getlist(self.file_field)
            if not images:
                raise UploadProblem(400, f"missing form field `{self.file_field}`; {HINT}")
            if len(images) > 1:
                raise UploadProblem(400, f"{len(images)} `{self.file_field}` fields; send one image per request")
            if not isinstance(images[0], UploadFile):
                raise UploadProblem(400, f"form field `{self.file_field}` must be a file upload, not text; {HINT}")
        finally:
            await form.close()


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})  # fmt: skip
