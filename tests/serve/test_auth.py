"""API keys: where they are read from, and the check itself (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.serve.auth import KeySourceError, authorized, digest, load_key_digests, load_keys
from orchestrator.spec import ServeSpec


def test_no_key_source_means_auth_is_off() -> None:
    assert load_keys(ServeSpec(), environ={}) == []
    assert authorized(None, []) and authorized("Bearer anything", [])


def test_keys_from_an_environment_variable_and_a_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nfile-key\n\n  other-key  \nenv-b\n")
    limits = ServeSpec(api_keys_env="SERVICE_KEYS", api_keys_file=str(keys_file))
    assert load_keys(limits, environ={"SERVICE_KEYS": "env-a, env-b,"}) == [
        "env-a", "env-b", "file-key", "other-key"]


def test_a_key_file_saved_with_a_byte_order_mark_keeps_its_first_key(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM: it made the first key unusable."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("first-key\nsecond-key\n", encoding="utf-8-sig")
    keys = load_keys(ServeSpec(api_keys_file=str(keys_file)), environ={})
    assert keys == ["first-key", "second-key"]
    assert authorized("Bearer first-key", [digest(key) for key in keys])


@pytest.mark.parametrize(("limits", "environ", "message"), [
    (ServeSpec(api_keys_env="SERVICE_KEYS"), {}, "SERVICE_KEYS, which is not set"),
    (ServeSpec(api_keys_env="SERVICE_KEYS"), {"SERVICE_KEYS": " "}, "not set or empty"),
    (ServeSpec(api_keys_env="SERVICE_KEYS"), {"SERVICE_KEYS": ", ,"}, "holds no keys"),
    (ServeSpec(api_keys_file="/no/such/keys"), {}, "does not exist"),
])
def test_a_key_source_without_keys_is_an_error(limits: ServeSpec, environ: dict,
                                               message: str) -> None:
    with pytest.raises(KeySourceError, match=message):
        load_keys(limits, environ)


def test_an_empty_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# no keys yet\n")
    with pytest.raises(KeySourceError, match="holds no keys"):
        load_key_digests(ServeSpec(api_keys_file=str(tmp_path / "keys")))


def test_only_a_configured_key_as_bearer_passes() -> None:
    digests = [digest("alpha-key"), digest("beta-key")]
    assert authorized("Bearer alpha-key", digests)
    assert authorized("bearer beta-key", digests)  # the scheme is case-insensitive
    for header in (None, "", "alpha-key", "Bearer alpha", "Bearer alpha-keyx", "Basic alpha-key",
                   "Bearer ", "Bearer gamma-key"):
        assert not authorized(header, digests), header


def test_digests_not_keys_are_kept() -> None:
    assert digest("alpha-key") != "alpha-key" and len(digest("alpha-key")) == 64


def test_required_keys_with_none_configured_let_nobody_in() -> None:
    """Fail closed: a replica told keys are required but holding none refuses every header."""
    for header in (None, "", "Bearer ", "Bearer anything"):
        assert not authorized(header, [], required=True)
    assert authorized(None, [], required=False)
    assert not authorized(None, [digest("k")])  # keys present: required by default
