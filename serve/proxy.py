"""Middleware for Serve's HTTP proxy: what a client may not decide for itself.

Serve's proxy reads ``x-request-timeout-seconds`` from every request and lets it override
``request_timeout_s`` (``0`` disables the timeout: a client could hold a replica forever). The
proxy loads :func:`middlewares` through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(:data:`PROXY_CALLBACK`), which ``earmark serve`` sets for embedded Ray and the RayService
manifest sets for the cluster; the session limits themselves are enforced in the handler.
"""

from __future__ import annotations

from typing import Any

#: The environment variable and value that make Serve's proxy load :func:`middlewares`.
PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve.proxy:middlewares")
STRIPPED = (b"x-request-timeout-seconds",)


class StripClientTimeout:
    """ASGI middleware: drop the headers in :data:`STRIPPED` from HTTP and WebSocket requests."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            headers = scope.get("headers") or []
            if any(name.lower() in STRIPPED for name, _ in headers):
                scope = dict(scope, headers=[(k, v) for k, v in headers if k.lower() not in STRIPPED])
        await self.app(scope, receive, send)


def middlewares() -> list[Any]:
    from starlette.middleware import Middleware

    return [Middleware(StripClientTimeout)]
