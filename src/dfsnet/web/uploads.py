"""Upload guards: a request-body size cap enforced before and while reading, and image decoding
by content with pixel and shape limits, mapped to 400 / 413 responses."""
from __future__ import annotations

import asyncio

from fastapi import HTTPException

from dfsnet.images import ImageGeometryError, ImageTooLargeError, InvalidImageError, open_image
from dfsnet.web.middleware import send_json

# Room for the multipart envelope (boundaries, part headers, the ``k`` field) on top of the file.
MULTIPART_OVERHEAD = 64 * 1024


class BodySizeLimit:
    """ASGI middleware capping request bodies on ``paths`` at ``max_bytes``, and their pauses.

    A declared ``Content-Length`` above the cap is refused before any byte is read; a body
    without one (chunked) is read up to the cap and refused as soon as it passes it. Either
    way the client gets a 413 with a JSON ``detail``. A client that sends no part of the
    body for ``timeout`` seconds gets a 408 (a request that promises a body and never sends
    it would otherwise hold its connection, and a slot of the concurrency limit, forever).
    Accepted bodies are buffered (at most ``max_bytes``) and replayed to the application.
    """

    def __init__(self, app, *, max_bytes: int, paths: tuple[str, ...], timeout: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send, declared)
        chunks, total = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                return await send_json(send, 408, f"request body: no data received for {self.timeout:g} s")
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await self._refuse(send, None)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else f"more than {self.max_bytes} bytes"
        await send_json(send, 413, f"upload too large: {size}; the limit is {self.max_bytes} bytes "
                                   "including the multipart envelope")


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def read_upload(fileobj, *, max_bytes: int) -> bytes:
    """The uploaded bytes; 413 above ``max_bytes``, 400 when empty."""
    data = fileobj.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"upload too large: the file exceeds the limit of {max_bytes} bytes")
    if not data:
        raise HTTPException(400, "file: the uploaded file is empty")
    return data


def decode_upload(data: bytes, *, max_pixels: int | None):
    """An RGB PIL image from uploaded bytes (decoded by :func:`dfsnet.images.open_image`).

    413 for an image with more than ``max_pixels`` pixels; 400 for anything that is not a
    decodable image of a supported format, and for a side or aspect ratio above the limits
    (:class:`dfsnet.images.ImageGeometryError`: a request that is malformed, not too big).
    """
    try:
        return open_image(data, max_pixels=max_pixels, name="the uploaded file")
    except ImageTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    except (ImageGeometryError, InvalidImageError) as exc:
        raise HTTPException(400, str(exc)) from None
