"""The completions API's protocol, after vLLM's entrypoints/openai/protocol.py: request bodies,
OpenAI-shaped errors, and the conversion of a request into the engine's sampling parameters.

Every error uses OpenAI's shape {"error": {"message", "type", "param", "code"}}. A field we do
not support is refused by name (the bodies forbid unknown fields).
"""

# No `from __future__ import annotations`: FastAPI must see the request models as classes.
import logging
from typing import Annotated, Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from starlette.exceptions import HTTPException

from orchestrator.inference.sampling import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP_STRINGS = 4  # OpenAI's cap
MAX_STOP_CHARS = 64  # per stop string: each step searches the text for every one
SEED_LIMIT = 2**63
RETRY_AFTER_S = 1

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "overloaded_error"}


# ---- errors -------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param, "code": code}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": error_body(status, message, param, code)})


def overloaded(waiting: int) -> APIError:
    return APIError(503, f"this replica is at capacity ({waiting} requests waiting); retry "
                         f"after {RETRY_AFTER_S} s", code="overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


async def api_error(_: Request, error: APIError) -> JSONResponse:
    return error_response(error.status, error.message, error.param, error.code, error.headers)


async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
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


async def http_error(_: Request, error: HTTPException) -> JSONResponse:
    """Unknown routes (404) and methods (405) answer in the same shape as other errors."""
    return error_response(error.status_code, str(error.detail), headers=error.headers)


# ---- request bodies -----------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _valid_unicode(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no tokenizer takes: refused here, in
    its own request, before it can reach a batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {error.start}") from None
    return text


# A list stops at its first bad item: a 1 MB list of floats tried against every prompt type
# collected 750,000 errors and held the event loop for seconds.
FAIL_FAST = Field(fail_fast=True)
Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
Texts = Annotated[list[Text], FAIL_FAST]
TokenIds = Annotated[list[StrictInt], FAIL_FAST]


class StreamOptions(_Body):
    include_usage: StrictBool = False


class CompletionBody(_Body):
    model: StrictStr
    prompt: Text | Texts | TokenIds | Annotated[list[TokenIds], FAIL_FAST]
    max_tokens: StrictInt | None = Field(None, ge=0, description="0 with echo scores the prompt.")
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0, description="0 is off; an extension, as in vLLM.")
    stop: Text | Texts | None = None
    n: StrictInt = Field(1, ge=1)
    seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    presence_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool = Field(False, description="Generate max_tokens even past EOS; an "
                                                      "extension, as in vLLM (for benchmarks).")

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: of texts, or of token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(token, int) for token in prompt):
            return [prompt]  # type: ignore[list-item]  # one prompt of token ids
        return prompt  # type: ignore[return-value]

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings of at most "
                                f"{MAX_STOP_CHARS} characters", "stop")
        return tuple(stop)

    def to_sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """Choice i samples with seed + i: reproducible, yet the n choices differ."""
        try:
            return SamplingParams(
                max_tokens, self.temperature, self.top_p, self.top_k, self.stop_strings(),
                None if self.seed is None else (self.seed + choice) % SEED_LIMIT,
                self.presence_penalty, self.frequency_penalty, logprobs=self.logprobs,
                prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None,
                ignore_eos=self.ignore_eos)
        except ValueError as error:  # the body's bounds make this rare (NaN cannot come in JSON)
            raise APIError(400, str(error)) from None


class ClassifyBody(_Body):
    model: StrictStr | None = None
    input: Text | Texts


class TokenizeBody(_Body):
    """vLLM's POST /tokenize (for completions)."""

    model: StrictStr | None = None
    prompt: Text
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeBody(_Body):
    """vLLM's POST /detokenize."""

    model: StrictStr | None = None
    tokens: TokenIds
