"""The model service's HTTP API, OpenAI-compatible, independent of how it is hosted.

  GET  /healthz              liveness, no key needed (for load balancers)
  GET  /v1/models            the one model served; GET /v1/models/{id} for one
  POST /v1/completions       language model: OpenAI's completions, server-sent events with stream
  POST /v1/classify          classifier: {"input": [texts]} -> label, score, class probabilities

`ModelServer` holds the model and batches requests with `@serve.batch` on a Serve replica; on plain
uvicorn (the serve benchmark's baseline) requests take turns instead.
Every error uses OpenAI's shape {"error": {"message", "type", "param", "code"}}; the server keeps
serving after any bad request.
"""

# No `from __future__ import annotations`: FastAPI must see the request models as classes.
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from ray import serve
from starlette.exceptions import HTTPException

from orchestrator import metrics
from orchestrator.bundle import load_bundle
from orchestrator.predictor import ChoiceUpdate, Predictor, SamplingParams
from orchestrator.serve.auth import authorized
from orchestrator.spec import ServeSpec

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP_STRINGS = 4
SEED_LIMIT = 2**63


# ---- errors -------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param, "code": code}
    return JSONResponse(status_code=status, headers=headers, content={"error": body})


async def _api_error(_: Request, error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return error_response(error.status, error.message, error.param, error.code, headers)


async def _invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(400, f"malformed JSON: {first['msg']}", code="invalid_json")
    # OpenAI names the top-level parameter (deeper locations hold pydantic's union tags).
    fields = [str(part) for part in first["loc"] if part != "body"]
    param = fields[0] if fields else None
    if first["type"] == "extra_forbidden":
        return error_response(400, f"unknown or unsupported parameter {param!r}", param,
                              "unsupported_parameter")
    return error_response(400, f"{param}: {first['msg']}" if param else first["msg"], param)


async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
    """Unknown routes (404) and methods (405) answer in the same shape as other errors."""
    return error_response(error.status_code, str(error.detail), headers=error.headers)


# ---- request bodies -----------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class CompletionBody(_Body):
    model: StrictStr
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0, description="0 is off; an extension, as in vLLM.")
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(1, ge=1)
    seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class ClassifyBody(_Body):
    model: StrictStr | None = None
    input: StrictStr | list[StrictStr]


# ---- the server ---------------------------------------------------------------------------------

@dataclass
class DecodeJob:
    """One request's rows (prompt x n) for the shared decoding batch. `abandoned` is set when
    its caller stops listening (timeout, disconnect): its rows then leave the batch."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    abandoned: bool = False


RowUpdate = tuple[int, ChoiceUpdate]


class ModelServer:
    """A loaded bundle and the batching around it; one per replica (or per uvicorn process)."""

    def __init__(self, bundle_dir: str, limits: ServeSpec, key_digests: list[str],
                 batching: bool = True, app_name: str | None = None):
        bundle = load_bundle(bundle_dir)
        if limits.replica_gpus > 0 and torch.cuda.is_available():
            bundle.model.to("cuda")
        self.predictor = Predictor(bundle)
        self.family = bundle.info.family
        self.model_name = bundle.spec.name
        self.app_name = app_name or self.model_name  # the `app` tag of this server's metrics
        self.version = bundle.version  # which weights answer
        self.created = int(time.time())
        self.limits = limits
        self.key_digests = key_digests
        # @serve.batch works on Serve replicas only; elsewhere requests take turns on the model.
        self.batching = batching
        self.model_lock = asyncio.Lock()
        if batching:
            for method in (self.classify_batch, self.decode_batch):
                method.set_max_batch_size(limits.max_batch_size)
                method.set_batch_wait_timeout_s(limits.batch_wait_timeout_s)

    async def check_health(self) -> None:
        """Raises when the model cannot answer; Serve then replaces the replica."""
        if self.family == "gpt":
            ids = [self.predictor.encode("a")]
            await asyncio.to_thread(self.predictor.complete, ids, [SamplingParams(1, 0.0)])
        else:
            await asyncio.to_thread(self.predictor.classify, ["a"])

    async def classify(self, texts: list[str]) -> list[dict]:
        if self.batching:
            return await self.classify_batch(texts)
        async with self.model_lock:
            return (await self.classify_lists([texts]))[0]

    async def decode(self, job: DecodeJob) -> AsyncIterator[list[RowUpdate]]:
        """The request's row updates, step by step, decoded with whatever shares its batch.
        A caller that stops early (timeout, disconnect) marks its job abandoned."""
        finished = False
        try:
            async for updates in (self.decode_batch(job) if self.batching
                                  else self.decode_alone(job)):
                yield updates
            finished = True
        finally:
            job.abandoned = not finished

    @serve.batch
    async def classify_batch(self, texts_per_request: list[list[str]]) -> list[list[dict]]:
        metrics.record("serve_batch_size", len(texts_per_request), app=self.app_name,
                       route="/v1/classify")
        return await self.classify_lists(texts_per_request)

    @serve.batch()  # parenthesised: the bare form refuses async generators in Ray 2.60
    async def decode_batch(self, jobs: list[DecodeJob]) -> AsyncIterator[list[Any]]:
        metrics.record("serve_batch_size", len(jobs), app=self.app_name, route="/v1/completions")
        async for per_job in self.decode_jobs(jobs):
            yield per_job

    async def decode_alone(self, job: DecodeJob) -> AsyncIterator[list[RowUpdate]]:
        async with self.model_lock:
            async for (updates,) in self.decode_jobs([job]):
                if updates is StopIteration:
                    return
                yield updates

    async def classify_lists(self, texts_per_request: list[list[str]]) -> list[list[dict]]:
        flat = [text for texts in texts_per_request for text in texts]
        predictions = await asyncio.to_thread(self.predictor.classify, flat)
        out, start = [], 0
        for texts in texts_per_request:
            out.append(predictions[start: start + len(texts)])
            start += len(texts)
        return out

    async def decode_jobs(self, jobs: list[DecodeJob]) -> AsyncIterator[list[Any]]:
        """All rows of all jobs decode together, one token per step; each step yields, per job,
        the updates of its rows, then StopIteration once it is done (as @serve.batch wants)."""
        owners = [(job_index, row) for job_index, job in enumerate(jobs)
                  for row in range(len(job.prompts))]
        decoding = await asyncio.to_thread(
            self.predictor.start, [p for job in jobs for p in job.prompts],
            [p for job in jobs for p in job.params])
        unfinished = [len(job.prompts) for job in jobs]
        done: set[int] = set()
        while not decoding.finished:
            gone = {j for j, job in enumerate(jobs) if job.abandoned and j not in done}
            if gone:
                decoding.cancel({i for i, (j, _) in enumerate(owners) if j in gone})
                done.update(gone)
                if decoding.finished:
                    break
            updates = await asyncio.to_thread(decoding.step)
            per_job: list[list[RowUpdate]] = [[] for _ in jobs]
            for (job_index, row), update in zip(owners, updates):
                if update is not None:
                    per_job[job_index].append((row, update))
                    unfinished[job_index] -= update.finish_reason is not None
            yield [StopIteration if j in done else per_job[j] for j in range(len(jobs))]
            done.update(j for j in range(len(jobs)) if unfinished[j] == 0)

    def rows_for(self, body: CompletionBody) -> DecodeJob:
        """Validate a completion request against the limits and turn it into decoding rows."""
        limits, predictor = self.limits, self.predictor
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", "prompt")
        if len(prompts) * body.n > limits.max_inputs:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceed the limit of "
                                f"{limits.max_inputs} completions per request", "n")
        max_tokens = body.max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_new_tokens)
        if max_tokens > limits.max_new_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the limit of "
                                f"{limits.max_new_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings", "stop")
        encoded = [predictor.encode(prompt) for prompt in prompts]
        for ids in encoded:
            if len(ids) > limits.max_prompt_tokens:
                raise APIError(400, f"a prompt of {len(ids)} tokens exceeds the limit of "
                                    f"{limits.max_prompt_tokens}", "prompt", "prompt_too_long")
            if len(ids) + max_tokens > predictor.context_length:
                raise APIError(400, f"this model's context is {predictor.context_length} tokens; "
                                    f"the prompt has {len(ids)} and max_tokens is {max_tokens}",
                               "max_tokens", "context_length_exceeded")
        rows = [ids for ids in encoded for _ in range(body.n)]
        # Choice i samples with seed + i: reproducible, yet the n choices differ.
        params = [SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, tuple(stop),
                                 None if body.seed is None else (body.seed + i) % SEED_LIMIT)
                  for i in range(len(rows))]
        return DecodeJob(rows, params)


# ---- routes -------------------------------------------------------------------------------------

def server_of(request: Request) -> ModelServer:
    return request.app.state.server


async def require_key(request: Request) -> None:
    if not authorized(request.headers.get("authorization"), server_of(request).key_digests):
        raise APIError(401, "a valid API key is required: Authorization: Bearer KEY",
                       code="invalid_api_key")


def require_family(server: ModelServer, family: str, route: str) -> None:
    if server.family != family:
        other = "/v1/completions" if server.family == "gpt" else "/v1/classify"
        raise APIError(404, f"{route} is not served by this {server.family} model; use {other}",
                       code="unsupported_route")


def require_model(server: ModelServer, name: str | None) -> None:
    if name is not None and name != server.model_name:
        raise APIError(404, f"model {name!r} does not exist; this service serves "
                            f"{server.model_name!r}", "model", "model_not_found")


router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(server_of(request))]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    server = server_of(request)
    require_model(server, model_id)
    return model_card(server)


def model_card(server: ModelServer) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": server.created,
            "owned_by": "orchestrator", "family": server.family}


@router.post("/classify")
async def classify(body: ClassifyBody, request: Request) -> dict[str, Any]:
    server = server_of(request)
    require_family(server, "classifier", "/v1/classify")
    require_model(server, body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input must not be an empty list", "input")
    if len(texts) > server.limits.max_inputs:
        raise APIError(400, f"{len(texts)} inputs exceed the limit of {server.limits.max_inputs}",
                       "input")
    if any(not text.strip() for text in texts):
        raise APIError(400, "input must not contain empty strings", "input")
    async with timeout_as_408(server):
        predictions = await server.classify(texts)
    return {"object": "list", "model": server.model_name,
            "data": [{"index": i, **p} for i, p in enumerate(predictions)]}


@router.post("/completions", response_model=None)
async def completions(body: CompletionBody, request: Request) -> dict[str, Any] | StreamingResponse:
    started = time.perf_counter()
    server = server_of(request)
    require_family(server, "gpt", "/v1/completions")
    require_model(server, body.model)
    job = server.rows_for(body)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": server.model_name}
    prompt_tokens = sum(len(ids) for ids in job.prompts[:: body.n])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_events(server, job, head, prompt_tokens, include_usage, started),
            media_type="text/event-stream")
    texts, finishes, tokens = [""] * len(job.prompts), [""] * len(job.prompts), [0] * len(job.prompts)
    async with timeout_as_408(server):
        async for updates in server.decode(job):
            for row, update in updates:
                texts[row] += update.text
                tokens[row] = update.completion_tokens
                finishes[row] = update.finish_reason or finishes[row]
    metrics.record("serve_generated_tokens", sum(tokens), app=server.app_name)
    choices = [{"text": text, "index": row, "logprobs": None, "finish_reason": finish}
               for row, (text, finish) in enumerate(zip(texts, finishes))]
    return {**head, "choices": choices, "usage": usage(prompt_tokens, sum(tokens))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_events(server: ModelServer, job: DecodeJob, head: dict[str, Any],
                        prompt_tokens: int, include_usage: bool,
                        started: float) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a chunk per new text, then `data: [DONE]`.
    A timeout mid-stream can no longer change the status code: it ends with an error event."""
    tokens = [0] * len(job.prompts)
    first_token = True
    try:
        async with asyncio.timeout(server.limits.request_timeout_s):
            async for updates in server.decode(job):
                for row, update in updates:
                    tokens[row] = update.completion_tokens
                    if first_token and update.completion_tokens:
                        first_token = False
                        metrics.record("serve_time_to_first_token_seconds",
                                       time.perf_counter() - started, app=server.app_name)
                    if update.text or update.finish_reason:
                        choice = {"text": update.text, "index": row, "logprobs": None,
                                  "finish_reason": update.finish_reason}
                        yield sse({**head, "choices": [choice]})
    except TimeoutError:
        yield sse({"error": timeout_error(server)})
        return
    finally:
        metrics.record("serve_generated_tokens", sum(tokens), app=server.app_name)
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompt_tokens, sum(tokens))})
    yield "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def timeout_error(server: ModelServer) -> dict[str, Any]:
    return {"message": f"the request took longer than {server.limits.request_timeout_s:g} s",
            "type": ERROR_TYPES[408], "param": None, "code": "request_timeout"}


@asynccontextmanager
async def timeout_as_408(server: ModelServer) -> AsyncIterator[None]:
    """serve.request_timeout_s for a whole request; past it the client gets a 408."""
    try:
        async with asyncio.timeout(server.limits.request_timeout_s):
            yield
    except TimeoutError:
        error = timeout_error(server)
        raise APIError(408, error["message"], code=error["code"]) from None


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
            metrics.record("serve_requests", 1, app=self.app_name, route=route,
                           status=str(status))
            metrics.record("serve_latency_seconds", time.perf_counter() - started,
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


def create_api(server: ModelServer) -> FastAPI:
    """The FastAPI app around one ModelServer (Serve builds it on each replica)."""
    api = FastAPI(title="orchestrator model service")
    api.state.server = server
    api.add_middleware(RequestMetrics, app_name=server.app_name)
    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(HTTPException, _http_error)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "family": server.family, "model": server.model_name,
                "version": server.version}

    api.include_router(router)
    return api
