"""The front: one OpenAI-compatible address for every model on the cluster, routed by the
request's `model` field, as vLLM's and Ray Serve LLM's routers do.

Each model is its own Serve application at its own route (`/<model>/v1/...`, for clients that
cannot set the field), and the front at `/` hands each request to that application's replica
whole (forwarding.py), where the model's own ASGI app answers it: keys, limits, metrics and
errors are the model's, and deploying or updating one model never touches another. The front
holds no model and parses only the `model` field.

  GET  /healthz            the front is up, and the models it routes to
  GET  /v1/models          every model's own listing, merged (the ones the caller's key opens)
  GET  /v1/models/{model}  that model's
  POST any other route     the model named in the body's `model`

The ASGI app is plain Python over a `Models` (the Serve one is in app.py), tested without Ray.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from orchestrator.serve.forwarding import Answer, Forwarded
from orchestrator.serve.protocol import error_body

MAX_REQUEST_BYTES = 16 * 2**20  # the model's own limit applies after; this bounds the front
Send = Any
Receive = Any


class UnknownModel(LookupError):
    pass


class Models(Protocol):
    """The models the front routes to; UnknownModel for a name it does not serve."""

    def names(self) -> list[str]: ...

    async def whole(self, model: str, request: Forwarded) -> Answer: ...

    def stream(self, model: str, request: Forwarded) -> AsyncIterator[Answer | bytes]: ...


class Front:
    """The front's ASGI app."""

    def __init__(self, models: Models, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.models, self.max_request_bytes = models, max_request_bytes

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/healthz":
            return await _json(send, 200, {"status": "ok", "models": self.models.names()})
        body = await _body(receive, self.max_request_bytes)
        if body is None:
            return await _error(send, 413, f"the request body is over {self.max_request_bytes} "
                                           "bytes", code="request_too_large")
        request = Forwarded(method, path, scope.get("query_string", b""),
                            tuple(scope.get("headers", ())), body)
        if method == "GET" and path == "/v1/models":
            return await self._list(request, send)
        if method == "GET" and path.startswith("/v1/models/"):
            return await self._forward(path.removeprefix("/v1/models/"), request, False, send)
        if method != "POST":
            return await _error(send, 404, f"{method} {path} is not routed by the front: use "
                                           "the model's own route, /<model>{path}",
                                code="unknown_route")
        fields = _fields(body)
        model = fields.get("model")
        if not isinstance(model, str) or not model:
            return await _error(send, 400, "name the model in the body's `model` field (the "
                                           f"front routes by it): one of {self.models.names()}",
                                param="model", code="model_required")
        await self._forward(model, request, fields.get("stream") is True, send)

    async def _forward(self, model: str, request: Forwarded, streamed: bool, send: Send) -> None:
        try:
            if not streamed:
                return await _send(send, await self.models.whole(model, request))
            async for part in self.models.stream(model, request):
                if isinstance(part, Answer):
                    await send({"type": "http.response.start", "status": part.status,
                                "headers": part.headers})
                else:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UnknownModel:
            await _error(send, 404, f"model {model!r} is not served here: one of "
                                    f"{self.models.names()}", param="model",
                         code="model_not_found")

    async def _list(self, request: Forwarded, send: Send) -> None:
        """Every model's listing that answers 200 to the caller's key; the first refusal when
        none does (a caller without a valid key learns no model names)."""
        listed, refusal = [], None
        for model in self.models.names():
            try:
                answer = await self.models.whole(model, request)
            except UnknownModel:  # removed meanwhile
                continue
            if answer.status == 200:
                listed += json.loads(answer.body).get("data", [])
            elif refusal is None:
                refusal = answer
        if not listed and refusal is not None:
            return await _send(send, refusal)
        await _json(send, 200, {"object": "list", "data": listed})


def _fields(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


async def _body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None past `limit` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send(send: Send, answer: Answer) -> None:
    await send({"type": "http.response.start", "status": answer.status,
                "headers": answer.headers})
    await send({"type": "http.response.body", "body": answer.body})


async def _json(send: Send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    await _send(send, Answer(status, [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode())], body))


async def _error(send: Send, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
    await _json(send, status, {"error": error_body(status, message, param, code)})
