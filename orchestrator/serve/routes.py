"""The model service's HTTP routes, OpenAI-compatible, independent of how they are hosted.

  GET  /healthz              liveness, no key needed (for load balancers)
  GET  /v1/models            the model served and its LoRA adapters (each with its `parent`);
                             GET /v1/models/{id} for one
  POST /v1/completions       language model: OpenAI's completions (logprobs, echo, scoring with
                             max_tokens 0, token-id prompts, penalties), server-sent events
  POST /v1/classify          classifier: {"input": [texts]} -> label, score, class probabilities
  POST /tokenize             vLLM's: text -> token ids; POST /detokenize: ids -> text
  GET  /tokenizer_info       vLLM's: the tokenizer's special tokens and sizes
  GET  /openapi.json        the schema, behind the key like every route but /healthz and /docs
  GET  /docs                 Swagger UI; with keys configured, a page that asks for the key and
                             sends it with every request it makes, the schema's included

Three ASGI middlewares wrap the app, outermost first: `RequestMetrics` records each request;
`RequireKey` answers 401 to a request without a valid key before anything reads its body;
`Guard` reads a body up to serve.max_request_bytes (413 beyond), parses it as JSON whatever its
Content-Type says (curl -d sends a form type), and turns any unexpected exception into a JSON 500.
"""

# No `from __future__ import annotations`: FastAPI must see the request models as classes.
import asyncio
import html
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from orchestrator import prometheus
from orchestrator.inference.engine import TokenLogprob
from orchestrator.serve.auth import BEARER, authorized, digest
from orchestrator.serve.protocol import (
    ERROR_TYPES,
    APIError,
    ClassifyBody,
    CompletionBody,
    DetokenizeBody,
    TokenizeBody,
    api_error,
    error_body,
    error_response,
    http_error,
    invalid_request,
)
from orchestrator.serve.quotas import key_id
from orchestrator.serve.server import (
    CompletionChoice,
    CompletionJob,
    ModelServer,
    engine_error,
    gather,
    timeout_as_408,
    timeout_message,
)
from orchestrator.spec import Task

logger = logging.getLogger(__name__)


def server_of(request: Request) -> ModelServer:
    return request.app.state.server


def key_of(request: Request) -> str | None:
    """The caller's key id (RequireKey sets it), or None when no keys are configured."""
    return request.scope.get("state", {}).get("key_id")


def require_task(server: ModelServer, task: Task, route: str) -> None:
    if server.task != task:
        other = "/v1/completions" if server.task == Task.LANGUAGE_MODEL else "/v1/classify"
        raise APIError(404, f"{route} is not served by this {server.task} model; use {other}",
                       code="unsupported_route")


def require_model(server: ModelServer, name: str | None) -> str | None:
    """The adapter `name` picks (None: the model itself); 404 naming what is served."""
    return server.adapter_of(name)


router = APIRouter(prefix="/v1")
tokens_router = APIRouter()


# ---- /v1/models ---------------------------------------------------------------------------------

@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    server = server_of(request)
    return {"object": "list", "data": [model_card(server), *(
        model_card(server, adapter) for adapter in server.adapter_names)]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    server = server_of(request)
    return model_card(server, require_model(server, model_id))


def model_card(server: ModelServer, adapter: str | None = None) -> dict[str, Any]:
    """A model's card; an adapter's names its base as `parent` (as vLLM's LoRA cards do), and
    a base with adapters lists them."""
    card = {"id": adapter or server.model_name, "object": "model", "created": server.created,
            "owned_by": "orchestrator", "task": server.task,
            "max_model_len": server.context_length, "version": server.version}
    if adapter is not None:
        card["parent"] = server.model_name
    elif server.adapter_names:
        card["adapters"] = server.adapter_names
    return card


# ---- /v1/classify ------------------------------------------------------------------------------

@router.post("/classify")
async def classify(body: ClassifyBody, request: Request) -> dict[str, Any]:
    server = server_of(request)
    require_task(server, Task.CLASSIFIER, "/v1/classify")
    require_model(server, body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input must not be an empty list", "input")
    if len(texts) > server.limits.max_inputs:
        raise APIError(400, f"{len(texts)} inputs exceed the limit of {server.limits.max_inputs}",
                       "input")
    if any(not text.strip() for text in texts):
        raise APIError(400, "input must not contain empty strings", "input")
    texts, key = server.readable(texts), key_of(request)
    await server.admit(key, await server.classify_tokens(texts) if key else 0)
    async with timeout_as_408(server):
        predictions = await server.classify(texts)
    return {"object": "list", "model": server.model_name,
            "data": [{"index": i, **p} for i, p in enumerate(predictions)]}


# ---- /v1/completions ---------------------------------------------------------------------------

@router.post("/completions", response_model=None)
async def completions(body: CompletionBody, request: Request) -> dict[str, Any] | StreamingResponse:
    started = time.perf_counter()
    server = server_of(request)
    require_task(server, Task.LANGUAGE_MODEL, "/v1/completions")
    require_model(server, body.model)
    job = await server.completion_job(body)
    key = key_of(request)
    ticket = await server.admit(key, job.prompt_tokens, sum(p.max_tokens for p in job.params))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": job.adapter or server.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_events(server, job, head, include_usage, started,
                                               key, ticket), media_type="text/event-stream")
    async with timeout_as_408(server):  # a request that fails keeps its reservation
        choices = await server.complete(job)
    tokens = sum(choice.completion_tokens for choice in choices)
    prometheus.record("serve_generated_tokens", tokens, app=server.app_name)
    server.finish(key, ticket, job.prompt_tokens, tokens)
    return {**head, "choices": [choice_json(job, row, choice) for row, choice in enumerate(choices)],
            "usage": usage(job.prompt_tokens, tokens)}


def choice_json(job: CompletionJob, row: int, choice: CompletionChoice,
                first: bool = True) -> dict[str, Any]:
    """One choice as OpenAI writes it; `first`: whether this chunk opens the row (echo)."""
    echo = job.echo[row] if job.echo is not None else ""
    logprobs = None
    if job.logprobs:
        entries = [*choice.prompt_logprobs,
                   *(TokenLogprob(e.token, e.logprob, e.top, e.offset + len(echo))
                     for e in choice.logprobs)]
        logprobs = {"tokens": [e.token for e in entries],
                    "token_logprobs": [e.logprob for e in entries],
                    "top_logprobs": [e.top for e in entries],
                    "text_offset": [e.offset for e in entries]}
    return {"text": (echo if first else "") + choice.text, "index": row, "logprobs": logprobs,
            "finish_reason": choice.finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_events(server: ModelServer, job: CompletionJob, head: dict[str, Any],
                        include_usage: bool, started: float, key: str | None = None,
                        ticket: int | None = None) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a chunk per new text, then `data: [DONE]`.
    Once the stream has started its status cannot change: a failure (timeout, an error of this
    request, anything unexpected) sends an error event, then `data: [DONE]`."""
    tokens = [0] * len(job.prompts)
    opened = [False] * len(job.prompts)
    first_token = True
    try:
        async with asyncio.timeout(server.limits.request_timeout_s), aclosing(server.outputs(job)) as outputs:
            async for output in outputs:
                if output.error is not None:
                    raise engine_error(output.error)
                for row, update in output.updates:
                    tokens[row] = update.completion_tokens
                    if first_token and update.completion_tokens:
                        first_token = False
                        prometheus.record("serve_time_to_first_token_seconds",
                                       time.perf_counter() - started, app=server.app_name)
                    if update.text or update.finish_reason or update.logprobs or not opened[row]:
                        choice = CompletionChoice()
                        gather(choice, update)
                        yield sse({**head, "choices": [choice_json(job, row, choice,
                                                                   not opened[row])]})
                        opened[row] = True
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(job.prompt_tokens, sum(tokens))})
    except TimeoutError:
        yield sse({"error": error_body(408, timeout_message(server), code="request_timeout")})
    except APIError as error:
        yield sse({"error": error_body(error.status, error.message, error.param, error.code)})
    except Exception as error:  # the stream ends in the protocol's shape
        logger.exception("completion stream failed")
        yield sse({"error": error_body(500, f"internal error: {type(error).__name__}",
                                       code="internal_error")})
    finally:
        prometheus.record("serve_generated_tokens", sum(tokens), app=server.app_name)
        server.finish(key, ticket, job.prompt_tokens, sum(tokens))
    yield "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# ---- vLLM's tokenizer endpoints --------------------------------------------------------------

@tokens_router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: Request) -> dict[str, Any]:
    server = server_of(request)
    require_model(server, body.model)
    server.check_prompt_bytes(body.prompt, server.limits.max_prompt_tokens)
    await server.admit(key_of(request))
    [ids] = await server.tokenize([body.prompt])
    out: dict[str, Any] = {"count": len(ids), "max_model_len": server.context_length,
                           "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = [server.tokenizer.id_to_token(i) for i in ids]
    return out


@tokens_router.post("/detokenize")
async def detokenize(body: DetokenizeBody, request: Request) -> dict[str, Any]:
    server = server_of(request)
    require_model(server, body.model)
    if len(body.tokens) > server.context_length:
        raise APIError(400, f"at most {server.context_length} tokens", "tokens")
    server.check_token_ids(body.tokens, "tokens")
    await server.admit(key_of(request))
    [text] = await server.detokenize([body.tokens])
    return {"prompt": text}


@tokens_router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    server = server_of(request)
    info, tokenizer = server.info, server.tokenizer
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model": server.model_name,
            "vocab_size": info.vocab_size, "model_max_length": server.context_length,
            "eos_token": tokenizer.id_to_token(info.eos_id), "eos_token_id": info.eos_id,
            "pad_token": tokenizer.id_to_token(info.pad_id), "pad_token_id": info.pad_id}


# ---- middleware ---------------------------------------------------------------------------------

class Guard:
    """Body size limit, JSON whatever the Content-Type, JSON 500 for unexpected exceptions.

    The body is read here (up to the limit; a larger Content-Length is refused unread), then
    replayed to the app; later receive() calls reach the client, so disconnects still show."""

    def __init__(self, app: Any, max_request_bytes: int):
        self.app, self.limit = app, max_request_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_track(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self.read_body(scope, receive)
                if body is None:
                    await error_response(413, f"the request body exceeds {self.limit} bytes",
                                         code="request_too_large")(scope, receive, send_and_track)
                    return
                scope = self.as_json(scope)
                receive = self.replay(body, receive)
            await self.app(scope, receive, send_and_track)
        except Exception:
            logger.exception("unexpected error serving %s", scope.get("path"))
            if not started:
                await error_response(500, "internal error", code="internal_error")(
                    scope, receive, send_and_track)

    async def read_body(self, scope: dict[str, Any], receive: Any) -> bytes | None:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    @staticmethod
    def as_json(scope: dict[str, Any]) -> dict[str, Any]:
        """The same scope, changed in place: the router records the matched route in it, and
        RequestMetrics, outside this middleware, reads the route from the scope it passed in
        (a copy left every request's route "unmatched")."""
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope["headers"] = [*headers, (b"content-type", b"application/json")]
        return scope

    @staticmethod
    def replay(body: bytes, receive: Any) -> Any:
        sent = False

        async def replayed() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replayed


class RequestMetrics:
    """ASGI middleware recording each request's route, status code and latency. Latency runs to
    the response's last byte, so a stream counts whole; a request whose client left early counts
    when the app lets go of it."""

    def __init__(self, app: Any, app_name: str):
        self.app, self.app_name = app, app_name

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, done = time.perf_counter(), 500, False

        def finish() -> None:
            nonlocal done
            done = True
            # The matched route's template (FastAPI sets it while routing), not the raw path.
            route = getattr(scope.get("route"), "path", "unmatched")
            prometheus.record("serve_requests", 1, app=self.app_name, route=route,
                           status=str(status))
            prometheus.record("serve_latency_seconds", time.perf_counter() - started,
                           app=self.app_name, route=route)

        async def send_and_measure(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finish()

        try:
            await self.app(scope, receive, send_and_measure)
        finally:
            if not done:
                finish()


OPEN_PATHS = frozenset({"/healthz", "/docs"})  # what a load balancer or a browser gets keyless
BEARER_SCHEME = "HTTPBearer"


class RequireKey:
    """The API key, checked before anything reads the body: a request without a valid key gets
    401 whatever its body (a malformed one got 400, telling a stranger how it was parsed) and
    costs no body read. Every path but OPEN_PATHS needs the key, unknown ones included, so a
    route added later is keyed unless it is opened on purpose. A keyed request carries its
    key's id (quotas.key_id) in scope["state"] for quotas and usage."""

    def __init__(self, app: Any, server: ModelServer):
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and route_path(scope) not in OPEN_PATHS:
            header = Headers(scope=scope).get("authorization")
            if not authorized(header, self.server.key_digests, self.server.auth_required):
                await error_response(401, "a valid API key is required: Authorization: Bearer "
                                          "KEY", code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            if self.server.auth_required:
                presented = digest(header[len(BEARER):].strip())
                scope.setdefault("state", {})["key_id"] = key_id(presented)
        await self.app(scope, receive, send)


def route_path(scope: dict[str, Any]) -> str:
    """The path within the app: Serve mounts an app at its route prefix, the scope's root_path,
    which the path includes."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


def with_bearer_scheme(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with the key as an HTTP bearer scheme on every operation but the open ones, so
    that Swagger UI's Authorize button sends the key it is given (changes the cached schema in
    place, the same way each time)."""
    schema.setdefault("components", {})["securitySchemes"] = {
        BEARER_SCHEME: {"type": "http", "scheme": "bearer", "description": "an API key"}}
    schema["security"] = [{BEARER_SCHEME: []}]
    for path in OPEN_PATHS & set(schema["paths"]):
        for operation in schema["paths"][path].values():
            operation["security"] = []
    return schema


SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"  # FastAPI's default assets


def docs_page(title: str, openapi_url: str, keyed: bool) -> str:
    """Swagger UI that loads /openapi.json with the key: a browser opening /docs sends no
    Authorization header, so with keys configured the page asks for the key first and its
    requestInterceptor adds it to every request Swagger makes (the schema, "Try it out") that
    carries none of its own (a key given to Authorize wins). The key stays in the page."""
    return f"""<!DOCTYPE html>
<html>
<head>
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link type="text/css" rel="stylesheet" href="{SWAGGER_UI}/swagger-ui.css">
<title>{html.escape(title)}</title>
</head>
<body>
<form id="api-key" hidden>
<label>API key <input type="password" name="key" autocomplete="off" required></label>
<button type="submit">Open the API</button>
</form>
<div id="swagger-ui"></div>
<script src="{SWAGGER_UI}/swagger-ui-bundle.js"></script>
<script>
function start(key) {{
  SwaggerUIBundle({{
    url: {json.dumps(openapi_url)},
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    requestInterceptor: (request) => {{
      if (key && !request.headers.Authorization) {{
        request.headers.Authorization = "Bearer " + key;
      }}
      return request;
    }},
  }});
}}
const form = document.getElementById("api-key");
if ({json.dumps(keyed)}) {{
  form.hidden = false;
  form.addEventListener("submit", (event) => {{
    event.preventDefault();
    form.hidden = true;
    start(form.elements.key.value.trim());
  }});
}} else {{
  start("");
}}
</script>
</body>
</html>
"""


def create_api(server: ModelServer) -> FastAPI:
    """The FastAPI app around one ModelServer (Serve builds it on each replica)."""
    api = FastAPI(title="orchestrator model service", openapi_url=None, docs_url=None,
                  redoc_url=None)
    api.state.server = server
    api.add_middleware(Guard, max_request_bytes=server.limits.max_request_bytes)
    api.add_middleware(RequireKey, server=server)
    api.add_middleware(RequestMetrics, app_name=server.app_name)  # outermost: sees 401, 413, 500
    api.add_exception_handler(APIError, api_error)
    api.add_exception_handler(RequestValidationError, invalid_request)
    api.add_exception_handler(HTTPException, http_error)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "task": server.task, "model": server.model_name,
                "version": server.version}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        schema = api.openapi()
        return with_bearer_scheme(schema) if server.auth_required else schema

    @api.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        openapi_url = request.scope.get("root_path", "") + "/openapi.json"  # as FastAPI's own
        return HTMLResponse(docs_page(api.title, openapi_url, server.auth_required))

    api.include_router(router)
    api.include_router(tokens_router)
    return api


__all__ = ["ERROR_TYPES", "create_api"]
