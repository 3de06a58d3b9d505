"""How one row picks its next token: the sampling parameters of a request and the safe,
batched arithmetic that turns a row's logits into a choice.

Safety first: whatever values a request brings, the arithmetic stays finite for its own row and
never touches another row. A temperature below GREEDY_BELOW decodes greedily (as vLLM does: 1e-46
would underflow to 0 and turn the probabilities into NaN), top_k is clamped to the vocabulary
(2**63 would overflow a torch integer), and probabilities are checked before they are sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLOAT32_TINY = torch.finfo(torch.float32).tiny

GREEDY_BELOW = 1e-5  # a temperature below this decodes greedily (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 5  # OpenAI's cap on `logprobs` for completions


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # 0: no generation (prompt scoring with prompt_logprobs)
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0  # nucleus sampling, in (0, 1]
    top_k: int = 0  # 0 = off; larger than the vocabulary = off
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence, finish_reason "stop"
    seed: int | None = None  # same seed -> same text whatever else shares the batch
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    logprobs: int | None = None  # None: none; N: the chosen token's and the N most likely
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo, scoring)
    ignore_eos: bool = False  # EOS is a token like any other: exactly max_tokens (benchmarks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a list from JSON would do as well
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, not {self.max_tokens}")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, not {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), not {self.top_k}")
        if "" in self.stop:
            raise ValueError("stop strings must not be empty")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS}, not {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def request_generator(seed: int | None) -> torch.Generator:
    """One row's random stream: its seed alone decides its samples, whatever shares its batch;
    without a seed, fresh entropy (a new Generator's default seed is a constant)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_penalties(logits: torch.Tensor, generated: list[list[int]],
                    params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over each row's generated tokens (not its
    prompt): logit - presence * [count > 0] - frequency * count."""
    if not any(p.penalized for p in params):
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i, (ids, p) in enumerate(zip(generated, params)):
        if p.penalized and ids:
            counts = torch.bincount(torch.tensor(ids), minlength=vocab)[:vocab].to(logits)
            logits[i] -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's next-token distribution: logits over its temperature (never below
    GREEDY_BELOW), restricted to its top_k tokens, then to its nucleus, the fewest most likely
    tokens whose probability reaches top_p (the top token always stays). A row without top_k or
    top_p gets the plain softmax, whatever its batch companions ask for."""
    temperature = torch.tensor([max(p.temperature, GREEDY_BELOW) for p in params],
                               device=logits.device)
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab or p.top_p < 1 for p in params):
        logits = logits.masked_fill(_outside_top_k_top_p(logits, params), float("-inf"))
    return F.softmax(logits, dim=-1)


def valid_probs(probs: torch.Tensor) -> torch.Tensor:
    """(rows,) True where a row's probabilities can be sampled: finite, >= 0, some mass."""
    return torch.isfinite(probs).all(dim=-1) & (probs >= 0).all(dim=-1) & (probs.sum(dim=-1) > 0)


def _outside_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab, device = logits.shape[-1], logits.device
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)
    # Clamped in Python: a top_k past the vocabulary (even 2**63) means "off".
    top_k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=device)
    # top_p = 1 must drop nothing, even where float sums of the head round up to 1.
    # A top_p below float32's smallest normal number would round to 0 and drop even the top
    # token: any such top_p keeps the top token alone, as the smallest normal one does.
    top_p = torch.tensor([max(p.top_p, FLOAT32_TINY) if p.top_p < 1 else math.inf
                          for p in params], device=device)
    drop = torch.arange(vocab, device=device) >= top_k[:, None]
    probs = F.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    drop |= probs.cumsum(dim=-1) - probs >= top_p[:, None]  # mass of the more likely tokens
    return torch.empty_like(drop).scatter_(-1, order, drop)
