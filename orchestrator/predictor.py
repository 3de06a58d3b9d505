"""What a Serve replica and batch inference compute, without Ray: classification, and batched
incremental generation that streams text as it becomes certain.

Generation left-pads the prompts of a batch into one KV cache, prefills it in one forward, then
decodes one column per step; rows that finish (EOS, a stop string, max_tokens) leave the cache, so
the batch shrinks as it goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from orchestrator.bundle import Bundle
from orchestrator.data.datasets import pad_or_truncate
from orchestrator.models import GPT

INCOMPLETE = "\ufffd"  # what a byte-level BPE decodes an unfinished UTF-8 sequence to


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling, in (0, 1]
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence, finish_reason "stop"
    seed: int | None = None  # same seed -> same text whatever else shares the batch

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a list from JSON would do as well
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), not {self.top_k}")
        if "" in self.stop:
            raise ValueError("stop strings must not be empty")


@dataclass
class ChoiceUpdate:
    """What one row produced in one step."""

    text: str  # new text since this row's previous update (may be "")
    finish_reason: str | None  # None while generating; "stop" (EOS or stop string) or "length"
    completion_tokens: int  # tokens generated so far for this row


@dataclass
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


def request_generator(seed: int | None) -> torch.Generator:
    """One request's random stream: its seed alone decides its samples, whatever shares its
    batch; without a seed, fresh entropy (a new Generator's default seed is a constant)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's next-token distribution: logits over its temperature (> 0), restricted to its
    top_k tokens, then to its nucleus, the fewest most likely tokens whose probability reaches
    top_p (the top token always stays). A row without top_k or top_p gets the plain softmax,
    whatever its batch companions ask for."""
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits.float() / temperature[:, None]
    if any(p.top_k or p.top_p < 1 for p in params):
        logits = logits.masked_fill(_outside_top_k_top_p(logits, params), float("-inf"))
    return F.softmax(logits, dim=-1)


def _outside_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab, device = logits.shape[-1], logits.device
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)
    # top_p = 1 must drop nothing, even where float sums of the head round up to 1.
    top_p = torch.tensor([p.top_p if p.top_p < 1 else math.inf for p in params], device=device)
    drop = torch.arange(vocab, device=device) >= top_k[:, None]
    probs = F.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    drop |= probs.cumsum(dim=-1) - probs >= top_p[:, None]  # mass of the more likely tokens
    return torch.empty_like(drop).scatter_(-1, order, drop)


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


@dataclass
class _Row:
    """One prompt's progress: its generated ids, its text (cut before a stop string), how much of
    it was sent, and why it ended."""

    params: SamplingParams
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None

    def add(self, token: int, eos_id: int, tokenizer: Tokenizer) -> ChoiceUpdate:
        """Take the next token; return the text that became final, and the finish if it ended."""
        if token == eos_id:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            self.text = tokenizer.decode(self.ids)
            cut = _first_stop(self.text, self.params.stop)
            if cut is not None:
                self.text, self.finish_reason = self.text[:cut], "stop"
            elif len(self.ids) == self.params.max_tokens:
                self.finish_reason = "length"
        end = len(self.text) if self.finish_reason else _settled(self.text, self.params.stop)
        new, self.sent = self.text[self.sent:end], end
        return ChoiceUpdate(new, self.finish_reason, len(self.ids))


class Decoding:
    """Batched incremental decoding of several rows (prompts), sharing one KV cache.

    The prompts are prefilled on construction; each step samples one token for every unfinished
    row and runs one forward of shape (rows, 1) to get the next logits."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, eos_id: int, prompts: list[list[int]],
                 params: list[SamplingParams]):
        if not prompts or len(prompts) != len(params):
            raise ValueError(f"need one SamplingParams per prompt and at least one prompt, got "
                             f"{len(prompts)} prompts and {len(params)} params")
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            if len(prompt) + p.max_tokens > model.block_size:
                raise ValueError(f"prompt {index}: {len(prompt)} tokens + max_tokens {p.max_tokens} "
                                 f"= {len(prompt) + p.max_tokens} exceeds the context length "
                                 f"{model.block_size}")
        self.model, self.tokenizer, self.eos_id = model, tokenizer, eos_id
        self._device = model.wte.weight.device
        self._rows = [_Row(p, request_generator(p.seed)) for p in params]
        self._active = list(range(len(prompts)))  # the unfinished rows, in cache order
        width = max(map(len, prompts))
        with torch.inference_mode():
            ids = torch.tensor([[eos_id] * (width - len(p)) + p for p in prompts], device=self._device)
            pad = torch.tensor([width - len(p) for p in prompts], device=self._device)
            # A row's last token is sampled but never fed back, hence the - 1.
            columns = width + max(p.max_tokens for p in params) - 1
            self._cache = model.new_cache(len(prompts), columns, pad)
            self._logits = model(ids, self._cache)[:, -1]

    @property
    def finished(self) -> bool:
        return not self._active

    def step(self) -> list[ChoiceUpdate | None]:
        """One token for every unfinished row; None for rows that had finished before."""
        updates: list[ChoiceUpdate | None] = [None] * len(self._rows)
        if self.finished:
            return updates
        with torch.inference_mode():
            tokens = self._sample()
            for index, token in zip(self._active, tokens):
                updates[index] = self._rows[index].add(token, self.eos_id, self.tokenizer)
            going = [i for i, index in enumerate(self._active) if self._rows[index].finish_reason is None]
            if going and len(going) < len(self._active):
                self._cache.keep(torch.tensor(going, device=self._device))
            self._active = [self._active[i] for i in going]
            if going:
                ids = torch.tensor([[tokens[i]] for i in going], device=self._device)
                self._logits = self.model(ids, self._cache)[:, -1]
        return updates

    def cancel(self, indices: set[int]) -> None:
        """Drop rows whose caller is gone (timed out, disconnected) so they stop costing steps."""
        going = [i for i, index in enumerate(self.active) if index not in indices]
        if len(going) == len(self.active):
            return
        if going:
            keep = torch.tensor(going, device=self.device)
            self.cache.keep(keep)
            self.logits = self.logits[keep]
        self.active = [self.active[i] for i in going]

    def _sample(self) -> list[int]:
        """Greedy rows take the argmax; the others draw from their own generator, on the CPU where
        request_generator lives."""
        tokens = self._logits.argmax(dim=-1).tolist()
        sampled = [i for i, index in enumerate(self._active) if self._rows[index].params.temperature > 0]
        if sampled:
            rows = [self._rows[self._active[i]] for i in sampled]
            probs = sampling_probs(self._logits[sampled], [row.params for row in rows]).cpu()
            for i, row, row_probs in zip(sampled, rows, probs):
                tokens[i] = int(torch.multinomial(row_probs, 1, generator=row.generator))
        return tokens


class Predictor:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.info = bundle.info

    @property
    def context_length(self) -> int:
        """The LM's block_size: a prompt and its max_tokens must fit in it together."""
        return self.model.block_size

    def encode(self, prompt: str) -> list[int]:
        """Token ids of the prompt; an empty prompt becomes EOS, the start of any document."""
        return self.tokenizer.encode(prompt).ids or [self.info.eos_id]

    def start(self, prompts: list[list[int]], params: list[SamplingParams]) -> Decoding:
        return Decoding(self.model, self.tokenizer, self.info.eos_id, prompts, params)

    def complete(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Decode every row to its end: the same texts a stream of `start(...).step()` gives."""
        decoding = self.start(prompts, params)
        texts = [""] * len(prompts)
        last: list[ChoiceUpdate | None] = [None] * len(prompts)
        while not decoding.finished:
            for index, update in enumerate(decoding.step()):
                if update is not None:
                    texts[index] += update.text
                    last[index] = update
        return [Completion(text, update.completion_tokens, update.finish_reason)
                for text, update in zip(texts, last)]

    def classify(self, texts: list[str]) -> list[dict]:
        """Label and score for each text, plus every class's probability."""
        ids = pad_or_truncate([e.ids for e in self.tokenizer.encode_batch(texts)],
                              self.info.pad_id, self.info.context_length)
        with torch.inference_mode():
            logits = self.model(torch.as_tensor(ids).long().to(next(self.model.parameters()).device))
            probs = F.softmax(logits.float(), dim=-1).cpu()
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({"label": self.info.labels[best], "score": float(row[best]),
                            "scores": dict(zip(self.info.labels, map(float, row)))})
        return results
