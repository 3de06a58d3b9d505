"""KubeRay manifests from a job spec (`orchestrator k8s`): a RayJob that runs the job on a Ray
cluster of its own (or, with a schedule, a RayCronJob that creates one such RayJob at each tick),
and a RayService that serves the winner the run writes.

Both clusters have the shape of `cluster.yaml`: a head that advertises 0 CPUs (it runs the GCS,
the dashboard, the job driver and Serve's controller, never training), worker groups that KubeRay's
in-tree autoscaler grows from 0 to the size the cluster plan (cluster.plan_for) asks for, token
auth with the token in a Secret, and object-storage credentials from a Secret. Nothing secret is
ever written into a manifest: Secrets are referenced by name.

Pods on Kubernetes share no disk, so the run directory and the data must be object storage; the
RayJob names its run directory (`run --run-dir`), so that the RayService written beside it serves
`<run directory>/winner` unless told another bundle. A scheduled job writes a new run directory
each time (`<runs_dir>/<name>-<UTC time>`), so its RayService serves the bundle it is given.
"""

from __future__ import annotations

import math
import re
import shlex
import zoneinfo
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from orchestrator.cluster import ClusterPlan, plan_for
from orchestrator.serve.ingress import SWITCHES, Ingress
from orchestrator.spec import JobSpec, SpecError
from orchestrator.submit import join, spec_digest

API_VERSION = "ray.io/v1"  # KubeRay's CRDs, checked against v1.7.0's
FILES = ("rayjob.yaml", "raycronjob.yaml", "rayservice.yaml")  # what `write` may rewrite
OBJECT_STORAGE = ("s3", "gs", "gcs", "abfs", "abfss", "az")
TOKEN_KEY = "auth_token"  # the Secret key KubeRay reads the Ray auth token from
MAX_NAME = 47  # KubeRay 1.7: RayJob and RayService names (a RayCluster's 53, less a suffix)
MAX_CRON_NAME = MAX_NAME - 11  # KubeRay 1.7: its RayJobs are named <name>-<tick's hash>
# A 5-field schedule as KubeRay reads it (robfig/cron's ParseStandard): each field a list of *,
# ?, numbers or names, ranges a-b, steps /n; or a descriptor.
CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
               ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep",
                                 "oct", "nov", "dec")),
               ("day of week", 0, 6, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                    "@hourly")
GPU = "nvidia.com/gpu"
# A plan on a cluster no sweep fills: what the job asks for at its widest.
UNBOUNDED = 1e9
# The head's ports (KubeRay's names; "serve" is the port its Serve Service targets).
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


def _default_image() -> str:
    return f"orchestrator:{version('orchestrator')}"


@dataclass(frozen=True)
class K8sOptions:
    """What the spec does not say about a Kubernetes cluster; the defaults are documented in
    docs/operations.md (Kubernetes)."""

    image: str = field(default_factory=_default_image)  # Ray 2.60, torch and this project
    working_dir: str = "/app"  # the project in the image, or a .zip URI Ray downloads
    bundle: str | None = None  # served by the RayService; default <the RayJob's run>/winner
    auth_secret: str = "ray-auth-token"  # Secret with key auth_token
    storage_secret: str | None = "object-storage"  # Secret of AWS_* (or other) variables
    head_cpus: int = 2
    head_memory_gib: int = 8
    worker_cpus: int = 4  # a CPU worker pod (at least one training worker or replica)
    memory_per_cpu_gib: int = 4
    idle_timeout_s: int = 300  # an idle worker pod goes after this (cluster.yaml: 5 minutes)
    ttl_after_finished_s: int = 300  # the job's cluster stays this long for its logs
    schedule: str | None = None  # cron: a RayCronJob instead of a RayJob
    time_zone: str | None = None  # of the schedule; default: the KubeRay operator's


@dataclass(frozen=True)
class PodShape:
    cpus: int
    gpus: int = 0

    def fits(self, item: dict[str, float]) -> float:
        """How many of `item` (CPU, GPU) one pod holds (inf for an item that needs neither)."""
        counts = [math.floor(have / item[key]) for key, have in
                  (("CPU", self.cpus), ("GPU", self.gpus)) if item.get(key, 0) > 0]
        return min(counts, default=math.inf)


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    pod: PodShape
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class ClusterShape:
    """The worker groups of a RayCluster; its head has no CPU for tasks."""

    groups: tuple[WorkerGroup, ...]

    def capacity(self) -> dict[str, float]:
        """Every group at its max replicas, as Ray counts resources (what plan_for takes)."""
        return {"CPU": sum(g.max_replicas * g.pod.cpus for g in self.groups),
                "GPU": sum(g.max_replicas * g.pod.gpus for g in self.groups)}


@dataclass(frozen=True)
class Manifests:
    rayjob: dict[str, Any]  # with a schedule, the RayCronJob's template (kind RayJob)
    rayservice: dict[str, Any]
    run_dir: str | None  # what the RayJob's run creates; None: a new one at each tick
    bundle: str  # what the RayService serves
    plan: ClusterPlan  # the job's plan on the RayJob's cluster at its largest
    raycronjob: dict[str, Any] | None = None

    def files(self) -> dict[str, dict[str, Any]]:
        """What `write` writes, by file name."""
        if self.raycronjob:
            return {"raycronjob.yaml": self.raycronjob, "rayservice.yaml": self.rayservice}
        return {"rayjob.yaml": self.rayjob, "rayservice.yaml": self.rayservice}


def _pods(count: float, item: dict[str, float], pod: PodShape) -> int:
    """Pods of `pod`'s shape that hold `count` of `item`."""
    return math.ceil(count / pod.fits(item)) if count > 0 else 0


def in_object_storage(location: str) -> bool:
    return location.startswith(tuple(f"{scheme}://" for scheme in OBJECT_STORAGE))


def require_object_storage(spec: JobSpec) -> None:
    """Refuse local paths: every pod reads the data and writes the run, and pods share no
    disk."""
    bad = [f"{name} = {value!r}" for name, value in
           (("runs_dir", spec.runs_dir), ("data.path", spec.data.path))
           if not in_object_storage(value)]
    if bad:
        raise SpecError(f"{'; '.join(bad)}: on Kubernetes every pod reads the data and writes the "
                        "run directory, and pods share no disk, so these must be object storage "
                        f"({', '.join(s + '://' for s in OBJECT_STORAGE)}), e.g. "
                        "--set runs_dir=s3://bucket/runs --set data.path=s3://bucket/data.jsonl")


def k8s_name(name: str, longest: int = MAX_NAME) -> str:
    """The job's name as KubeRay takes it: a DNS-1035 label of at most `longest` characters."""
    label = "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower())
    label = "-".join(part for part in label.split("-") if part)
    if not label[:1].isalpha():
        label = f"job-{label}"
    return label[:longest].rstrip("-")


def training_cluster(spec: JobSpec, options: K8sOptions) -> tuple[ClusterShape, ClusterPlan]:
    """The RayJob's worker groups, sized so that the sweep runs as many trials at once as it
    can use, and the plan on them. GPUs only with resources.use_gpu true ('auto' on a cluster
    we write is a CPU cluster); room for the job's own service check on a CPU or GPU pod."""
    resources, serving = spec.resources, spec.serve
    widest = plan_for(spec, {"CPU": UNBOUNDED,
                             "GPU": UNBOUNDED if resources.use_gpu is True else 0})
    worker = {key: amount / resources.max_workers
              for key, amount in widest.trial_resources.items()}
    workers = widest.concurrent_trials * resources.max_workers
    replica_cpus = serving.replica_cpus if serving.enabled else 0
    replica_gpus = serving.replica_gpus if serving.enabled else 0
    if replica_gpus > 0 and not widest.use_gpu:
        raise SpecError(f"serve.replica_gpus = {serving.replica_gpus:g} and resources.use_gpu = "
                        f"{resources.use_gpu!r}: the RayJob's cluster has GPUs only with "
                        "resources.use_gpu true; set it, or serve.enabled=false for the job (the "
                        "RayService serves the winner on GPUs)")
    data = {"CPU": 1.0}
    cpu_pod = PodShape(max(options.worker_cpus, math.ceil(replica_cpus),
                           0 if widest.use_gpu else math.ceil(worker["CPU"])))
    groups = []
    if widest.use_gpu:
        gpu_pod = PodShape(max(math.ceil(worker["CPU"]), math.ceil(replica_cpus), 1),
                           max(math.ceil(worker["GPU"]), math.ceil(replica_gpus), 1))
        groups.append(WorkerGroup("gpu-workers", gpu_pod, 0, _pods(workers, worker, gpu_pod)))
        cpu_pods = _pods(widest.data_cpus, data, cpu_pod)
    else:
        cpu_pods = _pods(workers, worker, cpu_pod) + _pods(widest.data_cpus, data, cpu_pod)
    # At least one: the data stage and evaluation need CPUs, and the head has none.
    groups.append(WorkerGroup("cpu-workers", cpu_pod, 0, max(cpu_pods, 1)))
    shape = ClusterShape(tuple(groups))
    return shape, plan_for(spec, shape.capacity())


def serving_cluster(spec: JobSpec, options: K8sOptions) -> ClusterShape:
    """The RayService's worker group: pods for serve.num_replicas, or for autoscaling's
    min_replicas up to its max_replicas."""
    serving = spec.serve
    replica = {"CPU": serving.replica_cpus, "GPU": serving.replica_gpus}
    scaling = serving.autoscaling
    least = scaling.min_replicas if scaling else serving.num_replicas
    most = scaling.max_replicas if scaling else serving.num_replicas
    if serving.replica_gpus > 0:
        gpus = math.ceil(serving.replica_gpus)
        per_pod = math.floor(gpus / serving.replica_gpus)
        pod, name = PodShape(max(math.ceil(serving.replica_cpus * per_pod), 1), gpus), "gpu-replicas"
    else:
        pod, name = PodShape(max(options.worker_cpus, math.ceil(serving.replica_cpus))), "cpu-replicas"
    return ClusterShape((WorkerGroup(name, pod, _pods(least, replica, pod),
                                     _pods(most, replica, pod)),))


def _env(options: K8sOptions, ingress: Ingress) -> list[dict[str, Any]]:
    """Token auth on every Ray container, the token from the Secret (KubeRay injects the same
    from authOptions; written here so the manifest says it), and the variables of Serve's
    ingress (serve.ingress), which Ray reads where its processes start."""
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": options.auth_secret, "key": TOKEN_KEY}}},
            *({"name": name, "value": value} for name, value in SWITCHES[ingress].items())]


def _container(name: str, pod: PodShape, memory_gib: int, options: K8sOptions,
               ports: dict[str, int], ingress: Ingress) -> dict[str, Any]:
    """A Ray container: requests equal to limits (Ray sizes its node from the limits)."""
    def amounts() -> dict[str, Any]:
        return {"cpu": pod.cpus, "memory": f"{memory_gib}Gi", **({GPU: pod.gpus} if pod.gpus else {})}

    container: dict[str, Any] = {
        "name": name, "image": options.image,
        "resources": {"requests": amounts(), "limits": amounts()},
        "env": _env(options, ingress),
    }
    if options.storage_secret:
        container["envFrom"] = [{"secretRef": {"name": options.storage_secret}}]
    if ports:
        container["ports"] = [{"name": port, "containerPort": number}
                              for port, number in ports.items()]
    return container


def ray_cluster_spec(shape: ClusterShape, options: K8sOptions, ingress: Ingress,
                     serve_port: int | None = None) -> dict[str, Any]:
    """A RayCluster spec: the 0-CPU head, the worker groups autoscaled between their replica
    bounds, token auth, Serve's `ingress`. `serve_port`: the port Serve listens on
    (RayService), named "serve" on every pod for KubeRay's Serve Service and readiness checks."""
    serve_ports = {"serve": serve_port} if serve_port else {}
    head = PodShape(options.head_cpus)
    return {
        "rayVersion": version("ray"),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"idleTimeoutSeconds": options.idle_timeout_s,
                              "upscalingMode": "Default"},
        "authOptions": {"mode": "token", "secretName": options.auth_secret},
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},
            "template": {"spec": {"containers": [_container(
                "ray-head", head, options.head_memory_gib, options,
                {**HEAD_PORTS, **serve_ports} if serve_ports else {}, ingress)]}},
        },
        "workerGroupSpecs": [{
            "groupName": group.name,
            "minReplicas": group.min_replicas,
            "maxReplicas": group.max_replicas,
            "rayStartParams": {},
            "template": {"spec": {"containers": [_container(
                "ray-worker", group.pod, options.memory_per_cpu_gib * group.pod.cpus, options,
                serve_ports, ingress)]}},
        } for group in shape.groups],
    }


def _metadata(spec: JobSpec, longest: int = MAX_NAME) -> dict[str, Any]:
    name = k8s_name(spec.name, longest)
    return {"name": name, "labels": {"app.kubernetes.io/name": "orchestrator",
                                     "app.kubernetes.io/instance": name}}


def entrypoint(spec_path: Path, overrides: list[str], run_dir: str | None,
               working_dir: str) -> str:
    """`orchestrator run` of the spec in the image or the working directory (its path from the
    current directory here is its path from the working directory there), with the overrides
    and the run directory chosen here (None: the run names its own, as each scheduled run
    must).

    KubeRay pastes the entrypoint into a bash line (`ray job submit ... -- ENTRYPOINT`) and
    Ray's job CLI joins the words bash gave it for /bin/sh, so a word that the second shell
    would read differently (a quote, a `$`, brackets without a space) is refused, naming it."""
    try:
        relative = spec_path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        raise SpecError(f"job spec {str(spec_path)!r} is outside the current directory: run "
                        "`orchestrator k8s` from the directory that the image holds at "
                        "--working-dir (or that its .zip URI holds)") from None
    in_image = relative if "://" in working_dir else f"{working_dir.rstrip('/')}/{relative}"
    words = ["python", "-m", "orchestrator", "run", in_image,
             *[word for override in overrides for word in ("--set", override)],
             *(["--run-dir", run_dir] if run_dir else [])]
    for word in words:
        if not _survives_both_shells(word):
            raise SpecError(f"{word!r} would not reach `orchestrator run` as written (KubeRay "
                            "and Ray pass the entrypoint through two shells): write it in the "
                            "spec file, or for a YAML list or mapping put a space after each "
                            "comma, e.g. train.betas=[0.9, 0.95]")
    return shlex.join(words)


def _survives_both_shells(word: str) -> bool:
    """Whether bash then sh read `word` as it is: shlex's plain characters, or, with a space
    (Ray's CLI then double-quotes it), no character that is special in double quotes."""
    if " " in word:
        return not set(word) & set('$`"\\\t\n')
    return re.fullmatch(r"[\w@%+=:,./-]+", word, re.ASCII) is not None


def rayjob(spec: JobSpec, spec_path: Path, overrides: list[str], options: K8sOptions,
           run_dir: str | None) -> tuple[dict[str, Any], ClusterPlan]:
    """The RayJob: KubeRay starts the cluster, submits the entrypoint from a sidecar in the head
    pod (SidecarMode, KubeRay >= 1.5: no submitter Job), and deletes the cluster after the job."""
    shape, plan = training_cluster(spec, options)
    job: dict[str, Any] = {
        "entrypoint": entrypoint(spec_path, overrides, run_dir, options.working_dir),
        "submissionMode": "SidecarMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": options.ttl_after_finished_s,
        "metadata": {"spec_name": spec.name, "spec_sha256": spec_digest(spec)},
    }
    if run_dir:
        job["metadata"] = {"job_name": run_dir.rsplit("/", 1)[-1], "run_dir": run_dir,
                           **job["metadata"]}
    if "://" in options.working_dir:
        job["runtimeEnvYAML"] = yaml.safe_dump({"working_dir": options.working_dir})
    job["rayClusterSpec"] = ray_cluster_spec(shape, options, Ingress(spec.serve.ingress))
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": _metadata(spec),
            "spec": job}, plan


def raycronjob(spec: JobSpec, job: dict[str, Any], options: K8sOptions) -> dict[str, Any]:
    """The RayCronJob (KubeRay >= 1.6): a RayJob of `job`'s spec at each tick of the schedule."""
    cron: dict[str, Any] = {"schedule": options.schedule}
    if options.time_zone:
        cron["timeZone"] = options.time_zone
    cron["jobTemplate"] = job["spec"]
    return {"apiVersion": API_VERSION, "kind": "RayCronJob",
            "metadata": _metadata(spec, MAX_CRON_NAME), "spec": cron}


def check_schedule(schedule: str, time_zone: str | None) -> None:
    """Refuse, naming it, a schedule or time zone KubeRay would refuse (after `kubectl apply`
    succeeded, in the operator's events)."""
    allowed = ("5 fields (minute hour day-of-month month day-of-week: *, numbers or names, "
               f"a-b ranges, /n steps, commas), {', '.join(CRON_DESCRIPTORS)} or @every "
               "DURATION (e.g. @every 6h)")
    fields = schedule.split()
    if "TZ" in schedule:
        raise SpecError(f"--schedule {schedule!r}: give the time zone as --time-zone, not in "
                        "the schedule")
    if len(fields) == 1 and fields[0] in CRON_DESCRIPTORS:
        pass
    elif len(fields) == 2 and fields[0] == "@every":
        if not re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", fields[1]):
            raise SpecError(f"--schedule {schedule!r}: @every takes a duration such as 30m, "
                            "6h or 1h30m")
    elif len(fields) != 5:
        raise SpecError(f"--schedule {schedule!r}: expected {allowed}")
    else:
        for text, (name, low, high, names) in zip(fields, CRON_FIELDS):
            if not all(_cron_item(item, low, high, names) for item in text.split(",")):
                raise SpecError(f"--schedule {schedule!r}: its {name} field {text!r} is not "
                                f"{low}-{high}{' or a name' if names else ''} (*, a-b, /n, "
                                "lists with commas)")
    if time_zone is not None:
        try:
            zoneinfo.ZoneInfo(time_zone)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            raise SpecError(f"--time-zone {time_zone!r}: not a time zone name (e.g. UTC, "
                            "Europe/Berlin)") from None


def _cron_item(item: str, low: int, high: int, names: tuple[str, ...]) -> bool:
    """One comma-separated item of a cron field: *, ?, a value or a range, with a /step."""
    item, _, step = item.partition("/")
    if step and not (step.isdigit() and int(step) > 0):
        return False
    if item in ("*", "?"):
        return True

    def value(text: str) -> int | None:
        if text.lower() in names:
            return low + names.index(text.lower())
        return int(text) if text.isdigit() else None

    ends = [value(text) for text in item.split("-")]
    return (len(ends) in (1, 2) and None not in ends and all(low <= e <= high for e in ends)
            and ends[0] <= ends[-1])


def serve_config_for(spec: JobSpec, bundle: str) -> dict[str, Any]:
    """`orchestrator serve-config`'s Serve config for `bundle`, listening on every interface
    of the pod (KubeRay's Service reaches Serve on the pod's IP).

    serve_config resolves its bundle, which for a URI asks the bucket; manifests are written
    without access to it, so the bundle's URI is set after. Imports Ray (serve.app)."""
    from orchestrator.serve.app import serve_config

    in_pod = spec.model_copy(update={"serve": spec.serve.model_copy(update={"host": "0.0.0.0"})})
    config = serve_config(in_pod, Path.cwd())
    for app in config["applications"]:
        if "bundle_dir" in app["args"]:  # the model's (the front's has none)
            app["args"]["bundle_dir"] = bundle
    return config


def rayservice(spec: JobSpec, bundle: str, options: K8sOptions) -> dict[str, Any]:
    """The RayService: serve-config's Serve config on a cluster sized for the replicas."""
    config = serve_config_for(spec, bundle)
    return {"apiVersion": API_VERSION, "kind": "RayService", "metadata": _metadata(spec),
            "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False),
                     "rayClusterConfig": ray_cluster_spec(
                         serving_cluster(spec, options), options, Ingress(spec.serve.ingress),
                         spec.serve.port)}}


def build(spec: JobSpec, spec_path: Path, overrides: list[str], options: K8sOptions,
          now: datetime | None = None) -> Manifests:
    """Both manifests, or a SpecError naming what cannot run on Kubernetes."""
    require_object_storage(spec)
    bundle = options.bundle
    if bundle is not None and not in_object_storage(bundle):
        raise SpecError(f"--bundle {bundle!r}: the RayService's pods read the bundle, so it "
                        "must be in object storage, e.g. s3://bucket/runs/<run>/winner")
    if "://" in options.working_dir and not options.working_dir.endswith(".zip"):
        raise SpecError(f"--working-dir {options.working_dir!r}: Ray downloads a remote working "
                        "directory as a .zip URI; or give the project's path in the image")
    if "://" not in options.working_dir and not options.working_dir.startswith("/"):
        raise SpecError(f"--working-dir {options.working_dir!r}: give the project's absolute "
                        "path in the image (e.g. /app) or a .zip URI")
    if options.schedule is None:
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
        run_dir: str | None = join(spec.runs_dir, f"{spec.name}-{stamp}")
        bundle = (bundle or f"{run_dir}/winner").rstrip("/")
    else:
        check_schedule(options.schedule, options.time_zone)
        if bundle is None:
            raise SpecError(f"--schedule {options.schedule!r}: each scheduled run writes a new "
                            f"run directory under {spec.runs_dir}, so the RayService cannot "
                            "name one: give the bundle it serves with --bundle")
        run_dir, bundle = None, bundle.rstrip("/")
    job, plan = rayjob(spec, spec_path, overrides, options, run_dir)
    cron = raycronjob(spec, job, options) if options.schedule is not None else None
    return Manifests(job, rayservice(spec, bundle, options), run_dir, bundle, plan, cron)


class _Dumper(yaml.SafeDumper):
    """safe_dump's dumper that writes multi-line strings (serveConfigV2) as blocks and never
    aliases a repeated object."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_yaml(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)


def write(manifests: Manifests, directory: Path) -> list[Path]:
    """Write rayjob.yaml (or raycronjob.yaml) and rayservice.yaml into a new or empty directory,
    or one holding only files of FILES (rewritten): nothing we did not write is touched."""
    if directory.exists() and not directory.is_dir():
        raise SpecError(f"-o {str(directory)!r} is a file; give a directory")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in FILES) \
        if directory.is_dir() else []
    if foreign:
        raise SpecError(f"-o {str(directory)!r} holds files this command did not write "
                        f"({', '.join(foreign[:5])}); give a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, manifest in manifests.files().items():
        path = directory / name
        path.write_text(to_yaml(manifest))
        paths.append(path)
    return paths
