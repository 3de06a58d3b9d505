"""What one replica (or one plain uvicorn process) holds: the loaded bundle, its engine, and the
work between an HTTP body and the engine: checking a request against the limits, tokenizing texts
(or decoding token ids) off the event loop after a cheap length check, and gathering the engine's
outputs.

With serve.adapters, the model is the run's pretrained base and each adapter another name a
request may give (`<adapter>` or `<model>:<adapter>`); the engine decodes them in one batch.

On Ray Serve the engine batches continuously up to `serve.max_batch_size` rows; `batching=False`
(plain uvicorn, the serve benchmark's baseline) gives it batches of one, so requests take turns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

import torch
from ray import serve

from orchestrator import prometheus
from orchestrator.inference.engine import (
    AsyncEngine,
    ChoiceUpdate,
    Engine,
    EngineError,
    QueueFull,
    RequestOutput,
    TokenLogprob,
)
from orchestrator.inference.predictor import Predictor
from orchestrator.inference.sampling import SamplingParams
from orchestrator.serve.protocol import DEFAULT_MAX_TOKENS, APIError, CompletionBody, overloaded
from orchestrator.serve.quotas import InProcess, QuotaCheck, ledger_for, refused
from orchestrator.spec import ServeSpec, Task
from orchestrator.tokenizer import MAX_RUN
from orchestrator.weights.adapters import AdapterPool, base_bundle
from orchestrator.weights.model import load_bundle

logger = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 1024
INLINE_DECODE_TOKENS = 256  # about the text of INLINE_TOKENIZE_CHARS


@dataclass
class CompletionJob:
    """One completion request, checked and tokenized: its rows (prompt x n) and what to answer."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    echo: list[str] | None  # per row, the prompt text to put before the completion
    logprobs: bool
    prompt_tokens: int
    adapter: str | None = None  # the LoRA adapter it decodes with; None: the model itself


@dataclass
class CompletionChoice:
    """One row's answer gathered from the engine's updates."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # offsets in the completion
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # offsets in the prompt


class ModelServer:
    """A loaded bundle and the engine around it; one per replica (or per uvicorn process)."""

    def __init__(self, bundle_dir: str, limits: ServeSpec, key_digests: list[str],
                 batching: bool = True, app_name: str | None = None,
                 auth_required: bool | None = None, model_name: str | None = None,
                 quota: QuotaCheck | None = None):
        """model_name: the name requests give (default: the bundle's job name). quota: the
        ledger every replica shares (default, with serve.quotas set: one in this process)."""
        bundle = base_bundle(bundle_dir) if limits.adapters else load_bundle(bundle_dir)
        if limits.replica_gpus > 0 and torch.cuda.is_available():
            bundle.model.to("cuda")
        self.adapters = (AdapterPool(bundle.model, limits.adapters, limits.max_adapters)
                         if limits.adapters else None)
        self.predictor = Predictor(bundle)
        self.tokenizer = bundle.tokenizer
        self.info = bundle.info
        self.task = bundle.info.task
        self.model_name = model_name or bundle.spec.name
        self.app_name = app_name or self.model_name  # the `app` tag of this server's metrics
        self.version = bundle.version  # which weights answer
        self.created = int(time.time())
        self.limits = limits
        self.key_digests = key_digests
        if quota is None and limits.quotas is not None:
            quota = InProcess(ledger_for(limits.quotas, key_digests))
        self.quota = quota
        # Keys fail closed: a configured source that yielded no key lets nobody in.
        self.auth_required = (bool(limits.api_keys_env or limits.api_keys_file)
                              if auth_required is None else auth_required) or bool(key_digests)
        # Bytes one token can cover at most: a prompt of more bytes than max_prompt_tokens of
        # these is too long without tokenizing it.
        vocab = self.tokenizer.get_vocab()
        self.max_token_bytes = max(len(token.encode()) for token in vocab) if vocab else 1
        self.batching = batching
        self.model_lock = asyncio.Lock()
        self.engine: AsyncEngine | None = None
        if self.task == Task.LANGUAGE_MODEL:
            engine = Engine(bundle.model, bundle.tokenizer, bundle.info.eos_id,
                            limits.max_batch_size if batching else 1, self.adapters)
            self.engine = AsyncEngine(engine, limits.max_queued_requests, self.record_batch)
        elif batching:
            self.classify_batch.set_max_batch_size(limits.max_batch_size)
            self.classify_batch.set_batch_wait_timeout_s(limits.batch_wait_timeout_s)

    def record_batch(self, rows: int) -> None:
        prometheus.record("serve_batch_size", rows, app=self.app_name, route="/v1/completions")

    @property
    def context_length(self) -> int:
        return self.predictor.context_length

    @property
    def adapter_names(self) -> list[str]:
        return self.adapters.names if self.adapters is not None else []

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a request's `model` names: None for the model itself (or no name),
        `<adapter>` or `<model>:<adapter>` for one of its adapters; 404 naming what is served
        for anything else."""
        if model is None or model == self.model_name:
            return None
        adapter = model.removeprefix(f"{self.model_name}:")
        if adapter in self.adapter_names:
            return adapter
        served = ", ".join(repr(name) for name in [self.model_name, *self.adapter_names])
        raise APIError(404, f"model {model!r} does not exist; this service serves {served}",
                       "model", "model_not_found")

    async def check_health(self) -> None:
        """Raises when the model cannot answer; Serve then replaces the replica. It decodes on
        an engine of its own, so a full queue does not make a busy replica look sick."""
        if self.task == Task.LANGUAGE_MODEL:
            ids = [self.predictor.encode("a")]
            await asyncio.to_thread(self.predictor.complete, ids, [SamplingParams(1, 0.0)])
        else:
            await asyncio.to_thread(self.predictor.classify, ["a"])

    # ---- classification ------------------------------------------------------------------

    async def classify(self, texts: list[str]) -> list[dict]:
        if self.batching:
            result = await self.classify_batch(texts)
        else:
            async with self.model_lock:
                result = (await self.classify_lists([texts]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch
    async def classify_batch(self, texts_per_request: list[list[str]]
                             ) -> list[list[dict] | Exception]:
        prometheus.record("serve_batch_size", len(texts_per_request), app=self.app_name,
                          route="/v1/classify")
        return await self.classify_lists(texts_per_request)

    async def classify_lists(self, texts_per_request: list[list[str]]
                             ) -> list[list[dict] | Exception]:
        """Each request's predictions, or the error of its own inputs: Serve sets an error the
        batch raises on every request in it, so a batch that fails is retried request by
        request, and only a request whose inputs fail gets an error."""
        flat = [text for texts in texts_per_request for text in texts]
        try:
            predictions = await asyncio.to_thread(self.predictor.classify, flat)
        except Exception:  # noqa: BLE001 - whatever failed, each request is retried alone
            return [await self._classify_alone(texts) for texts in texts_per_request]
        out, start = [], 0
        for texts in texts_per_request:
            out.append(predictions[start: start + len(texts)])
            start += len(texts)
        return out

    async def _classify_alone(self, texts: list[str]) -> list[dict] | Exception:
        try:
            return await asyncio.to_thread(self.predictor.classify, texts)
        except Exception as error:
            logger.exception("classifying one request's inputs failed")
            return error

    # ---- quotas and usage, per API key ----------------------------------------------------

    async def admit(self, key: str | None, prompt_tokens: int = 0, reserved: int = 0
                    ) -> int | None:
        """Count a request of the key (its id; None when no keys are configured) against its
        quota, charging its prompt tokens plus `reserved` (a completion's max_tokens), and meter
        it; 429 past a limit. Returns the ticket `finish` settles, if any."""
        if key is None:
            return None
        ticket = None
        if self.quota is not None:
            admission = await self.quota.admit(key, prompt_tokens + reserved)
            if admission.refusal is not None:
                prometheus.record("serve_key_rate_limited", 1, app=self.app_name, key=key,
                                  limit=admission.refusal.limit)
                raise refused(admission.refusal)
            ticket = admission.ticket
        prometheus.record("serve_key_requests", 1, app=self.app_name, key=key)
        prometheus.record("serve_key_prompt_tokens", prompt_tokens, app=self.app_name, key=key)
        return ticket

    def finish(self, key: str | None, ticket: int | None, prompt_tokens: int,
               completion_tokens: int) -> None:
        """Meter a completion's tokens and settle its reservation to what it used (without
        waiting for the ledger)."""
        if key is None:
            return
        prometheus.record("serve_key_completion_tokens", completion_tokens, app=self.app_name,
                          key=key)
        if ticket is not None and self.quota is not None:
            self.quota.settle(key, ticket, prompt_tokens + completion_tokens)

    async def classify_tokens(self, texts: list[str]) -> int:
        """The tokens the classifier reads of these texts (each cut to its context)."""
        return sum(min(len(ids), self.info.context_length) for ids in await self.tokenize(texts))

    # ---- tokens ----------------------------------------------------------------------------

    def check_prompt_bytes(self, text: str, limit: int) -> None:
        """The cheap length check, before any tokenizing."""
        if len(text) > limit * self.max_token_bytes or len(text.encode()) > limit * self.max_token_bytes:
            raise APIError(400, f"a prompt this long exceeds the limit of {limit} tokens",
                           "prompt", "prompt_too_long")

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, computed off the event loop (texts already passed the cheap
        length check); a few short texts are tokenized inline, where a thread hop would cost
        more than the tokenizing (tens of microseconds)."""
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            encodings = self.tokenizer.encode_batch(texts)
        else:
            encodings = await asyncio.to_thread(self.tokenizer.encode_batch, texts)
        return [encoding.ids for encoding in encodings]

    async def detokenize(self, prompts: list[list[int]]) -> list[str]:
        """Each token-id list's text, decoded off the event loop as texts are tokenized (lists
        already passed the length check; a few short ones are decoded inline)."""
        if sum(map(len, prompts)) <= INLINE_DECODE_TOKENS:
            return self.tokenizer.decode_batch(prompts)
        return await asyncio.to_thread(self.tokenizer.decode_batch, prompts)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """min and max run in C: cheap for a list that passed the length check."""
        if ids and not (min(ids) >= 0 and max(ids) < self.info.vocab_size):
            raise APIError(400, f"token ids must be in 0..{self.info.vocab_size - 1}", param,
                           "invalid_token_id")

    @property
    def max_text_chars(self) -> int:
        """A classifier reads the first context_length tokens of a text, which never cover more
        characters than this."""
        return self.info.context_length * self.max_token_bytes

    def readable(self, texts: list[str]) -> list[str]:
        """Each text cut to what the model can read, plus one pre-token's run (MAX_RUN): it is
        classified as the whole text is (as batch inference and training truncate it), without
        tokenizing, in a batch others share, what the model would never read."""
        keep = self.max_text_chars + MAX_RUN
        return [text[:keep] for text in texts]

    # ---- completions ----------------------------------------------------------------------

    async def completion_job(self, body: CompletionBody) -> CompletionJob:
        """Check a completion request against the limits and tokenize it."""
        limits = self.limits
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", "prompt")
        if len(prompts) * body.n > limits.max_inputs:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceed the limit of "
                                f"{limits.max_inputs} completions per request", "n")
        max_tokens = (body.max_tokens if body.max_tokens is not None
                      else min(DEFAULT_MAX_TOKENS, limits.max_new_tokens))
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (scoring a prompt)", "max_tokens")
        if max_tokens > limits.max_new_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the limit of "
                                f"{limits.max_new_tokens}", "max_tokens")
        body.stop_strings()
        if self.engine.full:
            raise overloaded(self.engine.engine.num_waiting)
        if isinstance(prompts[0], str):
            for text in prompts:
                self.check_prompt_bytes(text, limits.max_prompt_tokens)
            encoded = [ids or [self.info.eos_id] for ids in await self.tokenize(prompts)]
            for ids in encoded:
                self.check_prompt_tokens(ids, max_tokens)
            echo_texts = list(prompts)
        else:
            for ids in prompts:
                if not ids:
                    raise APIError(400, "a prompt of token ids must not be empty", "prompt")
                self.check_prompt_tokens(ids, max_tokens)  # the cheap check first
                self.check_token_ids(ids, "prompt")
            encoded = prompts
            echo_texts = await self.detokenize(prompts) if body.echo else []
        rows = [ids for ids in encoded for _ in range(body.n)]
        params = [body.to_sampling_params(max_tokens, i) for i in range(len(rows))]
        echo = [text for text in echo_texts for _ in range(body.n)] if body.echo else None
        return CompletionJob(rows, params, echo, body.logprobs is not None,
                             sum(len(ids) for ids in encoded), self.adapter_of(body.model))

    def check_prompt_tokens(self, ids: list[int], max_tokens: int) -> None:
        limit = self.limits.max_prompt_tokens
        if len(ids) > limit:
            raise APIError(400, f"a prompt of {len(ids)} tokens exceeds the limit of {limit}",
                           "prompt", "prompt_too_long")
        if len(ids) + max_tokens > self.context_length:
            raise APIError(400, f"this model's context is {self.context_length} tokens; the "
                                f"prompt has {len(ids)} and max_tokens is {max_tokens}",
                           "max_tokens", "context_length_exceeded")

    async def outputs(self, job: CompletionJob) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for this job; closing early aborts it. A full queue is 503."""
        try:
            async with aclosing(self.engine.generate(job.prompts, job.params,
                                                     job.adapter)) as outputs:
                async for output in outputs:
                    yield output
        except QueueFull:
            raise overloaded(self.engine.engine.num_waiting) from None

    async def complete(self, job: CompletionJob) -> list[CompletionChoice]:
        """Every row decoded to its end (non-streaming)."""
        choices = [CompletionChoice() for _ in job.prompts]
        async with aclosing(self.outputs(job)) as outputs:
            async for output in outputs:
                if output.error is not None:
                    raise engine_error(output.error)
                for row, update in output.updates:
                    gather(choices[row], update)
        return choices


def gather(choice: CompletionChoice, update: ChoiceUpdate) -> None:
    choice.text += update.text
    choice.completion_tokens = update.completion_tokens
    choice.finish_reason = update.finish_reason or choice.finish_reason
    if update.prompt_logprobs is not None:
        choice.prompt_logprobs = update.prompt_logprobs
    choice.logprobs += update.logprobs


def engine_error(error: EngineError) -> APIError:
    return APIError(500, error.message, code=error.code)


@asynccontextmanager
async def timeout_as_408(server: ModelServer) -> AsyncIterator[None]:
    """serve.request_timeout_s for a whole request; past it the client gets a 408."""
    try:
        async with asyncio.timeout(server.limits.request_timeout_s):
            yield
    except TimeoutError:
        raise APIError(408, timeout_message(server), code="request_timeout") from None


def timeout_message(server: ModelServer) -> str:
    return f"the request took longer than {server.limits.request_timeout_s:g} s"
