"""`orchestrator k8s`: every manifest it writes, for every shipped job, is valid against KubeRay
v1.7.0's CRD schemas (with Kubernetes' own reading of them: unknown fields refused, int-or-string,
list-type maps and sets), and says what a schema cannot: the worker groups hold what the cluster
plan asks for, the entrypoint is our CLI on the spec, the service's route and port are
serve-config's, the token and the credentials come from Secrets. No Kubernetes API server runs
here; the CRDs are what one would validate against."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import REPO, TIMING

from orchestrator.cli import _parser, main
from orchestrator.cluster import plan_for, trial_count
from orchestrator.k8s import (
    GPU,
    MAX_CRON_NAME,
    MAX_NAME,
    TOKEN_KEY,
    K8sOptions,
    Manifests,
    build,
    to_yaml,
)
from orchestrator.serve.ingress import SWITCHES, Ingress
from orchestrator.spec import JobSpec, SpecError, load_spec
from orchestrator.submit import spec_digest

# Beside the checkout, as CI lays it; a user's clone has no such folder.
CRDS = REPO.parent / "shared" / "kuberay-crds-v1.7.0"
SHIPPED = sorted(path.relative_to(REPO) for path in (REPO / "jobs").glob("*.yaml"))
IN_OBJECT_STORAGE = ["runs_dir=s3://orchestrator-test/runs",
                     "data.path=s3://orchestrator-test/data/corpus.jsonl"]
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
Validate = Callable[[dict[str, Any]], list[str]]


# --- KubeRay's CRDs, read as the Kubernetes API server reads a structural schema ------------

def _structural(schema: Any) -> Any:
    """The schema with Kubernetes' semantics made explicit for jsonschema: a field the schema
    does not name is an error (kubectl's and the API server's strict field validation), and
    x-kubernetes-int-or-string accepts an integer or a string."""
    if isinstance(schema, list):
        return [_structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _structural(value) for key, value in schema.items()}
    if isinstance(strict.get("properties"), dict) and "additionalProperties" not in strict:
        strict["additionalProperties"] = False
    if strict.get("x-kubernetes-int-or-string") is True and not {"anyOf", "type"} & set(strict):
        strict["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return strict


def _list_type(validator: Any, kind: str, instance: Any, schema: dict) -> Iterator[Any]:
    """x-kubernetes-list-type: a map's items are unique by their keys (defaults applied, e.g.
    a port's protocol), a set's items are unique."""
    if not validator.is_type(instance, "array") or kind not in ("map", "set"):
        return
    fields = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if kind == "map":
            key = tuple(json.dumps(item.get(name, fields.get(name, {}).get("default")))
                        for name in schema.get("x-kubernetes-list-map-keys", []))
        else:
            key = json.dumps(item, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"list-type {kind}: duplicate item {item!r}")
        seen.add(key)


def _cel_rules(validator: Any, rules: list[dict], instance: Any, schema: dict) -> Iterator[Any]:
    """x-kubernetes-validations (CEL) cannot be evaluated here: transition rules (oldSelf) do
    not apply on create, and a manifest that reaches any other rule fails, so it is never
    passed unchecked."""
    for rule in rules:
        if "oldSelf" not in rule["rule"]:
            yield jsonschema.ValidationError(f"sets a field whose CEL rule is not checked "
                                             f"here: {rule['rule']}")


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,  # OpenAPI v3.0's dialect: integer is a whole number, no float
    validators={"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules})


def _read_crd(file: str) -> dict[str, Any]:
    return yaml.load((CRDS / file).read_text(), Loader=getattr(yaml, "CSafeLoader",
                                                                yaml.SafeLoader))


def _v1_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return served["schema"]["openAPIV3Schema"]


def _raycronjob_crd() -> dict[str, Any]:
    """ray.io_raycronjobs.yaml when the folder has it; else the same CRD built from the RayJob
    CRD: in KubeRay v1.7.0 (ray-operator/config/crd/bases/ray.io_raycronjobs.yaml at tag
    v1.7.0) its schema is exactly this, with jobTemplate equal to the RayJob's spec schema."""
    if (CRDS / "ray.io_raycronjobs.yaml").is_file():
        return _read_crd("ray.io_raycronjobs.yaml")
    rayjob = _v1_schema(_read_crd("ray.io_rayjobs.yaml"))
    schema = {"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {"type": "object", "required": ["jobTemplate", "schedule"], "properties": {
            "jobTemplate": rayjob["properties"]["spec"], "schedule": {"type": "string"},
            "suspend": {"type": "boolean"}, "timeZone": {"minLength": 1, "type": "string"}}},
        "status": {"type": "object", "properties": {
            "lastScheduleTime": {"format": "date-time", "type": "string"}}}}}
    return {"spec": {"group": "ray.io", "names": {"kind": "RayCronJob"},
                     "versions": [{"name": "v1", "schema": {"openAPIV3Schema": schema}}]}}


def _crd_validator(crd: dict[str, Any]) -> Validate:
    validator = KubernetesValidator(_structural(_v1_schema(crd)))

    def validate(manifest: dict[str, Any]) -> list[str]:
        assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
        assert manifest["kind"] == crd["spec"]["names"]["kind"]
        return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
                for error in validator.iter_errors(manifest)]

    return validate


@pytest.fixture(scope="module")
def crds() -> dict[str, Validate]:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay v1.7.0's CRDs are not at {CRDS} (they sit beside the checkout in "
                    "CI, not in a clone): the manifests are not schema-checked")
    return {"RayJob": _crd_validator(_read_crd("ray.io_rayjobs.yaml")),
            "RayService": _crd_validator(_read_crd("ray.io_rayservices.yaml")),
            "RayCronJob": _crd_validator(_raycronjob_crd())}


# --- what a schema cannot say -----------------------------------------------------------------

def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _pod(group: dict[str, Any]) -> dict[str, float]:
    """A worker pod's Ray resources: KubeRay starts Ray with the container's limits."""
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"] == limits
    return {"CPU": limits["cpu"], "GPU": limits.get(GPU, 0)}


def _capacity(cluster: dict[str, Any]) -> dict[str, float]:
    groups = cluster["workerGroupSpecs"]
    return {key: sum(g["maxReplicas"] * _pod(g)[key] for g in groups) for key in ("CPU", "GPU")}


def _fits(item: dict[str, float], pod: dict[str, float]) -> float:
    return min((math.floor(pod[key] / need) for key, need in item.items() if need > 0),
               default=math.inf)


def through_kuberay_and_ray(entrypoint: str) -> list[str]:
    """The words `orchestrator run` gets: KubeRay's submitter runs `ray job submit ... --
    ENTRYPOINT` in bash, Ray's job CLI joins the words bash gave it (subprocess.list2cmdline)
    and its job supervisor runs that with /bin/sh; they must be the words bash read."""
    words = shlex.split(entrypoint)
    assert shlex.split(subprocess.list2cmdline(words)) == words
    return words


def check_kuberay_rules(manifest: dict[str, Any]) -> None:
    """What KubeRay v1.7's operator refuses that its CRD schema lets through (its
    utils/validation.go): names, SidecarMode's limits, token auth's Ray version, resources
    given twice, runtimeEnvYAML that is not YAML."""
    name = manifest["metadata"]["name"]
    assert len(name) <= MAX_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    if spec.get("submissionMode") == "SidecarMode":
        assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec
        assert cluster["headGroupSpec"]["template"]["spec"].get("restartPolicy",
                                                                "Never") == "Never"
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert cluster["authOptions"]["mode"] == "token"
    assert tuple(map(int, cluster["rayVersion"].split(".")[:2])) >= (2, 52)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        params = group["rayStartParams"]
        assert "labels" not in params
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params)
                    and group.get("resources"))
        assert all(isinstance(value, str) for value in params.values())
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]


def check_secrets(cluster: dict[str, Any], options: K8sOptions, spec: JobSpec) -> None:
    """Token auth and credentials on every Ray container, from Secrets; no value inlined but
    the auth mode and the switches of Serve's ingress (serve.ingress), on every container."""
    assert cluster["authOptions"] == {"mode": "token", "secretName": options.auth_secret}
    for container in _containers(cluster):
        env = {item["name"]: item for item in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {
            "name": options.auth_secret, "key": TOKEN_KEY}}
        inlined = {item["name"]: item["value"] for item in container["env"] if "value" in item}
        assert inlined == {"RAY_AUTH_MODE": "token", **SWITCHES[Ingress(spec.serve.ingress)]}
        if options.storage_secret:
            assert container["envFrom"] == [{"secretRef": {"name": options.storage_secret}}]
        else:
            assert "envFrom" not in container


def check_rayjob(spec: JobSpec, spec_path: Path, overrides: list[str], options: K8sOptions,
                 manifests: Manifests) -> None:
    """The entrypoint is `orchestrator run` of the same spec into the printed run directory
    (a new one at each tick of a schedule), and the worker groups hold what the plan asks for
    at the sweep's widest."""
    job = manifests.rayjob["spec"]
    if options.schedule is not None:
        cron = manifests.raycronjob
        assert cron["kind"] == "RayCronJob" and cron["spec"]["jobTemplate"] == job
        assert cron["spec"]["schedule"] == options.schedule
        assert cron["spec"].get("timeZone") == options.time_zone
        assert len(cron["metadata"]["name"]) <= MAX_CRON_NAME
    words = through_kuberay_and_ray(job["entrypoint"])
    assert words[:3] == ["python", "-m", "orchestrator"]
    args = _parser().parse_args(words[3:])
    if "://" in options.working_dir:  # Ray unpacks it and runs the entrypoint in it
        assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": options.working_dir}
        assert args.spec == spec_path.as_posix()
    else:
        assert "runtimeEnvYAML" not in job
        assert args.spec == f"{options.working_dir}/{spec_path.as_posix()}"
    assert (args.command, args.overrides) == ("run", overrides)
    assert args.run_dir == manifests.run_dir == job["metadata"].get("run_dir")
    if options.schedule is None:
        assert args.run_dir.startswith(spec.runs_dir.rstrip("/") + "/")
    assert spec_digest(load_spec(REPO / spec_path, args.overrides)) == spec_digest(spec) \
        == job["metadata"]["spec_sha256"]
    assert job["submissionMode"] == "SidecarMode" and job["shutdownAfterJobFinishes"] is True

    cluster = job["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head trains nothing
    assert GPU not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    use_gpu = spec.resources.use_gpu is True
    assert ("gpu-workers" in groups) == use_gpu and "cpu-workers" in groups
    assert all(g["minReplicas"] == 0 for g in groups.values())  # autoscaled from nothing

    plan = plan_for(spec, _capacity(cluster))  # the plan a driver makes on this cluster
    assert plan == manifests.plan and plan.use_gpu == use_gpu
    trials = min(spec.sweep.max_concurrent_trials or trial_count(spec), trial_count(spec))
    assert plan.concurrent_trials == trials
    resources = spec.resources
    worker = {"CPU": resources.cpus_per_worker,
              "GPU": resources.gpus_per_worker if use_gpu else 0}
    trainers = groups["gpu-workers" if use_gpu else "cpu-workers"]
    assert trainers["maxReplicas"] * _fits(worker, _pod(trainers)) >= trials * resources.max_workers
    capacity = _capacity(cluster)
    assert capacity["CPU"] >= trials * plan.trial_resources["CPU"] + plan.data_cpus
    assert capacity["GPU"] >= trials * plan.trial_resources.get("GPU", 0)
    if spec.serve.enabled:  # the job's own deploy stage checks its model on this cluster
        replica = {"CPU": spec.serve.replica_cpus, "GPU": spec.serve.replica_gpus}
        assert any(_fits(replica, _pod(g)) >= 1 for g in groups.values())


def check_rayservice(spec: JobSpec, options: K8sOptions, manifests: Manifests) -> None:
    """serveConfigV2 is serve-config's config of the bundle (Ray Serve's own schema takes it),
    listening on the pod's interfaces at serve.port, the model at /<model> and the front at /,
    the port every pod names "serve";
    the worker group holds the replicas."""
    from ray.serve.schema import ServeDeploySchema

    from orchestrator.serve.app import serve_config

    service = manifests.rayservice["spec"]
    config = yaml.safe_load(service["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    expected = serve_config(spec, REPO)
    expected["http_options"]["host"] = "0.0.0.0"
    model, _front = expected["applications"]
    model["args"]["serve"]["host"] = "0.0.0.0"
    model["args"]["bundle_dir"] = manifests.bundle
    assert config == expected
    assert [a["route_prefix"] for a in config["applications"]] == [f"/{spec.name}", "/"]
    assert config["http_options"]["port"] == spec.serve.port

    cluster = service["rayClusterConfig"]
    for container in _containers(cluster):
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["serve"] \
            == spec.serve.port
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    replica = {"CPU": spec.serve.replica_cpus, "GPU": spec.serve.replica_gpus}
    per_pod = _fits(replica, _pod(group))
    scaling = spec.serve.autoscaling
    assert group["maxReplicas"] * per_pod >= (scaling.max_replicas if scaling
                                              else spec.serve.num_replicas)
    assert group["minReplicas"] * per_pod >= (scaling.min_replicas if scaling
                                              else spec.serve.num_replicas)


# --- the tests --------------------------------------------------------------------------------

@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spec paths are relative to the current directory, as in the image's working directory."""
    monkeypatch.chdir(REPO)


VARIANTS = {  # options and overrides beyond the shipped jobs' own
    "defaults": (K8sOptions(), []),
    "zip working dir, given bundle, no storage secret": (
        K8sOptions(working_dir="s3://orchestrator-test/code/orchestrator.zip",
                   bundle="s3://orchestrator-test/runs/earlier/winner/", storage_secret=None,
                   image="registry.example/orchestrator:test", auth_secret="team-token"), []),
    "autoscaled replicas on port 8001 behind haproxy, fixed concurrency": (
        K8sOptions(), ["serve.autoscaling={min_replicas: 1, max_replicas: 6}", "serve.port=8001",
                       "serve.ingress=haproxy",
                       "serve.replica_cpus=1.5", "sweep.max_concurrent_trials=2",
                       "data.cache=false", "resources.data_cpus=3"]),
    "gpu workers and gpu replicas": (
        K8sOptions(), ["resources.use_gpu=true", "resources.num_workers=2",
                       "serve.replica_gpus=1.5", "train.global_batch_size=0"]),
    "nightly in a time zone, elastic workers": (
        K8sOptions(schedule="0 3 * * 1-5", time_zone="Europe/Berlin",
                   bundle="s3://orchestrator-test/runs/served/winner"),
        ["resources.num_workers={min: 1, max: 2}", "train.global_batch_size=0"]),
}


Case = tuple[JobSpec, Path, list[str], K8sOptions, Manifests]


@pytest.fixture(scope="module")
def every_case() -> list[Case]:
    """The manifests of every shipped job under every set of VARIANTS."""
    cases = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        for options, extra in VARIANTS.values():
            for path in SHIPPED:
                overrides = [*IN_OBJECT_STORAGE, *extra]
                spec = load_spec(path, overrides)
                cases.append((spec, path, overrides, options,
                              build(spec, path, overrides, options, NOW)))
    return cases


def test_every_manifest_for_every_shipped_job_is_valid_against_kuberays_crds(
        every_case: list[Case], crds: dict[str, Validate],
        record_property: Callable[[str, object], None]) -> None:
    validated = 0
    for spec, *_, manifests in every_case:
        for manifest in manifests.files().values():
            written = yaml.safe_load(to_yaml(manifest))
            assert written == manifest
            errors = crds[manifest["kind"]](written)
            assert not errors, f"{spec.name} {manifest['kind']}:\n" + "\n".join(errors[:20])
            validated += 1
    assert validated == 2 * len(SHIPPED) * len(VARIANTS)
    line = (f"KubeRay v1.7.0 CRDs: {validated} manifests valid (RayJob or RayCronJob, and "
            f"RayService, of {len(SHIPPED)} shipped jobs x {len(VARIANTS)} option sets)")
    print(line)
    record_property(TIMING, line)


def test_every_manifest_says_what_a_schema_cannot(in_repo: None,
                                                  every_case: list[Case]) -> None:
    for spec, path, overrides, options, manifests in every_case:
        for manifest in (manifests.rayjob, manifests.rayservice):
            check_kuberay_rules(manifest)
            cluster = manifest["spec"].get("rayClusterSpec") or manifest["spec"][
                "rayClusterConfig"]
            check_secrets(cluster, options, spec)
        check_rayjob(spec, path, overrides, options, manifests)
        check_rayservice(spec, options, manifests)


def test_the_job_gets_a_gpu_group_sized_by_the_plan(in_repo: None) -> None:
    """jobs/gpu.yaml: 2 trials at once x 2 workers x 1 GPU = 4 GPU pods of 4 CPUs at most (the
    shape of cluster.yaml's gpu_worker), one CPU pod for data; its GPU replicas share GPUs."""
    overrides = IN_OBJECT_STORAGE
    manifests = build(load_spec("jobs/gpu.yaml", overrides), Path("jobs/gpu.yaml"), overrides,
                      K8sOptions(), NOW)
    groups = {g["groupName"]: (g["minReplicas"], g["maxReplicas"], _pod(g))
              for g in manifests.rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups == {"gpu-workers": (0, 4, {"CPU": 4, "GPU": 1}),
                      "cpu-workers": (0, 1, {"CPU": 4, "GPU": 0})}
    assert manifests.run_dir == "s3://orchestrator-test/runs/gpu-lm-20260102-030405"
    assert manifests.bundle == manifests.run_dir + "/winner"
    (service,) = manifests.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (service["groupName"], _pod(service)) == ("gpu-replicas", {"CPU": 1, "GPU": 1})


@pytest.mark.parametrize(("overrides", "named"), [
    (["data.path=s3://b/data.jsonl"], ["runs_dir = 'runs'"]),
    (["runs_dir=s3://b/runs"], ["data.path = 'jobs/data/stdlib_docs.jsonl'"]),
    (["runs_dir=file:///mnt/runs", "data.path=/mnt/data.jsonl"],
     ["runs_dir = 'file:///mnt/runs'", "data.path = '/mnt/data.jsonl'"]),
])
def test_local_storage_is_refused_by_name_before_anything_is_written(
        in_repo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        overrides: list[str], named: list[str]) -> None:
    output = tmp_path / "manifests"
    sets = [arg for override in overrides for arg in ("--set", override)]
    assert main(["k8s", "jobs/quickstart.yaml", *sets, "-o", str(output)]) == 2
    error = capsys.readouterr().err
    assert all(name in error for name in named) and "object storage" in error, error
    assert not output.exists()


@pytest.mark.parametrize(("options", "named"), [
    (K8sOptions(bundle="runs/quickstart/winner"), "--bundle 'runs/quickstart/winner'"),
    (K8sOptions(working_dir="s3://b/code"), "--working-dir 's3://b/code'"),
    (K8sOptions(working_dir="app"), "--working-dir 'app'"),
])
def test_options_that_cannot_work_are_refused(in_repo: None, options: K8sOptions,
                                              named: str) -> None:
    spec = load_spec("jobs/quickstart.yaml", IN_OBJECT_STORAGE)
    with pytest.raises(SpecError, match=re.escape(named)):
        build(spec, Path("jobs/quickstart.yaml"), IN_OBJECT_STORAGE, options, NOW)


def test_gpu_replicas_need_gpus_in_the_jobs_cluster(in_repo: None) -> None:
    overrides = [*IN_OBJECT_STORAGE, "serve.replica_gpus=1"]
    with pytest.raises(SpecError, match="serve.replica_gpus = 1 and resources.use_gpu = 'auto'"):
        build(load_spec("jobs/quickstart.yaml", overrides), Path("jobs/quickstart.yaml"),
              overrides, K8sOptions(), NOW)


def test_a_spec_outside_the_working_directory_is_refused(in_repo: None, tmp_path: Path) -> None:
    """The entrypoint names the spec by its path in the image: one outside the current
    directory is in neither."""
    outside = tmp_path / "job.yaml"
    outside.write_text((REPO / "jobs" / "quickstart.yaml").read_text())
    spec = load_spec(outside, IN_OBJECT_STORAGE)
    with pytest.raises(SpecError, match="outside the current directory"):
        build(spec, outside, IN_OBJECT_STORAGE, K8sOptions(), NOW)


@pytest.mark.parametrize(("override", "survives"), [
    ("train.betas=[0.9,0.95]", False),  # bare brackets: a glob to /bin/sh
    ("train.betas=[0.9, 0.95]", True),  # with a space: double-quoted by Ray's CLI
    ("serve.sample_requests=[it's]", False),
    ('serve.sample_requests=["say $HOME"]', False),
    ("serve.sample_requests=[it's fine, really]", True),
])
def test_the_entrypoint_survives_kuberays_and_rays_shells_or_is_refused(
        in_repo: None, override: str, survives: bool) -> None:
    overrides = [*IN_OBJECT_STORAGE, override]
    spec = load_spec("jobs/quickstart.yaml", overrides)
    if not survives:
        with pytest.raises(SpecError, match="two shells"):
            build(spec, Path("jobs/quickstart.yaml"), overrides, K8sOptions(), NOW)
        return
    manifests = build(spec, Path("jobs/quickstart.yaml"), overrides, K8sOptions(), NOW)
    words = through_kuberay_and_ray(manifests.rayjob["spec"]["entrypoint"])
    assert _parser().parse_args(words[3:]).overrides == overrides


def test_the_cli_writes_both_files_and_rewrites_only_its_own(
        in_repo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "k8s"
    command = ["k8s", "jobs/quickstart.yaml", "--set", "runs_dir=s3://b/runs",
               "--set", "data.path=s3://b/data.jsonl", "-o", str(output)]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in output.iterdir()) == ["rayjob.yaml", "rayservice.yaml"]
    manifests = {name: yaml.safe_load((output / name).read_text())
                 for name in ("rayjob.yaml", "rayservice.yaml")}
    assert [m["kind"] for m in manifests.values()] == ["RayJob", "RayService"]
    run_dir = manifests["rayjob.yaml"]["spec"]["metadata"]["run_dir"]
    assert run_dir in printed and f"{run_dir}/winner" in printed

    assert main(command) == 0  # only our files there: rewritten
    (output / "notes.txt").write_text("mine")
    assert main(command) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (output / "notes.txt").read_text() == "mine"


def test_names_become_kuberay_names(in_repo: None) -> None:
    overrides = [*IN_OBJECT_STORAGE, f"name=9_Big.Job_{'x' * 60}"]
    spec = load_spec("jobs/quickstart.yaml", overrides)
    manifests = build(spec, Path("jobs/quickstart.yaml"), overrides,
                      replace(K8sOptions(), storage_secret=None), NOW)
    for manifest in (manifests.rayjob, manifests.rayservice):
        check_kuberay_rules(manifest)
        assert manifest["metadata"]["name"].startswith("job-9-big-job-x")


def test_the_schema_check_refuses_what_kubernetes_refuses(in_repo: None,
                                                          crds: dict[str, Validate]) -> None:
    """The validator above is not lenient: each break of a manifest is one error at its path."""
    spec = load_spec("jobs/quickstart.yaml", IN_OBJECT_STORAGE)
    good = build(spec, Path("jobs/quickstart.yaml"), IN_OBJECT_STORAGE, K8sOptions(), NOW).rayjob
    cluster = "spec.rayClusterSpec"
    worker = f"{cluster}.workerGroupSpecs.0"
    container = f"{worker}.template.spec.containers.0"
    breaks: dict[str, Callable[[dict[str, Any]], None]] = {
        f"{cluster}: Additional properties": lambda m: m["spec"]["rayClusterSpec"].update(
            enableAutoscaling=True),  # a misspelt field
        f"{worker}.maxReplicas: 2.0 is not of type 'integer'": lambda m: _worker(m).update(
            maxReplicas=2.0),
        f"{worker}.rayStartParams.num-cpus: 0 is not of type 'string'": lambda m: _worker(
            m)["rayStartParams"].update({"num-cpus": 0}),
        f"{container}.resources.limits.cpu: '4 cores' does not match": lambda m: _container(
            m)["resources"]["limits"].update(cpu="4 cores"),
        f"{container}.env: list-type map: duplicate": lambda m: _container(m)["env"].append(
            {"name": "RAY_AUTH_MODE", "value": "disabled"}),
        "spec.deletionStrategy: sets a field whose CEL rule": lambda m: m["spec"].update(
            deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}),
        f"{cluster}.authOptions.mode: 'tokens' is not one of": lambda m: m["spec"][
            "rayClusterSpec"]["authOptions"].update(mode="tokens"),
    }
    assert not crds["RayJob"](good)
    for expected, damage in breaks.items():
        broken = json.loads(json.dumps(good))
        damage(broken)
        errors = crds["RayJob"](broken)
        assert any(error.startswith(expected) for error in errors), (expected, errors)
    quantity = json.loads(json.dumps(good))
    _container(quantity)["resources"]["limits"]["cpu"] = "500m"  # int-or-string: both are
    assert not crds["RayJob"](quantity)


def _worker(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    return _worker(manifest)["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(("options", "named"), [
    (K8sOptions(schedule="0 3 * *", bundle="s3://b/w"), "--schedule '0 3 * *': expected 5 fields"),
    (K8sOptions(schedule="0 24 * * *", bundle="s3://b/w"), "its hour field '24' is not 0-23"),
    (K8sOptions(schedule="0 3 * * funday", bundle="s3://b/w"), "day of week field 'funday'"),
    (K8sOptions(schedule="@every day", bundle="s3://b/w"), "@every takes a duration"),
    (K8sOptions(schedule="CRON_TZ=UTC 0 3 * * *", bundle="s3://b/w"), "--time-zone, not in"),
    (K8sOptions(schedule="@daily", time_zone="Mars/Olympus", bundle="s3://b/w"),
     "--time-zone 'Mars/Olympus': not a time zone"),
    (K8sOptions(schedule="@daily"), "give the bundle it serves with --bundle"),
])
def test_schedules_kuberay_would_refuse_are_refused_here(in_repo: None, options: K8sOptions,
                                                         named: str) -> None:
    """KubeRay refuses a bad schedule only in the operator's events, after `kubectl apply`
    succeeded; here it is refused before anything is written."""
    spec = load_spec("jobs/quickstart.yaml", IN_OBJECT_STORAGE)
    with pytest.raises(SpecError, match=re.escape(named)):
        build(spec, Path("jobs/quickstart.yaml"), IN_OBJECT_STORAGE, options, NOW)


@pytest.mark.parametrize("schedule", ["*/15 0-6,22-23 ? JAN-MAR mon-fri", "@hourly",
                                      "@every 1h30m", "0 0 1 */2 *"])
def test_schedules_kuberay_takes_are_taken(in_repo: None, schedule: str) -> None:
    spec = load_spec("jobs/quickstart.yaml", IN_OBJECT_STORAGE)
    manifests = build(spec, Path("jobs/quickstart.yaml"), IN_OBJECT_STORAGE,
                      K8sOptions(schedule=schedule, bundle="s3://b/runs/x/winner"), NOW)
    assert manifests.raycronjob["spec"]["schedule"] == schedule


def test_the_cli_writes_a_raycronjob_with_a_schedule(
        in_repo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "k8s"
    assert main(["k8s", "jobs/quickstart.yaml", "--set", "runs_dir=s3://b/runs",
                 "--set", "data.path=s3://b/data.jsonl", "-o", str(output),
                 "--schedule", "0 3 * * *", "--bundle", "s3://b/served/winner"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in output.iterdir()) == ["raycronjob.yaml", "rayservice.yaml"]
    cron = yaml.safe_load((output / "raycronjob.yaml").read_text())
    assert (cron["kind"], cron["spec"]["schedule"]) == ("RayCronJob", "0 3 * * *")
    words = through_kuberay_and_ray(cron["spec"]["jobTemplate"]["entrypoint"])
    assert _parser().parse_args(words[3:]).run_dir is None  # each run names its own
    assert "s3://b/runs" in printed and "s3://b/served/winner" in printed
