"""The HTTP service on Ray Serve: routes, request schemas, batching and the deploy call.

  GET  /healthz                                            liveness and what model is loaded
  POST /classify  {"texts": [...]}                         labels, scores (classifier)
  POST /generate  {"prompt", "max_tokens", "temperature", "top_k", "seed"}   text (language model)

Bad requests get a 4xx JSON body {"error": {"message", "field"}} and the replica keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models as classes
# to read them from the body.
import time
from pathlib import Path
from typing import Any

import requests
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve
from starlette.exceptions import HTTPException

from orchestrator.bundle import load_bundle
from orchestrator.serve.predictor import GenerationRequest, Predictor
from orchestrator.spec import JobSpec, ServeSpec

APP_NAME_SUFFIX = "-service"
DEFAULT_MAX_TOKENS = 32


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(min_length=1)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    max_tokens: StrictInt | None = Field(
        None, ge=1, description="Default: DEFAULT_MAX_TOKENS, capped by serve.max_new_tokens.")
    temperature: float = Field(1.0, ge=0.0)
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = Field(None, ge=0, lt=2**64, description="torch accepts 64 bits.")


class RequestError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def error_response(status: int, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "field": field}})


api = FastAPI(title="orchestrator model service")


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"] if p != "body") or None
    if first["type"] == "json_invalid":
        return error_response(400, f"malformed JSON: {first['msg']}")
    return error_response(422, first["msg"], field)


@api.exception_handler(HTTPException)
async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
    """Unknown routes (404) and methods (405) answer in the same shape as other bad requests."""
    return error_response(error.status_code, str(error.detail), headers=error.headers)


@api.exception_handler(RequestError)
async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    return error_response(error.status, error.message, error.field)


@serve.deployment(health_check_period_s=10)
@serve.ingress(api)
class ModelService:
    """One replica: the bundle loaded once, requests batched with @serve.batch."""

    def __init__(self, bundle_dir: str, serve_spec: dict[str, Any]):
        self.limits = ServeSpec.model_validate(serve_spec)
        self.predictor = Predictor(load_bundle(bundle_dir))
        self.family = self.predictor.info.family
        for method in (self.classify_batch, self.generate_batch):
            method.set_max_batch_size(self.limits.max_batch_size)
            method.set_batch_wait_timeout_s(self.limits.batch_wait_timeout_s)

    def check_health(self) -> None:
        """Serve marks the replica unhealthy (and replaces it) when the model cannot answer."""
        if self.family == "gpt":
            self.predictor.generate([GenerationRequest("a", 1, 0.0, 0)])
        else:
            self.predictor.classify(["a"])

    def _require(self, family: str, route: str) -> None:
        if self.family != family:
            other = "/generate" if self.family == "gpt" else "/classify"
            raise RequestError(404, f"{route} is not served by this {self.family} model; "
                                    f"use {other}")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "family": self.family, "name": self.predictor.bundle.spec.name}

    @serve.batch
    async def classify_batch(self, texts_per_request: list[list[str]]) -> list[list[dict]]:
        flat = [text for texts in texts_per_request for text in texts]
        predictions = self.predictor.classify(flat)
        out, start = [], 0
        for texts in texts_per_request:
            out.append(predictions[start: start + len(texts)])
            start += len(texts)
        return out

    @serve.batch
    async def generate_batch(self, batch: list[GenerationRequest]) -> list[dict]:
        return self.predictor.generate(batch)

    @api.post("/classify")
    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        self._require("classifier", "/classify")
        if len(body.texts) > self.limits.max_texts:
            raise RequestError(422, f"{len(body.texts)} texts exceed the limit of "
                                    f"{self.limits.max_texts}", "texts")
        if any(not text.strip() for text in body.texts):
            raise RequestError(422, "texts must not be empty strings", "texts")
        return {"predictions": await self.classify_batch(body.texts)}

    @api.post("/generate")
    async def generate(self, body: GenerateRequest) -> dict[str, Any]:
        self._require("gpt", "/generate")
        if len(body.prompt) > self.limits.max_prompt_chars:
            raise RequestError(422, f"prompt of {len(body.prompt)} characters exceeds the "
                                    f"limit of {self.limits.max_prompt_chars}", "prompt")
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.limits.max_new_tokens)
        if max_tokens > self.limits.max_new_tokens:
            raise RequestError(422, f"max_tokens {max_tokens} exceeds the limit of "
                                    f"{self.limits.max_new_tokens}", "max_tokens")
        request = GenerationRequest(body.prompt, max_tokens, body.temperature, body.top_k,
                                    body.seed)
        return {"prompt": body.prompt, **await self.generate_batch(request)}


def endpoint_url(spec: JobSpec) -> str:
    return f"http://{spec.serve.host}:{spec.serve.port}"


def app_name(spec: JobSpec) -> str:
    return spec.name + APP_NAME_SUFFIX


def deploy(spec: JobSpec, bundle_dir: str | Path, timeout_s: float = 120.0) -> str:
    """Deploy the bundle as an application and wait until /healthz answers; return the URL."""
    serve.start(http_options={"host": spec.serve.host, "port": spec.serve.port})
    limits = spec.serve
    deployment = ModelService.options(
        num_replicas=limits.num_replicas,
        # Room for a full batch to queue on each replica (Serve's default of 5 caps batches).
        max_ongoing_requests=max(5, 2 * limits.max_batch_size),
        ray_actor_options={"num_cpus": limits.replica_cpus},
    )
    serve.run(deployment.bind(str(Path(bundle_dir).resolve()), limits.model_dump(mode="json")),
              name=app_name(spec), route_prefix="/", blocking=False)
    url = endpoint_url(spec)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service at {url} did not become healthy in {timeout_s:.0f} s")
        time.sleep(0.5)


def shutdown(spec: JobSpec) -> None:
    serve.delete(app_name(spec))
