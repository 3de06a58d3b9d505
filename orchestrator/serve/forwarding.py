"""An HTTP request handed from the front to a model's replica, answered by the replica's own
ASGI app in-process: the same routes, keys, limits, metrics and errors as a request that came
to the model's own route. Plain asyncio, testable without Ray.

A whole answer comes back as one Answer; a streamed one as its Answer (status, headers, no body)
followed by the body's chunks. A caller that leaves is passed on as `http.disconnect`, so a
stream stops decoding for it as it does on the model's own route.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

ASGIApp = Any  # an ASGI 3 callable: app(scope, receive, send)


@dataclass(frozen=True)
class Forwarded:
    """What the front received: the request line, its headers and its whole body."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


def _scope(request: Forwarded) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path,
            "raw_path": request.path.encode(), "root_path": "",
            "query_string": request.query_string, "headers": list(request.headers),
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}


async def stream(app: ASGIApp, request: Forwarded) -> AsyncIterator[Answer | bytes]:
    """The app's answer to `request`: its Answer first (no body), then each body chunk."""
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(_scope(request), receive, messages.put)
        finally:
            await messages.put({"type": "forwarding.done"})

    task = asyncio.create_task(run())
    try:
        while True:
            message = await messages.get()
            if message["type"] == "http.response.start":
                yield Answer(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
            elif message["type"] == "forwarding.done":
                break
    finally:
        gone.set()  # the caller left, or the answer is complete
        try:
            await asyncio.wait_for(task, timeout=30)
        except TimeoutError:
            task.cancel()
    task.result()  # an exception the app let out (its Guard answers 500 before that)


async def whole(app: ASGIApp, request: Forwarded) -> Answer:
    """The app's whole answer to `request`."""
    answer, chunks = None, []
    async for part in stream(app, request):
        if isinstance(part, Answer):
            answer = part
        else:
            chunks.append(part)
    if answer is None:
        raise RuntimeError(f"{request.method} {request.path}: the app sent no response")
    answer.body = b"".join(chunks)
    return answer
