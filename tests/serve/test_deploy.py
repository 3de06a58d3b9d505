"""Operating the service on a real local Ray: request timeouts, a replica killed under load,
autoscaling, a rolling update under traffic with `orchestrator deploy`, a bundle that cannot load,
`serve deploy` of the generated config, and batch inference against online answers.

Every test deploys under the same application name and port, so each deploy replaces the last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
import yaml
from conftest import REPO, SAMPLE, free_port, tiny_spec
from typing_extensions import Self

from orchestrator.bench.bundles import initial_bundle
from orchestrator.serve import DeployError, deploy
from orchestrator.spec import JobSpec, SpecError, parse_spec

NAME = "ops"
# On 2 CPUs with a replica holding 0.5, a 1-CPU actor would leave no CPU for the reads.
BESIDE_THE_SERVICE = ("--cpus", "0.5")
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


def make_spec(family: str, port: int, model: dict | None = None, data: dict | None = None,
              **serve: Any) -> JobSpec:
    raw = tiny_spec(family, serve={"port": port, "max_batch_size": 8, **serve},
                    model=model or {}, data=data or {})
    raw["name"] = NAME
    return parse_spec(raw)


@pytest.fixture(scope="module")
def serving(ray_local) -> Iterator[None]:
    from ray import serve

    serve.shutdown()  # a Serve left by an earlier module keeps its port and ignores ours
    yield
    serve.shutdown()


def health(url: str) -> dict:
    return requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()


def complete(url: str, **body: Any) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"model": NAME, **body},
                         timeout=TIMEOUT_S)


class Load:
    """A closed loop of small completion requests from a few threads; counts every outcome."""

    def __init__(self, url: str, threads: int = 2, max_tokens: int = 4):
        self.url, self.max_tokens = url, max_tokens
        self.outcomes: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                status = complete(self.url, prompt="The event loop", max_tokens=self.max_tokens,
                                  temperature=0).status_code
                self.outcomes[str(status)] += 1
            except requests.RequestException as error:
                self.outcomes[type(error).__name__] += 1

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=TIMEOUT_S)

    @property
    def failures(self) -> int:
        return sum(count for outcome, count in self.outcomes.items() if outcome != "200")


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds until condition() holds; fails the test after timeout_s."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(f"{NAME}-service")
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


# --- timeouts ------------------------------------------------------------------------------------

def test_a_request_over_the_timeout_gets_408_and_the_next_succeeds(serving, port, rows,
                                                                   tmp_path: Path) -> None:
    """A model big enough that 400 tokens take far longer than the 0.5 s timeout."""
    spec = make_spec("gpt", port, model={"n_layer": 6, "n_head": 6, "d_model": 384},
                     data={"block_size": 512}, request_timeout_s=0.5, max_new_tokens=400)
    url = deploy(spec, initial_bundle(tmp_path / "big", spec, rows[:300]))
    slow = {"prompt": "a", "max_tokens": 400, "n": 4, "temperature": 1.0}
    response = complete(url, **slow)
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    with requests.post(f"{url}/v1/completions", json={"model": NAME, **slow, "stream": True},
                       stream=True, timeout=TIMEOUT_S) as streamed:
        events = [line for line in streamed.iter_lines(decode_unicode=True) if line]
    # A stream that fails ends with an error event, then [DONE], as OpenAI's streams end.
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "request_timeout"
    assert events[-1] == "data: [DONE]"
    assert complete(url, prompt="a", max_tokens=2).status_code == 200


# --- replicas: failure and autoscaling -----------------------------------------------------------

def replica_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # This session's cluster by its GCS address: another Ray on the machine makes "auto" fail.
    address = ray.get_runtime_context().gcs_address
    return [actor.pid for actor in list_actors(address=address, limit=1000,
                                               filters=[("state", "=", "ALIVE")])
            if "ModelService" in (actor.class_name or "")]


def test_a_replica_killed_under_load_loses_at_most_its_requests(serving, port, rows,
                                                                tmp_path: Path) -> None:
    spec = make_spec("gpt", port, num_replicas=2, replica_cpus=0.25)
    url = deploy(spec, initial_bundle(tmp_path / "gpt", spec, rows))
    wait_for(lambda: len(replica_pids()) == 2, 60, "two replicas")
    with Load(url, threads=4) as load:
        time.sleep(2)
        os.kill(replica_pids()[0], signal.SIGKILL)
        time.sleep(3)
        failed_around_the_kill = load.failures
        wait_for(lambda: running_replicas() == 2, 120, "the replica's replacement")
        time.sleep(2)
    print(f"\nreplica killed under load: {dict(load.outcomes)}")
    assert load.outcomes["200"] > 20
    # Only requests in flight on the killed replica may fail: at most one per load thread.
    assert load.failures == failed_around_the_kill <= 4
    assert complete(url, prompt="a", max_tokens=2).status_code == 200


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(serving, port, rows,
                                                                        tmp_path: Path) -> None:
    spec = make_spec("gpt", port, replica_cpus=0.25, autoscaling={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 11})
    url = deploy(spec, initial_bundle(tmp_path / "gpt", spec, rows))
    assert running_replicas() == 1
    with Load(url, threads=6, max_tokens=16):
        up = wait_for(lambda: running_replicas() == 2, 90, "scaling up to 2 replicas")
    down = wait_for(lambda: running_replicas() == 1, 90, "scaling back down to 1 replica")
    print(f"\nautoscaling: up in {up:.1f} s under load, down in {down:.1f} s when idle")


# --- rollout ---------------------------------------------------------------------------------------

def orchestrator_cli(*args: str, join_ray: bool = True) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, joined to this session's Ray."""
    import ray

    address = ["--address", ray.get_runtime_context().gcs_address] if join_ray else []
    return subprocess.run([sys.executable, "-m", "orchestrator", *args, *address],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, rows, port) -> tuple[JobSpec, Path, Path]:
    """Two bundles of one job with different weights: what two runs' winners look like."""
    root = tmp_path_factory.mktemp("versions")
    spec = make_spec("gpt", port)
    return spec, initial_bundle(root / "v1", spec, rows), initial_bundle(root / "v2", spec, rows)


def test_rollout_with_orchestrator_deploy_loses_no_request(serving, versions) -> None:
    spec, v1, v2 = versions
    url = deploy(spec, v1)
    old = health(url)["version"]
    with Load(url, threads=3) as load:
        time.sleep(2)
        result = orchestrator_cli("deploy", str(v2))
        assert result.returncode == 0, result.stderr[-3000:]
        time.sleep(2)
    print(f"\nrollout under load: {dict(load.outcomes)}")
    assert health(url)["version"] not in (old, None)
    assert load.outcomes["200"] > 20 and load.failures == 0, load.outcomes


def test_a_bundle_that_cannot_load_is_refused_and_the_old_one_keeps_serving(
        serving, versions, tmp_path: Path) -> None:
    spec, _, v2 = versions
    url = deploy(spec, v2)
    serving_version = health(url)["version"]
    broken = shutil.copytree(v2, tmp_path / "broken")
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DeployError, match="cannot serve"):
        deploy(spec, broken)
    result = orchestrator_cli("deploy", str(broken))
    assert result.returncode == 1 and "cannot serve" in result.stderr, result.stderr[-3000:]
    assert health(url)["version"] == serving_version
    assert complete(url, prompt="a", max_tokens=2).status_code == 200


def test_a_service_beside_others_is_listed_undeployed_alone_and_jobs_that_cannot_deploy_refused(
        serving, versions, port, tmp_path: Path) -> None:
    """A model's service beside another app on one cluster: `orchestrator services` lists it,
    it answers at its route and through the front at `/` by its `model` field, and `undeploy`
    removes the other app while it serves on, unchanged. A job that cannot deploy (its route held
    by another app, a wrong port, more CPU than the services leave) is refused before anything
    is built, naming what is in the way. (Two models side by side through the front:
    tests/e2e/test_ingress.py behind HAProxy, test_adapters.py and test_front.py here.)"""
    from orchestrator.pipeline import run_pipeline
    from orchestrator.serve import endpoint_url, running_apps

    spec, _, v2 = versions
    root = endpoint_url(spec)
    url = deploy(spec, v2)
    assert url == f"{root}/{NAME}"
    serving_version = health(url)["version"]
    for base in (root, url):  # the front, by `model`; the model's own route
        assert complete(base, prompt="a", max_tokens=2).status_code == 200
    unknown = requests.post(f"{root}/v1/completions", json={"model": "nobody", "prompt": "a"},
                            timeout=TIMEOUT_S)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

    blocker = deploy(spec, v2, name="blocker")  # an app at /blocker, not a model's service
    assert complete(blocker, prompt="a", max_tokens=2).status_code == 200
    listed = orchestrator_cli("services")
    assert listed.returncode == 0, listed.stderr[-3000:]
    rows_by_app = {line.split()[6]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert set(rows_by_app) == {"ops-service", "blocker", "orchestrator-front"}
    assert rows_by_app["ops-service"][:6] == [NAME, "language_model", serving_version[:12],
                                              "1/1", f"/{NAME}", "RUNNING"]
    raw = {**tiny_spec("gpt", serve={"port": spec.serve.port, "keep_running": True},
                       resources={"cpus_per_worker": 0.25}),  # fits beside the services
           "name": "blocker", "runs_dir": str(tmp_path / "runs")}
    with pytest.raises(DeployError, match="route /blocker .* application 'blocker'"):
        run_pipeline(parse_spec(raw), say=lambda _: None)
    result = orchestrator_cli("deploy", str(v2), "--set", "name=blocker")
    assert result.returncode == 1 and "'blocker'" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before the data stage
    greedy = parse_spec({**raw, "name": "greedy",
                         "resources": {"num_workers": 1, "cpus_per_worker": 2}})
    with pytest.raises(SpecError, match=r"needs 2 CPU .*ops-service holds 0\.5"):
        run_pipeline(greedy, say=lambda _: None)  # would wait forever beside the services
    moved = parse_spec({**raw, "serve": {**raw["serve"], "port": spec.serve.port + 1}})
    with pytest.raises(DeployError, match=f"listens on port {spec.serve.port}"):
        deploy(moved, v2, name="moved")

    missing = orchestrator_cli("undeploy", "nosuch")
    assert missing.returncode == 1 and "no service of model 'nosuch'" in missing.stderr
    assert "Traceback" not in missing.stderr
    removed = orchestrator_cli("undeploy", "blocker")
    assert removed.returncode == 0, removed.stderr[-3000:]
    assert set(running_apps()) == {"ops-service", "orchestrator-front"}
    assert health(url)["version"] == serving_version
    assert complete(root, prompt="a", max_tokens=2).status_code == 200


# --- batch inference -------------------------------------------------------------------------------

def test_batch_predictions_match_the_service(serving, port, rows, tmp_path: Path) -> None:
    """`orchestrator predict` and the online service run the same Predictor on the same inputs."""
    spec = make_spec("classifier", port)
    bundle = initial_bundle(tmp_path / "classifier", spec, rows)
    url = deploy(spec, bundle)
    texts = [row["text"] for row in rows[:40]]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    result = orchestrator_cli("predict", str(bundle), "--input", str(inputs),
                              "--output", str(tmp_path / "out"), *BESIDE_THE_SERVICE)
    assert result.returncode == 0, result.stderr[-3000:]
    batch = pd.read_parquet(tmp_path / "out").sort_values("id")
    assert batch["id"].tolist() == list(range(len(texts)))  # other columns pass through
    online = []
    for start in range(0, len(texts), 8):
        response = requests.post(f"{url}/v1/classify", json={"input": texts[start: start + 8]},
                                 timeout=TIMEOUT_S)
        assert response.status_code == 200, response.text
        online += response.json()["data"]
    assert batch["label"].tolist() == [p["label"] for p in online]
    assert batch["score"].to_numpy() == pytest.approx([p["score"] for p in online], abs=1e-5)


def test_batch_completions_match_greedy_online_completions(serving, versions,
                                                           tmp_path: Path) -> None:
    spec, _, v2 = versions
    url = deploy(spec, v2)
    prompts = ["The event loop", "Return the number of", "Create a new", "x"]
    inputs = tmp_path / "prompts.csv"
    pd.DataFrame({"text": prompts}).to_csv(inputs, index=False)
    result = orchestrator_cli("predict", str(v2), "--input", str(inputs), "--output",
                              str(tmp_path / "out"), "--max-tokens", "8", *BESIDE_THE_SERVICE)
    assert result.returncode == 0, result.stderr[-3000:]
    batch = pd.read_parquet(tmp_path / "out").set_index("text").loc[prompts]
    online = [complete(url, prompt=p, max_tokens=8, temperature=0).json()["choices"][0]["text"]
              for p in prompts]
    assert batch["completion"].tolist() == online


# --- serve deploy ------------------------------------------------------------------------------------

def test_serve_deploy_accepts_the_generated_config(serving, versions, tmp_path: Path) -> None:
    """The production path: `orchestrator serve-config`, then Ray's own `serve deploy`."""
    import ray
    from ray import serve

    spec, _, v2 = versions
    serve.shutdown()  # a config deploy takes over the cluster's apps: start from none
    config_file = tmp_path / "serve.yaml"
    result = orchestrator_cli("serve-config", str(v2), "-o", str(config_file),
                              "--set", f"serve.port={spec.serve.port}", join_ray=False)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(config_file.read_text())
    assert config["applications"][0]["import_path"] == "orchestrator.serve.app:build_app"
    dashboard = f"http://{ray._private.worker.get_dashboard_url()}"
    deployed = subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy",
                               str(config_file), "--address", dashboard],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_AUTH_MODE": "token"}, check=False)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    url = f"http://127.0.0.1:{spec.serve.port}"

    def answers() -> bool:
        try:
            return complete(url, prompt="a", max_tokens=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(answers, 120, "the config-deployed service answering")  # through the front
    assert health(f"{url}/{NAME}")["model"] == NAME  # the model at its own route
    assert health(url)["models"] == [NAME]
