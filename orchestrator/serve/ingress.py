"""How requests reach the replicas: Serve's proxy actor on each node, or HAProxy straight to the
replicas with Serve's throughput-optimized mode (`orchestrator bench serve` measures both).

Ray reads the choice from the environment its processes start with, so it belongs to a cluster,
not to an application: a Ray this command embeds gets it from the spec (`serve.ingress`); a
running cluster has the one its nodes were started with, and deploy says which that is."""

from __future__ import annotations

import os
import tempfile
from enum import Enum
from pathlib import Path


class Ingress(str, Enum):
    PROXY = "proxy"
    HAPROXY = "haproxy"


# Ray Serve's own switches (ray/serve/_private/constants.py), read when its processes start.
SWITCHES: dict[Ingress, dict[str, str]] = {
    Ingress.PROXY: {},
    Ingress.HAPROXY: {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
# The actors that take requests in on each node, by the mode they say.
INGRESS_ACTORS = {"HAProxyManager": Ingress.HAPROXY, "ProxyActor": Ingress.PROXY}


def environment(ingress: Ingress, files: Path | None = None) -> dict[str, str]:
    """The variables Ray's processes need for `ingress`; for haproxy with `files`, HAProxy's
    config, sockets and server state go in that folder (Ray's default is one fixed folder in
    /tmp, which two clusters on one machine would share)."""
    env = dict(SWITCHES[ingress])
    if ingress is Ingress.HAPROXY and files is not None:
        env |= {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(files / "metrics.sock")}
    return env


def use_for_embedded_ray(ingress: Ingress) -> None:
    """Set the mode's variables in this process's environment, which the Ray it is about to
    start hands to its processes (HAProxy's files in a folder of this process's own). Variables
    the caller set already are kept: Ray's own documented way of choosing wins over the spec."""
    files = Path(tempfile.gettempdir()) / f"orchestrator-haproxy-{os.getpid()}"
    for name, value in environment(ingress, files).items():
        os.environ.setdefault(name, value)


def as_environment_line(ingress: Ingress) -> str:
    """What to set where a cluster's nodes start, e.g. before `ray start`."""
    return " ".join(f"{k}={v}" for k, v in SWITCHES[ingress].items()) or \
        "none of RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED"


def running_ingress() -> Ingress | None:
    """The mode Serve runs in on the connected cluster, from its live ingress actors (HAProxy
    mode runs Serve's proxy actors beside its HAProxyManager ones), or None when Serve has not
    started there."""
    from ray._private import state

    found = {INGRESS_ACTORS.get(actor["ActorClassName"].rsplit(".", 1)[-1])
             for actor in state.actors(actor_state_name="ALIVE").values()}
    return next((mode for mode in (Ingress.HAPROXY, Ingress.PROXY) if mode in found), None)


def mismatch(wanted: Ingress, running: Ingress | None) -> str | None:
    """A line saying the cluster serves in another mode than the spec asks, else None."""
    if running is None or running is wanted:
        return None
    return (f"serve.ingress is {wanted.value}, but this cluster's Serve runs with {running.value}: "
            f"the mode is the cluster's, set where its nodes start ({as_environment_line(wanted)})")
