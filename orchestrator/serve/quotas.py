"""Per-key quotas: requests and tokens per minute per API key (serve.quotas), counted in a
sliding 60-second window, and the errors a refused request gets.

A key is known by its id, the first KEY_ID_CHARS hex digits of its SHA-256 (the Prometheus label
of its usage, and how serve.quotas.keys names it): the key itself is never kept or shown.

`Ledger` is plain Python with an injected clock. One ledger per model application holds every
key's counts, so a limit holds whatever replica a request reaches: in the replica when the model
has one, else in an actor its replicas share (app.py). It keeps, per key, the time of each request and each
token charge of the last minute (a sliding log, not a token bucket): a key with a limit of N per
minute never gets more than N in any 60 seconds, and gets N when it asks for them, which a bucket
refilling while it drains cannot promise.

Tokens: a completion reserves its prompt tokens plus max_tokens for every row when admitted (as
OpenAI counts max_tokens toward its token limits), and `settle` replaces the reservation with
what it used once it ends; a classify charges the tokens the model reads. So a key never goes
over its token limit, even with many requests in flight.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from orchestrator.serve.protocol import APIError
from orchestrator.spec import QuotaLimits, QuotasSpec

WINDOW_S = 60.0
KEY_ID_CHARS = 12
Limit = Literal["requests_per_minute", "tokens_per_minute"]


class QuotaKeyError(ValueError):
    """serve.quotas.keys names a key id that no configured key (or more than one) has."""


def key_id(key_digest: str) -> str:
    """A key's id from its SHA-256 hex digest (auth.digest)."""
    return key_digest[:KEY_ID_CHARS]


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def _limits(values: QuotaLimits, base: Limits = Limits()) -> Limits:
    """`base` with the fields `values` sets replaced (an explicit null lifts that limit)."""
    changed = {name: getattr(values, name) for name in values.model_fields_set}
    return Limits(**{**base.__dict__, **changed})


def limits_by_key(quotas: QuotasSpec, digests: list[str]) -> dict[str, Limits]:
    """Each configured key's limits by key id: the default, with its override's fields. An
    override whose id starts no configured key's digest, or starts several, is an error."""
    default = _limits(quotas.default)
    by_key = {key_id(d): default for d in digests}
    for prefix, values in quotas.keys.items():
        matches = [d for d in digests if d.startswith(prefix)]
        if len(matches) != 1:
            found = "no configured key has" if not matches else f"{len(matches)} keys have"
            raise QuotaKeyError(f"serve.quotas.keys.{prefix}: {found} a SHA-256 starting with "
                                f"{prefix!r} (a key's id: printf %s KEY | sha256sum)")
        by_key[key_id(matches[0])] = _limits(values, default)
    return by_key


def ledger_for(quotas: QuotasSpec, digests: list[str],
               clock: Callable[[], float] = time.monotonic) -> Ledger:
    return Ledger(limits_by_key(quotas, digests), default_limits(quotas), clock)


def default_limits(quotas: QuotasSpec) -> Limits:
    return _limits(quotas.default)


@dataclass(frozen=True)
class Refusal:
    limit: Limit
    allowed: int  # the key's limit per minute
    requested: int  # tokens this request asked for (1 for the request limit)
    retry_after_s: float | None  # None: this request alone is over the limit


@dataclass(frozen=True)
class Admission:
    ticket: int | None = None  # a token charge to settle when the request ends
    refusal: Refusal | None = None


@dataclass
class _Charge:
    at: float
    tokens: int
    ticket: int


@dataclass
class _Usage:
    """One key's last minute: when each request came, and each token charge."""

    requests: deque[float] = field(default_factory=deque)
    charges: deque[_Charge] = field(default_factory=deque)
    tokens: int = 0  # the sum of charges


class Ledger:
    """Every key's requests and tokens of the last WINDOW_S seconds; admits or refuses each
    request. Not thread-safe: one event loop (or one thread) calls it."""

    def __init__(self, limits: dict[str, Limits], default: Limits = Limits(),
                 clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S):
        self.limits, self.default, self.clock, self.window_s = limits, default, clock, window_s
        self.usage: dict[str, _Usage] = {}
        self.open: dict[int, _Charge] = {}  # tickets not yet settled
        self.tickets = itertools.count(1)

    def admit(self, key: str, tokens: int = 0) -> Admission:
        """Count a request of `key` charging `tokens`, or refuse it (counting nothing) when
        either limit would be passed within the window."""
        limits = self.limits.get(key, self.default)
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return Admission()
        now = self.clock()
        usage = self._expire(self.usage.setdefault(key, _Usage()), now)
        refusal = self._over_requests(usage, limits, now) or self._over_tokens(
            usage, limits, tokens, now)
        if refusal is not None:
            return Admission(refusal=refusal)
        if limits.requests_per_minute is not None:
            usage.requests.append(now)
        if limits.tokens_per_minute is None or not tokens:
            return Admission()
        charge = _Charge(now, tokens, next(self.tickets))
        usage.charges.append(charge)
        usage.tokens += tokens
        self.open[charge.ticket] = charge
        return Admission(ticket=charge.ticket)

    def settle(self, key: str, ticket: int, tokens: int) -> None:
        """A request's reservation becomes what it used (a charge already out of the window
        changes nothing)."""
        charge = self.open.pop(ticket, None)
        if charge is None:
            return
        self.usage[key].tokens += tokens - charge.tokens
        charge.tokens = tokens

    def _expire(self, usage: _Usage, now: float) -> _Usage:
        start = now - self.window_s
        while usage.requests and usage.requests[0] <= start:
            usage.requests.popleft()
        while usage.charges and usage.charges[0].at <= start:
            charge = usage.charges.popleft()
            usage.tokens -= charge.tokens
            self.open.pop(charge.ticket, None)
        return usage

    def _over_requests(self, usage: _Usage, limits: Limits, now: float) -> Refusal | None:
        allowed = limits.requests_per_minute
        if allowed is None or len(usage.requests) < allowed:
            return None
        # The request that frees a place is the allowed-th most recent one.
        frees_at = usage.requests[len(usage.requests) - allowed] + self.window_s
        return Refusal("requests_per_minute", allowed, 1, frees_at - now)

    def _over_tokens(self, usage: _Usage, limits: Limits, tokens: int,
                     now: float) -> Refusal | None:
        allowed = limits.tokens_per_minute
        if allowed is None or usage.tokens + tokens <= allowed:
            return None
        if tokens > allowed:
            return Refusal("tokens_per_minute", allowed, tokens, None)
        excess = usage.tokens + tokens - allowed
        for charge in usage.charges:  # oldest first: the one whose expiry makes room
            excess -= charge.tokens
            if excess <= 0:
                return Refusal("tokens_per_minute", allowed, tokens,
                               charge.at + self.window_s - now)
        raise AssertionError("the charges in the window sum to usage.tokens")


class QuotaCheck(Protocol):
    """The ledger as a replica reaches it: in this process, or the actor the replicas share."""

    async def admit(self, key: str, tokens: int) -> Admission: ...

    def settle(self, key: str, ticket: int, tokens: int) -> None:
        """Sent without waiting: nothing the caller answers depends on it."""


class InProcess:
    """A ledger in this process: right for one process (a model's only replica, plain uvicorn,
    tests), not for several replicas, which share one (app.py)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    async def admit(self, key: str, tokens: int) -> Admission:
        return self.ledger.admit(key, tokens)

    def settle(self, key: str, ticket: int, tokens: int) -> None:
        self.ledger.settle(key, ticket, tokens)


def refused(refusal: Refusal) -> APIError:
    """OpenAI's answer to a request over a limit: 429 with Retry-After (whole seconds, at least
    1); a request that alone needs more tokens than the key's minute is a 400 (retrying never
    helps)."""
    unit = "requests" if refusal.limit == "requests_per_minute" else "tokens"
    if refusal.retry_after_s is None:
        return APIError(400, f"this request needs {refusal.requested} tokens (a completion: its "
                             f"prompt plus max_tokens for each choice), more than this key's "
                             f"limit of {refusal.allowed} tokens per minute",
                        code="request_over_quota")
    retry = max(1, math.ceil(refusal.retry_after_s))
    return APIError(429, f"rate limit reached for this API key: {refusal.allowed} {unit} per "
                         f"minute; retry after {retry} s", code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry)})
