"""The continuous-batching engine of one replica: plain Python and torch, no Ray, no HTTP.

One loop owns the KV cache. Every `Engine.step()`:

1. drops the requests whose callers left (`abort`: timed out, disconnected);
2. admits waiting requests, oldest first, while their rows fit in `max_batch_size`: their prompts
   are prefilled together in one forward and their keys and values join the running cache;
3. picks one token for every running row (greedy, or sampled from the row's own seeded
   generator), turns it into text, checks stop strings, and retires the rows that finished;
4. runs one (rows, 1) forward for the rows still going.

Rows are left-padded into one cache whose columns are shared: a row admitted mid-flight is placed
so that its last prompt token sits in the newest column (the cache grows to the left when a new
prompt is longer than the columns so far), and columns that every row has as padding are dropped
when the cache needs room. A row's keys and values depend only on its own tokens and positions,
so where a row sits changes nothing it computes.

Adapters: with an AdapterPool (weights/adapters.py), a request may name one of the base's LoRA
adapters. Each row carries the slot its adapter was loaded into (0: none) from admission to
retirement, and every forward (prefill and decode) is told each row's slot, so rows of different
adapters decode in one batch. A request whose adapter has no free slot (every slot held by an
adapter that running rows use) waits at the head of the queue until one frees.

Isolation: anything that belongs to one request (non-finite logits, probabilities that cannot be
sampled, a detokenization error) fails that request alone, with an `EngineError`; the other rows
keep decoding. A failure of the shared forward itself fails the rows in it and the engine goes on.

`AsyncEngine` drives an Engine from asyncio: a thread of its own steps it while there is work and
hands each request its outputs through the request's queue on the event loop; a bounded waiting
queue refuses new requests (`QueueFull`) instead of growing without end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from orchestrator.inference.sampling import (
    SamplingParams,
    apply_penalties,
    request_generator,
    sampling_probs,
    valid_probs,
)
from orchestrator.models.decoding import Decoder, DecodingCache
from orchestrator.weights.adapters import AdapterPool, NoFreeSlot

logger = logging.getLogger(__name__)

INCOMPLETE = "\ufffd"  # what a byte-level BPE decodes an unfinished UTF-8 sequence to
LOGPROB_FLOOR = -9999.0  # as vLLM: -inf is not JSON
MAX_PENDING_TOKENS = 6  # a character spans at most 4 tokens (4 UTF-8 bytes)


class EngineError(Exception):
    """A failure that belongs to one request; `code` is OpenAI-style (snake case)."""

    def __init__(self, message: str, code: str = "generation_failed"):
        super().__init__(message)
        self.message, self.code = message, code


class QueueFull(Exception):
    """The replica's waiting queue is full: the caller should retry later or elsewhere."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token as the completions API's `logprobs` reports it."""

    token: str
    logprob: float | None  # None for a prompt's first token (nothing precedes it)
    top: dict[str, float] | None  # the most likely tokens at this position and their logprobs
    offset: int  # where the token's text starts in the row's text (prompt or completion)


@dataclass
class ChoiceUpdate:
    """What one row produced in one step."""

    text: str  # new text since this row's previous update (may be "")
    finish_reason: str | None  # None while generating; "stop" (EOS or stop string) or "length"
    completion_tokens: int  # tokens generated so far for this row
    logprobs: list[TokenLogprob] = field(default_factory=list)  # for the tokens new this step
    prompt_logprobs: list[TokenLogprob] | None = None  # once, at admission, when asked for


@dataclass
class RequestOutput:
    request_id: Hashable
    updates: list[tuple[int, ChoiceUpdate]] = field(default_factory=list)  # (row index, update)
    finished: bool = False
    error: EngineError | None = None


@dataclass(eq=False)  # one request is equal only to itself: remove() must take that one
class _Request:
    id: Hashable
    rows: list[_Row]
    unfinished: int
    error: EngineError | None = None
    adapter: str | None = None  # the LoRA adapter its rows decode with; None: the base

    @property
    def done(self) -> bool:
        return self.error is not None or self.unfinished == 0


@dataclass
class _Row:
    """One prompt's progress: its generated ids, its text (cut before a stop string), how much of
    it was sent, and why it ended."""

    request: _Request
    index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    slot: int = 0  # its adapter's slot in the AdapterPool while it runs (0: the base)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not sent yet

    def add(self, token: int, eos_id: int, tokenizer: Tokenizer,
            entry: tuple[str, float, dict[str, float] | None] | None) -> ChoiceUpdate:
        """Take the next token; return the text that became final, and the finish if it ended."""
        if token == eos_id and not self.params.ignore_eos:
            self.finish_reason = "stop"
        else:
            offset = len(self.text)
            self.ids.append(token)
            self.text = tokenizer.decode(self.ids)
            if entry is not None:
                self.logprobs.append(TokenLogprob(*entry, offset))
            cut = _first_stop(self.text, self.params.stop)
            if cut is not None:
                self.text, self.finish_reason = self.text[:cut], "stop"
            elif len(self.ids) >= self.params.max_tokens:
                self.finish_reason = "length"
        end = len(self.text) if self.finish_reason else _settled(self.text, self.params.stop)
        new, self.sent = self.text[self.sent:end], end
        logprobs, self.logprobs = self.logprobs, []
        return ChoiceUpdate(new, self.finish_reason, len(self.ids), logprobs)


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found, default=None)


def _settled(text: str, stop: tuple[str, ...]) -> int:
    """How much of an unfinished row's text is final: all but a trailing incomplete character and
    the longest tail that could still grow into a stop string."""
    text = text.rstrip(INCOMPLETE)
    for n in range(min(max(map(len, stop), default=1) - 1, len(text)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return len(text) - n
    return len(text)


def text_offsets(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """len(tokenizer.decode(ids[:j])) for each j in 0..len(ids) - 1, in linear time.

    After vLLM's incremental detokenizer: each offset decodes a window of a few tokens, from
    the text settled before the latest settled point, instead of the whole prefix (quadratic:
    every prompt prefix decoded on the engine thread). A character split over tokens, or a
    decoder that treats a sequence's first token apart, comes out as the whole prefix's decode
    gives it: the window's start cuts between whole characters, and both texts compared share it.
    A window whose text ends unfinished waits for more tokens, at most MAX_PENDING_TOKENS (bytes
    no token can finish, which a token-id prompt may hold, would otherwise grow it without end).
    """
    offsets = [0] * min(len(ids), 1)
    start = settled = 0  # the window's first token; where the text is settled
    settled_chars = head_chars = 0  # len(decode(ids[:settled])); len(decode(ids[start:settled]))
    for j in range(1, len(ids)):
        window = tokenizer.decode(ids[start:j])
        offsets.append(settled_chars + len(window) - head_chars)
        if not window.endswith(INCOMPLETE) or j - settled >= MAX_PENDING_TOKENS:
            start, settled, settled_chars = settled, j, offsets[-1]
            head_chars = len(tokenizer.decode(ids[start:settled]))
    return offsets


def _bytes_to_unicode() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-character table that byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_UNICODE_TO_BYTE = _bytes_to_unicode()


def model_device(model: nn.Module) -> torch.device:
    """Where the model runs, from its first parameter (an int8 model's embedding has no plain
    weight tensor to ask)."""
    return next(model.parameters(), torch.empty(0)).device


class Engine:
    """Continuous batching over one language model and its cache; see the module docstring."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, eos_id: int, max_batch_size: int = 8,
                 adapters: AdapterPool | None = None):
        """adapters: the LoRA adapters requests may name, already put in the model's layers."""
        self.model, self.tokenizer, self.eos_id = model, tokenizer, eos_id
        self.max_batch_size = max_batch_size
        self.adapters = adapters
        self.vocab_size = model.wte.num_embeddings
        self.context_length = model.block_size
        self._device = model_device(model)
        self._waiting: deque[_Request] = deque()  # appended from other threads: deque is safe
        self._aborts: deque[Hashable] = deque()
        self._running: list[_Row] = []  # in cache order
        self._cache: DecodingCache | None = None
        self._logits: torch.Tensor | None = None  # (running rows, vocab): their next token
        self._token_strs: dict[int, str] = {}
        self.last_batch_size = 0  # rows decoded by the latest step (for metrics)

    # ---- what callers use (add and abort may be called from another thread than step) ---------

    def check(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Raise ValueError for rows this engine cannot decode."""
        if not prompts or len(prompts) != len(params):
            raise ValueError(f"need one SamplingParams per prompt and at least one prompt, got "
                             f"{len(prompts)} prompts and {len(params)} params")
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            if len(prompt) + p.max_tokens > self.context_length:
                raise ValueError(f"prompt {index}: {len(prompt)} tokens + max_tokens {p.max_tokens} "
                                 f"= {len(prompt) + p.max_tokens} exceeds the context length "
                                 f"{self.context_length}")
            if not all(0 <= token < self.vocab_size for token in prompt):
                raise ValueError(f"prompt {index} holds token ids outside 0..{self.vocab_size - 1}")

    def add(self, request_id: Hashable, prompts: list[list[int]],
            params: list[SamplingParams], adapter: str | None = None) -> None:
        """Queue a request of one or more rows (its prompts; n choices are n rows), decoded
        with the LoRA adapter named `adapter` (None: the base model)."""
        self.check(prompts, params)
        if adapter is not None and (self.adapters is None or adapter not in self.adapters.configs):
            served = self.adapters.names if self.adapters else []
            raise ValueError(f"unknown adapter {adapter!r}; this engine serves {served}")
        request = _Request(request_id, [], len(prompts), adapter=adapter)
        request.rows = [_Row(request, index, list(prompt), p,
                             None if p.greedy else request_generator(p.seed))
                        for index, (prompt, p) in enumerate(zip(prompts, params))]
        self._waiting.append(request)

    def abort(self, request_id: Hashable) -> None:
        """The caller is gone: its rows leave the batch at the next step."""
        self._aborts.append(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._aborts)

    def step(self) -> list[RequestOutput]:
        """Admit, decode one token for every running row, retire; the outputs of this step."""
        outputs: dict[Hashable, RequestOutput] = {}
        try:
            with torch.inference_mode():
                self._drop_aborted(outputs)
                self._admit(outputs)
                if self._running:
                    self._decode(outputs)
        except Exception as error:  # a fault of the engine itself: fail what it held, go on
            logger.exception("engine step failed; failing the running requests")
            for row in self._running:
                self._fail(row.request, EngineError(f"generation failed: {error}"), outputs)
            self._running, self._cache, self._logits = [], None, None
        return list(outputs.values())

    # ---- the steps -------------------------------------------------------------------------

    def _output(self, outputs: dict[Hashable, RequestOutput], request: _Request) -> RequestOutput:
        if request.id not in outputs:
            outputs[request.id] = RequestOutput(request.id)
        return outputs[request.id]

    def _fail(self, request: _Request, error: EngineError,
              outputs: dict[Hashable, RequestOutput]) -> None:
        if request.done:
            return
        request.error = error
        out = self._output(outputs, request)
        out.error, out.finished = error, True

    def _emit(self, row: _Row, update: ChoiceUpdate,
              outputs: dict[Hashable, RequestOutput]) -> None:
        out = self._output(outputs, row.request)
        out.updates.append((row.index, update))
        if update.finish_reason is not None:
            row.request.unfinished -= 1
            out.finished = row.request.done

    def _drop_aborted(self, outputs: dict[Hashable, RequestOutput]) -> None:
        gone = set()
        while self._aborts:
            gone.add(self._aborts.popleft())
        if not gone:
            return
        cancelled = EngineError("the request was cancelled", "cancelled")
        # A snapshot: add() may append from the event loop's thread meanwhile.
        for request in [r for r in list(self._waiting) if r.id in gone]:
            self._waiting.remove(request)
            self._fail(request, cancelled, outputs)
        for row in self._running:
            if row.request.id in gone:
                self._fail(row.request, cancelled, outputs)
        self._retire()

    def _admit(self, outputs: dict[Hashable, RequestOutput]) -> None:
        admitted: list[_Request] = []
        rows = 0
        while self._waiting:
            request = self._waiting[0]
            size = len(request.rows)
            alone = not self._running and not admitted  # a request larger than a batch runs alone
            if not alone and len(self._running) + rows + size > self.max_batch_size:
                break
            try:
                slot = self._slot(request, admitted)
            except NoFreeSlot:  # it waits, first in line, until a running adapter's rows end
                break
            except Exception as error:  # an adapter that cannot be loaded fails its request alone
                logger.exception("loading adapter %r failed", request.adapter)
                self._waiting.popleft()
                self._fail(request, EngineError(f"adapter {request.adapter!r} could not be "
                                                f"loaded: {error}", "adapter_unavailable"), outputs)
                continue
            for row in request.rows:
                row.slot = slot
            admitted.append(self._waiting.popleft())
            rows += size
        if admitted:
            self._prefill(admitted, outputs)

    def _slot(self, request: _Request, admitted: list[_Request]) -> int:
        """The slot of the request's adapter, loaded if it must be; the slots of running and
        just admitted rows are not evicted."""
        if self.adapters is None or request.adapter is None:
            return 0
        busy = {row.slot for row in self._running}
        busy |= {other.rows[0].slot for other in admitted}
        return self.adapters.slot(request.adapter, busy)

    def _prefill(self, requests: list[_Request], outputs: dict[Hashable, RequestOutput]) -> None:
        """One forward over the new prompts, left-padded; then their rows join the running batch."""
        rows = [row for request in requests for row in request.rows]
        try:
            cache, logits = self._forward_prompts([row.prompt for row in rows],
                                                  [row.slot for row in rows])
        except Exception as error:
            if len(requests) > 1:  # find the one that cannot be prefilled; the others go on
                for request in requests:
                    self._prefill([request], outputs)
                return
            logger.exception("prefill failed")
            self._fail(requests[0], EngineError(f"the prompt could not be processed: {error}"),
                       outputs)
            return
        width = logits.shape[1]
        for i, row in enumerate(rows):
            try:
                prompt_logprobs = None
                if row.params.prompt_logprobs is not None:
                    prompt_logprobs = self._prompt_logprobs(row, logits[i, width - len(row.prompt):])
                if prompt_logprobs is not None or row.params.max_tokens == 0:
                    finish = "length" if row.params.max_tokens == 0 else None
                    row.finish_reason = finish
                    self._emit(row, ChoiceUpdate("", finish, 0, [], prompt_logprobs), outputs)
            except Exception as error:
                logger.exception("prompt logprobs failed")
                self._fail(row.request, EngineError(f"scoring the prompt failed: {error}"), outputs)
        going = [i for i, row in enumerate(rows) if row.finish_reason is None and not row.request.done]
        if not going:
            return
        if len(going) < len(rows):
            cache.keep(torch.tensor(going, device=self._device))
        last = logits[going, -1]
        try:
            self._join(cache)
        except Exception as error:  # e.g. out of memory: these requests fail now, not at timeout
            logger.exception("joining the running batch failed")
            failure = EngineError(f"the request could not join the running batch: {error}")
            for i in going:
                self._fail(rows[i].request, failure, outputs)
            return
        self._running += [rows[i] for i in going]
        self._logits = last if self._logits is None else torch.cat([self._logits, last])

    def _forward_prompts(self, prompts: list[list[int]], slots: list[int]
                         ) -> tuple[DecodingCache, torch.Tensor]:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.eos_id] * (width - len(p)) + p for p in prompts],
                           device=self._device)
        pad = torch.tensor([width - len(p) for p in prompts], device=self._device)
        cache = self.model.new_cache(len(prompts), width, pad)
        return cache, self._forward(ids, cache, slots)

    def _forward(self, ids: torch.Tensor, cache: DecodingCache, slots: list[int]) -> torch.Tensor:
        """The model's forward, each row with its adapter's slot when there are adapters."""
        if self.adapters is None:
            return self.model(ids, cache)
        with self.adapters.rows(slots, self._device):
            return self.model(ids, cache)

    def _prompt_logprobs(self, row: _Row, logits: torch.Tensor) -> list[TokenLogprob]:
        """The prompt's tokens with their log-probabilities under the model: token j given the
        tokens before it (the first has none), as the evaluate stage's loss sums them."""
        prompt, n = row.prompt, row.params.prompt_logprobs or 0
        logprobs = F.log_softmax(logits[:-1].float(), dim=-1).clamp(min=LOGPROB_FLOOR)
        chosen = logprobs.gather(1, torch.tensor(prompt[1:], device=logits.device)[:, None])
        chosen = chosen[:, 0].tolist()
        tops = self._tops(logprobs, n)
        offsets = text_offsets(self.tokenizer, prompt)
        entries = [TokenLogprob(self._token_str(prompt[0]), None, None, 0)]
        for j in range(1, len(prompt)):
            entries.append(TokenLogprob(self._token_str(prompt[j]), chosen[j - 1],
                                        tops[j - 1] if n else None, offsets[j]))
        return entries

    def _tops(self, logprobs: torch.Tensor, n: int) -> list[dict[str, float]]:
        if not n:
            return [{} for _ in range(len(logprobs))]
        values, ids = logprobs.topk(min(n, logprobs.shape[-1]), dim=-1)
        return [{self._token_str(i): v for i, v in zip(row_ids, row_values)}
                for row_ids, row_values in zip(ids.tolist(), values.tolist())]

    def _token_str(self, token: int) -> str:
        """A token's text; OpenAI's `bytes:\\xNN` form for part of a multi-byte character."""
        if token not in self._token_strs:
            text = self.tokenizer.decode([token])
            if INCOMPLETE in text or not text:
                raw = self.tokenizer.id_to_token(token) or ""
                if all(c in _UNICODE_TO_BYTE for c in raw) and raw:
                    text = "bytes:" + "".join(f"\\x{_UNICODE_TO_BYTE[c]:02x}" for c in raw)
                else:
                    text = raw or text
            self._token_strs[token] = text
        return self._token_strs[token]

    def _decode(self, outputs: dict[Hashable, RequestOutput]) -> None:
        rows, logits = self._running, self._logits
        self.last_batch_size = len(rows)
        params = [row.params for row in rows]
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        work = apply_penalties(logits, [row.ids for row in rows], params)
        tokens = work.argmax(dim=-1).tolist()
        broken: dict[int, EngineError] = {
            i: EngineError("the model produced non-finite logits for this request",
                           "invalid_logits") for i, ok in enumerate(finite) if not ok}
        sampled = [i for i, row in enumerate(rows) if finite[i] and not row.params.greedy]
        if sampled:
            probs = sampling_probs(work[sampled], [params[i] for i in sampled]).cpu()
            for i, row_probs, ok in zip(sampled, probs, valid_probs(probs).tolist()):
                if ok:
                    tokens[i] = int(torch.multinomial(row_probs, 1, generator=rows[i].generator))
                else:
                    broken[i] = EngineError("the sampling probabilities for this request are "
                                            "not valid", "invalid_probabilities")
        entries = self._token_entries(rows, logits, tokens, finite)
        for i, row in enumerate(rows):
            if row.request.done:
                continue
            if i in broken:
                self._fail(row.request, broken[i], outputs)
                continue
            try:
                update = row.add(tokens[i], self.eos_id, self.tokenizer, entries.get(i))
            except Exception as error:  # noqa: BLE001 - any failure here is this row's alone
                self._fail(row.request, EngineError(f"detokenization failed: {error}",
                                                    "detokenization_failed"), outputs)
                continue
            self._emit(row, update, outputs)
        going = self._retire()
        if going:
            ids = torch.tensor([[tokens[i]] for i in going], device=self._device)
            self._make_room(1)
            try:
                self._logits = self._forward(ids, self._cache,
                                             [row.slot for row in self._running])[:, -1]
            except Exception as error:
                logger.exception("decode forward failed")
                for row in self._running:
                    self._fail(row.request, EngineError(f"generation failed: {error}"), outputs)
                self._running, self._cache, self._logits = [], None, None

    def _token_entries(self, rows: list[_Row], logits: torch.Tensor, tokens: list[int],
                       finite: list[bool]) -> dict[int, tuple[str, float, dict[str, float] | None]]:
        """For rows that asked for logprobs: the chosen token's log-probability under the model
        (before temperature and penalties, as vLLM reports it) and the top-N alternatives."""
        wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None and finite[i]]
        if not wanted:
            return {}
        logprobs = F.log_softmax(logits[wanted].float(), dim=-1).clamp(min=LOGPROB_FLOOR)
        chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in wanted],
                                                 device=logits.device))[:, 0].tolist()
        top_n = max(rows[i].params.logprobs or 0 for i in wanted)
        tops = self._tops(logprobs, top_n)
        entries = {}
        for k, i in enumerate(wanted):
            n = rows[i].params.logprobs or 0
            top = dict(list(tops[k].items())[:n]) if n else None
            entries[i] = (self._token_str(tokens[i]), chosen[k], top)
        return entries

    def _retire(self) -> list[int]:
        """Drop finished and failed rows from the batch and the cache; return the kept indices."""
        going = [i for i, row in enumerate(self._running)
                 if row.finish_reason is None and not row.request.done]
        if len(going) == len(self._running):
            return going
        if going:
            keep = torch.tensor(going, device=self._device)
            self._cache.keep(keep)
            self._logits = self._logits[keep]
        else:
            self._cache, self._logits = None, None
        self._running = [self._running[i] for i in going]
        return going

    # ---- the shared cache ---------------------------------------------------------------------

    def _join(self, new: DecodingCache) -> None:
        """Put freshly prefilled rows beside the running ones (the cache aligns them: see
        models/decoding.py), with context_length columns kept free for decoding."""
        if self._cache is None:
            self._cache = new
            new.make_room(self.context_length, 0)
        else:
            self._cache.join(new, self.context_length)

    def _make_room(self, columns: int) -> None:
        self._cache.make_room(columns, self.context_length)


class AsyncEngine:
    """An Engine driven from asyncio: `generate` yields one request's outputs step by step.

    The engine steps on a thread of its own for as long as it has work, so consecutive steps
    need no round trip through the event loop; each step's outputs reach the loop in one
    call_soon_threadsafe, and each request's generator reads them from its own queue."""

    def __init__(self, engine: Engine, max_waiting: int,
                 on_step: Callable[[int], None] | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_step = on_step  # called on the event loop with each decode step's row count
        self.on_step_failures = 0
        self._queues: dict[int, asyncio.Queue[RequestOutput]] = {}
        self._ids = itertools.count()
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def full(self) -> bool:
        """Whether max_waiting requests already wait beyond the batch's free slots (a burst
        waits in the queue until the next step admits it)."""
        free = max(0, self.engine.max_batch_size - self.engine.num_running)
        return self.engine.num_waiting >= self.max_waiting + free

    async def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Raises QueueFull when the waiting queue is full, ValueError for rows the engine cannot
        decode (or an adapter it does not serve). Closing the generator early (timeout,
        disconnect) aborts the request."""
        if self.full:
            raise QueueFull(f"{self.engine.num_waiting} requests are waiting on this replica")
        self._start()
        request_id = next(self._ids)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            self.engine.add(request_id, prompts, params, adapter)
        except BaseException:
            del self._queues[request_id]
            raise
        self._wake()
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)
                self._wake()

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._thread is None or not self._thread.is_alive() or self._loop is not loop:
            self._loop = loop
            self._thread = threading.Thread(target=self._run, args=(loop,), daemon=True,
                                            name="engine")
            self._thread.start()

    def _wake(self) -> None:
        with self._work:
            self._work.notify()

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._loop is loop and not loop.is_closed():
            with self._work:
                while not self.engine.has_work:
                    self._work.wait(timeout=1.0)  # wakes now and then to notice a closed loop
                    if loop.is_closed():
                        return
            outputs = self.engine.step()  # never raises: failures end requests, not the loop
            if outputs:
                try:
                    loop.call_soon_threadsafe(self._deliver, outputs, self.engine.last_batch_size)
                except RuntimeError:  # the loop closed under us
                    return

    def _deliver(self, outputs: list[RequestOutput], batch_size: int) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        if self.on_step is not None and batch_size:
            self._record_step(batch_size)

    def _record_step(self, batch_size: int) -> None:
        """Metrics are best effort: a failing callback (it dropped the step's outputs, and its
        requests waited for their timeout) is counted and logged, the first time and every
        1000th after, not at every step."""
        try:
            self.on_step(batch_size)
        except Exception:  # whatever metrics raise, the outputs went out
            self.on_step_failures += 1
            if self.on_step_failures % 1000 == 1:
                logger.exception("the engine's step callback failed (%d times so far)",
                                 self.on_step_failures)
