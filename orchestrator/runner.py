"""Connect to Ray (or start it embedded) and run the pipeline."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import ray

from orchestrator.pipeline import Progress, run_pipeline
from orchestrator.resume import resume_spec
from orchestrator.rundir import RunDir
from orchestrator.serve.ingress import Ingress, use_for_embedded_ray
from orchestrator.spec import JobSpec

# How long a cluster named by an address gets to accept a connection: Ray's own connect retries
# a dead address for minutes, printing only to its log.
ANSWER_TIMEOUT_S = 15.0
TOKEN_HINT = ("set RAY_AUTH_TOKEN (`ray get-auth-token` prints it on the head), or "
              "RAY_AUTH_TOKEN_PATH to the token's file, with RAY_AUTH_MODE=token")


def connect(address: str | None = None, say: Callable[[str], None] = print,
            ingress: Ingress = Ingress.PROXY) -> bool:
    """Join the cluster at `address` (or Ray's own RAY_ADDRESS, which `ray job submit` sets),
    else start a local Ray embedded in this process: always a new one, never the cluster
    Ray remembers in its temp folder (a head that died without `ray stop` leaves it named
    there), its Serve taking requests in by `ingress`. Says which Ray it uses. Returns True
    when Ray is embedded in this process."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        use_for_embedded_ray(ingress)
        ray.init(address="local", log_to_driver=False, logging_level="WARNING")
        say("Ray: a local Ray embedded in this command (no --address or RAY_ADDRESS given)")
    else:
        check_answers(address)
        check_token(address)
        join(address)
        say(f"Ray: the cluster at {address}")
    for name in ("ray.data", "ray.serve", "ray.tune", "ray.train"):  # our progress lines suffice
        logging.getLogger(name).setLevel(logging.WARNING)
    return address is None


def join(address: str) -> None:
    """ray.init at `address`, with a refusal for want of the cluster's auth token said in one
    line that names where the token goes (Ray raises a missing one with a traceback, and a
    wrong one as a bare failure to connect)."""
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except (AuthenticationError, ConnectionError) as error:
        if isinstance(error, AuthenticationError):
            raise ConnectionError(
                f"the Ray cluster at {address} needs its auth token and this command has none: "
                f"{TOKEN_HINT}") from None
        # Something answered at the address (check_answers), but the join failed: a wrong token
        # gets exactly this (Ray's "Unauthenticated" reaches only its log).
        raise ConnectionError(f"the Ray cluster at {address} refused this command ({error}): "
                              f"is its auth token right? {TOKEN_HINT}") from None


def check_answers(address: str, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
    """Fail in one line, within `timeout_s`, when nothing accepts a connection at the cluster's
    address (`host:port`, `ray://host:port`, or `auto`: the cluster `ray start` last started
    on this machine), or when what answers is the dashboard: its Jobs API URL is what
    `ray job submit` takes (and RAY_ADDRESS often holds), and Ray's join would retry its port
    for minutes."""
    if address.startswith(("http://", "https://")):
        host = urlsplit(address).hostname or "HOST"
        raise ConnectionError(f"{address} is a dashboard (Jobs API) URL: "
                              f"{_join_the_gcs_instead(address, host)}")
    host, _, port = _host_and_port(address).rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"--address {address!r}: no Ray cluster found there (give "
                              "host:port of the head's GCS, e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
            http = _answers_http(connection)
    except OSError as error:
        raise ConnectionError(
            f"the Ray cluster at {address} does not answer ({host}:{port}: "
            f"{error.strerror or error}); is its head running (`ray status --address "
            f"{host}:{port}` on it) and its port open from here?") from None
    if http:
        raise ConnectionError(f"{address} answers HTTP, as the dashboard (Jobs API) does, not "
                              f"gRPC as a GCS does: "
                              f"{_join_the_gcs_instead(f'http://{host}:{port}', host)}")


def _join_the_gcs_instead(jobs_api: str, host: str) -> str:
    return (f"`orchestrator submit --address {jobs_api} SPEC` sends a job there, as `ray job "
            f"submit` does; this command joins the cluster itself, at its GCS: give --address "
            f"{host}:6379 (or the port `ray start --head --port` chose), and unset RAY_ADDRESS "
            "if it holds the URL")


def _answers_http(connection: socket.socket) -> bool:
    """Whether the server answers an HTTP/1 request in HTTP/1, as the dashboard does. A GCS
    speaks gRPC, HTTP/2: its first bytes are a binary frame (its SETTINGS, sent at once)."""
    try:
        connection.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
        return connection.recv(5) == b"HTTP/"
    except OSError:  # no reply in time, or the connection closed: not an HTTP server
        return False


def check_token(address: str) -> None:
    """Refuse at once, in one line, a token the cluster does not take (or none where it needs
    one): its GCS says so to the first call, but Ray's join retries that call 20 times, a
    second apart, and then fails without naming the token. Likewise a port that answers but
    is no GCS, where the join retries for minutes (the dashboard's is told apart before, by
    check_answers, at once). A missing token file is left to join."""
    from ray._private.authentication.authentication_token_setup import (
        ensure_token_if_auth_enabled,
    )
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RpcError

    if address.startswith("ray://"):  # Ray Client: its server, not this process, calls the GCS
        return
    try:
        ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    except AuthenticationError:
        return  # join names the missing token (the GCS client would abort the process)
    try:
        GcsClient(address=_host_and_port(address))
    except AuthenticationError as error:
        said = str(error).split(". ")[0]  # the rest is Ray's advice, which TOKEN_HINT gives
        raise ConnectionError(f"the Ray cluster at {address} refused this command: its auth "
                              f"token is wrong or missing ({said}): {TOKEN_HINT}") from None
    except RpcError as error:  # what answers there is no GCS: Ray's join would retry for minutes
        raise ConnectionError(
            f"the Ray cluster at {address} does not answer as a Ray head ({error}): is it the "
            "head's GCS port (6379 unless `ray start --port` said otherwise), not its "
            "dashboard's (8265)?") from None


def _host_and_port(address: str) -> str:
    """`host:port` of the head's GCS from `host:port`, `ray://host:port` or `auto`."""
    from ray._private.services import canonicalize_bootstrap_address

    target = address.removeprefix("ray://")
    if target == "auto":
        target = canonicalize_bootstrap_address("auto") or ""
    return target


def run(spec: JobSpec, address: str | None = None, say: Callable[[str], None] | Progress = print,
        resume: bool = False, run_dir: str | None = None) -> dict[str, Any]:
    """Run the whole job on the cluster at `address` (default: embedded) and return its report.

    With `resume`, the job's latest run directory (under spec.runs_dir) continues when it has not
    finished; otherwise a new run starts, in `run_dir` when given."""
    latest = RunDir.latest(spec.runs_dir, spec.name) if resume else None
    unfinished = latest if latest and not latest.completed().report else None
    connect(address, say.say if isinstance(say, Progress) else say, Ingress(spec.serve.ingress))
    return run_pipeline(spec, say, resume=unfinished, new_run_dir=run_dir)


def resume(run_dir: str | RunDir, address: str | None = None, overrides: list[str] | None = None,
           say: Callable[[str], None] | Progress = print) -> dict[str, Any]:
    """Continue a run whose driver died, with the spec it was started with (and `overrides`):
    completed stages are not run again; an interrupted sweep keeps its finished trials and
    resumes the others from their latest checkpoints."""
    run_dir = RunDir.open(run_dir)
    spec = resume_spec(run_dir, overrides)
    connect(address, say.say if isinstance(say, Progress) else say, Ingress(spec.serve.ingress))
    return run_pipeline(spec, say, resume=run_dir)
