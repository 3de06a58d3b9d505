"""API keys: read where the spec says (an environment variable or a file, never the spec itself),
kept as SHA-256 digests, and checked as `Authorization: Bearer KEY` in constant time.

Only digests travel to the replicas, so no key shows up in Ray's dashboard or in a Serve config.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from orchestrator.spec import ServeSpec

BEARER = "bearer "


class KeySourceError(ValueError):
    """The spec names a key source that holds no keys."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(limits: ServeSpec, environ: dict[str, str] | None = None) -> list[str]:
    """Every configured key; [] when the spec configures none (auth off)."""
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if limits.api_keys_env:
        if not environ.get(limits.api_keys_env, "").strip():
            raise KeySourceError(f"serve.api_keys_env names {limits.api_keys_env}, which is not set "
                                 "or empty in this environment")
        from_env = [key.strip() for key in environ[limits.api_keys_env].split(",") if key.strip()]
        if not from_env:  # "$K1,$K2" with both unset: only commas
            raise KeySourceError(f"serve.api_keys_env names {limits.api_keys_env}, which holds "
                                 "no keys (only separators)")
        keys += from_env
    if limits.api_keys_file:
        path = Path(limits.api_keys_file).expanduser()
        if not path.is_file():
            raise KeySourceError(f"serve.api_keys_file {path} does not exist")
        from_file = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise KeySourceError(f"serve.api_keys_file {path} holds no keys")
        keys += from_file
    return list(dict.fromkeys(keys))


def load_key_digests(limits: ServeSpec) -> list[str]:
    return [digest(key) for key in load_keys(limits)]


def authorized(header: str | None, digests: list[str], required: bool | None = None) -> bool:
    """True when auth is off or the header carries a configured key. Fails closed: when keys are
    required (a key source is configured) but there are none, nobody passes.

    Every digest is compared (no early exit), each with hmac.compare_digest, so the time taken
    says nothing about which key or how much of one matched.
    """
    if required is None:
        required = bool(digests)
    if not required:
        return True
    if not digests:
        return False
    if not header or not header.lower().startswith(BEARER):
        return False
    presented = digest(header[len(BEARER):].strip())
    matches = [hmac.compare_digest(presented, known) for known in digests]
    return any(matches)
