"""Pure ASGI guards around the application: Host allow-list, ``nosniff`` on every response,
``HEAD`` wherever ``GET`` is served, and a limit on requests in flight."""
from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = ["HostAllowList", "NoSniff", "HeadAsGet", "ConcurrencyLimit", "normalise_host", "send_json"]


async def send_json(send, status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON ``{"detail": ...}`` response and ask the client to close the connection."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def normalise_host(host: str) -> str:
    """A Host header value or allow-list entry without its port, lower-cased (``[::1]:80`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    if host.count(":") > 1:  # a bare IPv6 address, as given to --host
        return f"[{host}]"
    return host.split(":", 1)[0]


class HostAllowList:
    """Refuse (400) requests whose ``Host`` header names no allowed host.

    A page on another site can make a browser send requests to this server under its own
    domain name, re-pointed to 127.0.0.1 (DNS rebinding); the Host header still names that
    domain, so checking it keeps such pages from reading the index. ``"*"`` allows any host.
    """

    def __init__(self, app, *, hosts: Iterable[str]):
        self.app = app
        self.hosts = {normalise_host(h) for h in hosts}
        self.any = "*" in self.hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.any:
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
        if host is None or normalise_host(host) not in self.hosts:
            return await send_json(send, 400, f"invalid Host header {host!r}: this server answers to "
                                              f"{', '.join(sorted(self.hosts))} (serve --allowed-host adds one)")
        return await self.app(scope, receive, send)


class NoSniff:
    """Add ``X-Content-Type-Options: nosniff`` to every response that lacks it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_header)


class HeadAsGet:
    """Answer ``HEAD`` as ``GET`` without the body (FastAPI routes declare GET only)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        return await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class ConcurrencyLimit:
    """At most ``limit`` requests in flight; more get 503 with ``Retry-After`` at once.

    Each search may buffer an upload of up to the size cap and waits for the model, so an
    unbounded number of them would exhaust memory and threads. ``exempt`` paths (the
    health check) are never refused.
    """

    def __init__(self, app, *, limit: int, exempt: tuple[str, ...] = ()):
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            return await send_json(send, 503, f"server busy: {self.limit} requests in flight; retry shortly",
                                   [(b"retry-after", b"1")])
        self.in_flight += 1  # one event loop: no lock needed
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
