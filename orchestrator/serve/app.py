"""The model services on Ray Serve: each model's deployment and application (at `/<model>`),
the front that routes by `model` at `/` (front.py), the app builders that Serve configs import,
deploying (a rolling update when the application already runs) and writing a Serve config.

A Serve config from `serve_config()` names `orchestrator.serve.app:build_app` with the bundle and
the serve section as arguments, and `orchestrator.serve.app:build_front`, so `serve deploy
serve.yaml` builds the same applications as `deploy()`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from fastapi import FastAPI
from ray import serve
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus, ServeInstanceDetails

from orchestrator import prometheus
from orchestrator.bundle import read_spec_and_info
from orchestrator.serve import DeployError, forwarding, quotas
from orchestrator.serve.auth import load_key_digests
from orchestrator.serve.forwarding import Answer, Forwarded
from orchestrator.serve.front import Front, UnknownModel
from orchestrator.serve.quotas import Admission, Limits, default_limits, limits_by_key
from orchestrator.serve.routes import create_api
from orchestrator.serve.server import ModelServer
from orchestrator.spec import JobSpec, ServeSpec
from orchestrator.storage import resolve
from orchestrator.weights.adapters import AdapterError, base_bundle, check_adapters
from orchestrator.weights.model import load_bundle

logger = logging.getLogger(__name__)

APP_NAME_SUFFIX = "-service"
BUILDER_IMPORT_PATH = "orchestrator.serve.app:build_app"
DEPLOYMENT_NAME = "ModelService"
FRONT_APP = "orchestrator-front"
FRONT_BUILDER_IMPORT_PATH = "orchestrator.serve.app:build_front"
FRONT_DEPLOYMENT = "Front"
FRONT_CPUS = 0.0  # like Serve's proxy: it parses one field and hands the request on
FRONT_ONGOING_REQUESTS = 1024
QUOTA_DEPLOYMENT = "QuotaLedger"
MODEL_NAMES_TTL_S = 2.0
CHEAP_REQUEST_ROOM = 8  # ongoing requests beyond batch and queue: /v1/models, /tokenize, ...


@dataclass(frozen=True)
class ServedModel:
    model: str
    task: str
    version: str
    bundle: str
    adapters: tuple[str, ...] = ()  # the LoRA adapters served on it, by name


@dataclass(frozen=True)
class Service:
    """One Serve application on the cluster, as `orchestrator services` shows it; `served` is
    None for an application that is not one of our models (or has no replica yet)."""

    app: str
    route: str | None
    status: str
    replicas: str  # running / target
    served: ServedModel | None


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class ModelService:
    """One replica: the bundle loaded once; the FastAPI app is built around it on the replica."""

    def __init__(self, bundle_dir: str, serve_spec: dict[str, Any], key_digests: list[str],
                 model: str | None = None, quota_ledger: DeploymentHandle | None = None):
        limits = ServeSpec.model_validate(serve_spec)
        self.bundle_dir = bundle_dir
        app_name = serve.get_replica_context().app_name
        quota = None if quota_ledger is None else LedgerHandle(quota_ledger)
        self.server = ModelServer(bundle_dir, limits, key_digests, app_name=app_name,
                                  model_name=model, quota=quota)
        self.api = create_api(self.server)
        prometheus.record("serve_p99_latency_target_seconds", limits.p99_latency_target_s,
                       app=app_name)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.api

    async def forward(self, request: Forwarded) -> Answer:
        """A request the front routed here, answered by this replica's own app."""
        return await forwarding.whole(self.api, request)

    async def forward_stream(self, request: Forwarded) -> AsyncIterator[Answer | bytes]:
        async for part in forwarding.stream(self.api, request):
            yield part

    async def check_health(self) -> None:
        await self.server.check_health()

    def describe(self) -> ServedModel:
        """What `orchestrator services` lists: the model this replica serves and from where."""
        return ServedModel(self.server.model_name, self.server.task.value, self.server.version,
                           self.bundle_dir, tuple(self.server.adapter_names))


@ray.remote(num_cpus=0)
class LedgerActor:
    """A model's quotas.Ledger. Its methods never await, so each runs whole on the actor's
    event loop: the counts need no lock."""

    def __init__(self, limits: dict[str, Limits], default: Limits):
        self.ledger = quotas.Ledger(limits, default)

    async def admit(self, key: str, tokens: int) -> Admission:
        return self.ledger.admit(key, tokens)

    async def settle(self, key: str, ticket: int, tokens: int) -> None:
        self.ledger.settle(key, ticket, tokens)


@serve.deployment(name=QUOTA_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class QuotaLedger:
    """Holds the model's one LedgerActor for as long as the app runs (the actor is owned by
    this replica and goes with it), so a key's limit holds across the model's replicas. The
    replicas ask here once for the actor and then call it directly: a plain actor call costs
    about a third of a Serve handle call. The counts start afresh when Serve restarts this."""

    def __init__(self, limits: dict[str, Limits], default: Limits):
        self.actor = LedgerActor.remote(limits, default)

    async def ledger(self) -> ActorHandle:
        return self.actor


class LedgerHandle:
    """quotas.QuotaCheck through the app's LedgerActor: one call per request that does work,
    and a settlement sent without waiting. A ledger that died (restarted with its deployment)
    is asked for again once."""

    def __init__(self, deployment: DeploymentHandle):
        self.deployment = deployment
        self.actor: ActorHandle | None = None

    async def admit(self, key: str, tokens: int) -> Admission:
        if self.actor is not None:
            try:
                return await self.actor.admit.remote(key, tokens)
            except RayActorError:
                self.actor = None
        self.actor = await self.deployment.ledger.remote()
        return await self.actor.admit.remote(key, tokens)

    def settle(self, key: str, ticket: int, tokens: int) -> None:
        if self.actor is not None:
            self.actor.settle.remote(key, ticket, tokens)


class ServeModels:
    """The front's models: the applications named `<model>-service`, reached by handles. A
    LoRA adapter is reached through its base's application: `<model>:<adapter>` by its prefix,
    an adapter's own name by asking the models which adapters they serve (only when a name is
    unknown, at most every MODEL_NAMES_TTL_S)."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}  # by the name requests give
        self._targets: dict[str, str] = {}  # the name requests give -> the model that answers
        self._names: list[str] = []
        self._listed_at = float("-inf")
        self._adapters: dict[str, str] = {}  # adapter -> its model
        self._adapters_at = float("-inf")

    def names(self) -> list[str]:
        if time.monotonic() - self._listed_at > MODEL_NAMES_TTL_S:
            self._names = sorted(name.removesuffix(APP_NAME_SUFFIX)
                                 for name in serve.status().applications
                                 if name.endswith(APP_NAME_SUFFIX))
            self._listed_at = time.monotonic()
        return self._names

    async def _handle(self, model: str) -> Any:
        if model not in self._handles:
            target = await self._served_by(model)
            self._handles[model] = serve.get_app_handle(target + APP_NAME_SUFFIX)
            self._targets[model] = target
        return self._handles[model]

    async def _served_by(self, model: str) -> str:
        """The model whose application answers `model`: itself, or an adapter's base."""
        base, colon, _ = model.partition(":")
        for fresh in (False, True):
            if fresh:
                self._listed_at = float("-inf")  # deployed since the last listing?
                await self._list_adapters()
            names = self.names()
            if model in names:
                return model
            if colon and base in names:
                return base
            if self._adapters.get(model) in names:
                return self._adapters[model]
        raise UnknownModel(model)

    async def _list_adapters(self) -> None:
        if time.monotonic() - self._adapters_at <= MODEL_NAMES_TTL_S:
            return
        self._adapters_at = time.monotonic()
        found: dict[str, str] = {}
        for name in self.names():
            try:
                served = await serve.get_app_handle(name + APP_NAME_SUFFIX).describe.remote()
            except Exception as error:  # noqa: BLE001 - a model with no replica names none
                logger.info("model %s did not say its adapters: %s", name, error)
                continue
            found.update({adapter: name for adapter in served.adapters})
        self._adapters = found

    def _gone(self, model: str) -> bool:
        """Whether a model whose call failed was undeployed (its handle forgotten)."""
        self._handles.pop(model, None)
        target = self._targets.pop(model, model)
        self._listed_at = float("-inf")
        return target not in self.names()

    async def whole(self, model: str, request: Forwarded) -> Answer:
        try:
            return await (await self._handle(model)).forward.remote(request)
        except UnknownModel:
            raise
        except Exception:
            if self._gone(model):
                raise UnknownModel(model) from None
            raise

    async def stream(self, model: str, request: Forwarded) -> AsyncIterator[Answer | bytes]:
        parts = (await self._handle(model)).options(stream=True).forward_stream.remote(request)
        try:
            first = await parts.__anext__()
        except Exception:
            if self._gone(model):
                raise UnknownModel(model) from None
            raise
        yield first
        async for part in parts:
            yield part


@serve.deployment(name=FRONT_DEPLOYMENT, ray_actor_options={"num_cpus": FRONT_CPUS},
                  max_ongoing_requests=FRONT_ONGOING_REQUESTS)
@serve.ingress()
class FrontService:
    """The front's replica: no model, the routing ASGI app of front.py."""

    def __serve_build_asgi_app__(self) -> Front:
        return Front(ServeModels())


def build_front(_: dict[str, Any] | None = None) -> Application:
    return FrontService.bind()


def deployment_options(limits: ServeSpec) -> dict[str, Any]:
    """Serve's deployment options from the spec: replicas or autoscaling, resources, and room on
    each replica for a full batch, its bounded waiting queue (the replica answers 503 beyond it)
    and a few cheap requests (models, tokenize, health); Serve's default of 5 caps batches."""
    options: dict[str, Any] = {
        "max_ongoing_requests": limits.max_batch_size + limits.max_queued_requests
        + CHEAP_REQUEST_ROOM,
        "ray_actor_options": {"num_cpus": limits.replica_cpus, "num_gpus": limits.replica_gpus},
        "health_check_period_s": 10.0,
        # A replica being replaced finishes what it is serving first.
        "graceful_shutdown_timeout_s": limits.request_timeout_s,
    }
    if limits.autoscaling is None:
        options["num_replicas"] = limits.num_replicas
    else:
        options["autoscaling_config"] = limits.autoscaling.model_dump()
    return options


def build_app(args: dict[str, Any]) -> Application:
    """The application for a bundle: args `bundle_dir` and optionally `serve` (the spec's serve
    section; default: the bundle's own). API keys are read here, where the app is built."""
    bundle_dir = resolve(args["bundle_dir"]).uri  # a local path made absolute, or a URI
    limits = ServeSpec.model_validate(args.get("serve")
                                      or read_spec_and_info(bundle_dir)[0].serve.model_dump())
    deployment = ModelService.options(**deployment_options(limits))
    digests = load_key_digests(limits)
    ledger = None
    if limits.quotas is not None:  # key ids that match no key fail here, before Serve is asked
        by_key = limits_by_key(limits.quotas, digests)
        if shares_a_ledger(limits):
            ledger = QuotaLedger.bind(by_key, default_limits(limits.quotas))
    return deployment.bind(bundle_dir, limits.model_dump(mode="json"), digests,
                           args.get("model"), ledger)


def shares_a_ledger(limits: ServeSpec) -> bool:
    """Whether the model's replicas count quotas in one shared ledger: when there may be more
    than one. A single replica counts in its own process (no call per request); either way
    the counts start afresh when the model is redeployed."""
    return limits.autoscaling is not None or limits.num_replicas > 1


def endpoint_url(spec: JobSpec) -> str:
    return f"http://{spec.serve.host}:{spec.serve.port}"


def app_name(spec: JobSpec) -> str:
    """The job's own service, the model `spec.name`: at route `/<model>` and through the front
    at `/`; updated in place by a later deploy."""
    return spec.name + APP_NAME_SUFFIX


def scratch_app_name(spec: JobSpec, purpose: str) -> str:
    """An app of the job's own for a short while (sample requests, latency probes), at a route
    of its own, so that it never replaces or answers for a live service."""
    return f"{spec.name}-{purpose}-{uuid.uuid4().hex[:6]}"


def route_of(name: str, spec: JobSpec) -> str:
    return f"/{spec.name}" if name == app_name(spec) else f"/{name}"


def _serve_details() -> ServeInstanceDetails | None:
    """What Serve runs on the connected cluster; None when Serve is not started."""
    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else ServeInstanceDetails(**client.get_serve_details())


def running_apps() -> dict[str, str | None]:
    """The applications Serve runs, by name, with their route prefixes."""
    details = _serve_details()
    return {} if details is None else {
        name: app.route_prefix for name, app in details.applications.items()}


def check_deployable(spec: JobSpec, name: str) -> None:
    """Refuse, before anything is built, a deploy of app `name` that cannot succeed or would
    take over what another app serves: Serve already listening on another port than serve.port,
    the app's route held by another application, or `/` (the front's) held by one that is not
    the front. serve.quotas naming a key id that no configured key has is refused too, and
    serve.adapters that cannot be served on the run's base."""
    if spec.serve.quotas is not None:
        limits_by_key(spec.serve.quotas, load_key_digests(spec.serve))
    try:
        check_adapters(spec)
    except AdapterError as error:
        raise DeployError(str(error)) from None
    details = _serve_details()
    if details is None:
        return
    port = details.http_options.port if details.http_options else None
    if port is not None and port != spec.serve.port:
        raise DeployError(f"serve.port = {spec.serve.port}, but Ray Serve on this cluster listens "
                          f"on port {port} (its port is fixed while it runs): set serve.port={port}")
    apps = {other: app.route_prefix for other, app in details.applications.items()}
    for route, owners in ((route_of(name, spec), {name}), ("/", {FRONT_APP, name})):
        holders = [other for other, prefix in apps.items()
                   if prefix == route and other not in owners]
        if holders:
            raise DeployError(f"route {route} on this cluster is served by application "
                              f"{holders[0]!r}, which this job did not deploy; it is left as it "
                              "is. Remove it first (`orchestrator undeploy`, or serve.delete)")


def deploy(spec: JobSpec, bundle_dir: str | Path, timeout_s: float = 180.0,
           name: str | None = None) -> str:
    """Serve the bundle and return its URL once Serve reports the application RUNNING.

    `name`: the application (default: the job's own service, the model `spec.name`, at route
    `/<model>` and through the front at `/`; any other name is served at `/<name>` alone). When
    the application already runs, Serve replaces its replicas one by one (a rolling update) and
    keeps the old ones serving until new ones are healthy; other applications are not touched.
    A bundle that cannot load, a port Serve does not listen on or a route another app holds fail
    here, before Serve is touched.
    """
    name = name or app_name(spec)
    bundle_dir = resolve(bundle_dir).uri
    try:
        base_bundle(bundle_dir) if spec.serve.adapters else load_bundle(bundle_dir)
    except Exception as error:
        raise DeployError(f"cannot serve {bundle_dir}: {type(error).__name__}: {error}") from error
    check_deployable(spec, name)
    app = build_app({"bundle_dir": str(bundle_dir), "serve": spec.serve.model_dump(mode="json"),
                     "model": spec.name})
    serve.start(http_options={"host": spec.serve.host, "port": spec.serve.port})
    route = route_of(name, spec)
    serve._run(app, name=name, route_prefix=route, _blocking=False)
    wait_until_running(name, timeout_s)
    if name == app_name(spec) and FRONT_APP not in running_apps():
        serve._run(build_front(), name=FRONT_APP, route_prefix="/", _blocking=False)
        wait_until_running(FRONT_APP, timeout_s)
    return endpoint_url(spec) + route


def remove(name: str) -> None:
    """Remove one application (and only it), waiting until it is gone."""
    serve.delete(name)


def services() -> list[Service]:
    """Every application Serve runs on the connected cluster, with the model each serves."""
    details = _serve_details()
    if details is None:
        return []
    return [_service(name, app) for name, app in sorted(details.applications.items())]


def _service(name: str, app: Any) -> Service:
    ours = app.deployments.get(DEPLOYMENT_NAME)
    served = None
    if ours is not None and any(r.state == "RUNNING" for r in ours.replicas):
        served = serve.get_app_handle(name).describe.remote().result(timeout_s=30)
    running = sum(r.state == "RUNNING" for r in ours.replicas) if ours else 0
    target = ours.target_num_replicas if ours else 0
    return Service(name, app.route_prefix, str(app.status.value), f"{running}/{target}", served)


def held_by_services() -> dict[str, dict[str, float]]:
    """The resources each application's replicas hold (CPU, GPU), by application name."""
    details = _serve_details()
    held: dict[str, dict[str, float]] = {}
    for name, app in (details.applications.items() if details else ()):
        for deployment in app.deployments.values():
            for resource in ("CPU", "GPU"):
                amount = deployment.required_resources.get(resource, 0) * len(deployment.replicas)
                if amount:
                    totals = held.setdefault(name, {})
                    totals[resource] = totals.get(resource, 0) + amount
    return held


def undeploy(model: str) -> str:
    """Remove the service of `model` (its application `<model>-service`, or an application of
    that exact name); DeployError naming what is deployed when there is none."""
    apps = running_apps()
    name = next((n for n in (model + APP_NAME_SUFFIX, model) if n in apps), None)
    if name is None:
        deployed = ", ".join(sorted(apps)) or "none"
        raise DeployError(f"no service of model {model!r} on this cluster (applications: "
                          f"{deployed})")
    remove(name)
    if not any(n.endswith(APP_NAME_SUFFIX) for n in running_apps()) and \
            FRONT_APP in running_apps():
        remove(FRONT_APP)  # it routes to no model now
    return name


def wait_until_running(name: str, timeout_s: float) -> None:
    """Serve's own wait has no timeout: a replica that never gets its resources hangs it."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise DeployError(f"Serve could not deploy {name}: {status.message}")
        if time.monotonic() > deadline:
            state = status.status if status else "missing"
            raise DeployError(f"{name} is not running after {timeout_s:.0f} s (status {state}); "
                              "do the replicas' resources fit the cluster?")
        time.sleep(0.5)


def shutdown(spec: JobSpec) -> None:
    remove(app_name(spec))


def serve_config(spec: JobSpec, bundle_dir: str | Path) -> dict[str, Any]:
    """A Ray Serve config (what `serve deploy` takes) that serves this bundle as `deploy` does:
    the model at `/<model>` and the front at `/`."""
    options = deployment_options(spec.serve)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": spec.serve.host, "port": spec.serve.port},
        "applications": [{
            "name": app_name(spec),
            "route_prefix": route_of(app_name(spec), spec),
            "import_path": BUILDER_IMPORT_PATH,
            "args": {"bundle_dir": resolve(bundle_dir).uri,
                     "serve": spec.serve.model_dump(mode="json"), "model": spec.name},
            "deployments": [{"name": DEPLOYMENT_NAME, **options}],
        }, {
            "name": FRONT_APP,
            "route_prefix": "/",
            "import_path": FRONT_BUILDER_IMPORT_PATH,
            "args": {},
        }],
    }


def serve_config_yaml(spec: JobSpec, bundle_dir: str | Path) -> str:
    return yaml.safe_dump(serve_config(spec, bundle_dir), sort_keys=False)
