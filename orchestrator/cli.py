"""Command line: argument parsing and printing only; the work is the SDK's."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Self

from orchestrator.bench import BENCHMARKS
from orchestrator.k8s import K8sOptions, build, write
from orchestrator.serve import DeployError
from orchestrator.serve.ingress import Ingress
from orchestrator.spec import (
    JobSpec,
    SpecError,
    apply_overrides,
    load_spec,
    parse_spec,
    spec_to_yaml,
)

if TYPE_CHECKING:
    from orchestrator.pipeline import Progress
    from orchestrator.rundir import RunDir

EXIT_SPEC_ERROR = 2
RAY_LOG = Path("logs") / "ray.log"  # inside the run directory
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
JSON_HELP = ("end with one line for programs: 'orchestrator-result: ' and the run report as JSON "
             "(always when the Jobs API runs the job; the report is also RUN_DIR/report.json)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_spec(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("spec", help="job spec YAML, e.g. jobs/quickstart.yaml")
        command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             dest="overrides", help="override a spec value, e.g. train.lr=0.001")
        return command

    validate = with_spec("validate", "check a job spec and print it with defaults filled in")
    validate.add_argument("--quiet", action="store_true", help="print nothing when valid")
    run = with_spec("run", "run the whole job (embedded local Ray unless --address)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    run.add_argument("--verbose", action="store_true",
                     help=f"print Ray's and Tune's own output here, not in RUN_DIR/{RAY_LOG}")
    run.add_argument("--resume", action="store_true",
                     help="continue this job's latest run if it did not finish (else start one)")
    run.add_argument("--json", action="store_true", help=JSON_HELP)
    run.add_argument("--run-dir", help="create the run directory exactly here (path or URI; "
                                       "`submit` passes the one it printed)")
    resume = commands.add_parser("resume", help="continue a run whose driver died: completed "
                                                "stages are kept, an interrupted sweep resumes")
    resume.add_argument("run_dir", help="the run directory (local path or URI)")
    resume.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="override a value of the run's spec that no "
                                               "completed stage used, e.g. serve.port=8001")
    resume.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    resume.add_argument("--verbose", action="store_true",
                        help=f"print Ray's and Tune's own output here, not in RUN_DIR/{RAY_LOG}")
    resume.add_argument("--json", action="store_true", help=JSON_HELP)
    submit = with_spec("submit", "submit the job to a cluster's Jobs API and follow it")
    submit.add_argument("--address", required=True, help="Jobs API, e.g. http://127.0.0.1:8265")
    submit.add_argument("--working-dir", default=".", help="directory uploaded with the job")
    submit.add_argument("--token", help="cluster auth token (RAY_AUTH_MODE=token clusters)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")

    def with_run_dir(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("run_dir", help="a run directory (its winner/ is used) or a bundle")
        command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             dest="overrides", help="override a value of the bundle's spec, "
                                                    "e.g. serve.num_replicas=2")
        return command

    deploy = with_run_dir("deploy", "serve a run's winner; replaces a running version "
                                    "without downtime")
    deploy.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    deploy.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for it")
    services = commands.add_parser("services", help="list the models a cluster serves")
    undeploy = commands.add_parser("undeploy", help="stop serving a model (only that one)")
    undeploy.add_argument("model", help="the model's name (the job's `name`)")
    for command in (services, undeploy):  # they need a running cluster, never an embedded Ray
        command.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else "
                             "the cluster `ray start` started on this machine)")
    config = with_run_dir("serve-config", "write a Ray Serve config for `serve deploy`")
    config.add_argument("-o", "--output", required=True, help="YAML file to write")
    predict = with_run_dir("predict", "batch inference over a dataset with Ray Data")
    predict.add_argument("--input", required=True, help="file, directory or URI of the inputs")
    predict.add_argument("--output", required=True, help="directory to write parquet to")
    predict.add_argument("--column", help="text column (default: the spec's data.text_column)")
    predict.add_argument("--max-tokens", type=int, default=32, help="language model: new tokens")
    predict.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    predict.add_argument("--seed", type=int, help="sampling seed (with temperature > 0)")
    predict.add_argument("--replicas", type=int, default=1, help="actors running the model")
    predict.add_argument("--cpus", type=float, default=1.0,
                         help="CPUs per actor (leave room for reads beside a running service)")
    predict.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or embedded)")

    compress = commands.add_parser("compress", help="build, evaluate and measure compressed "
                                                    "variants of a finished run's winner")
    compress.add_argument("run_dir", help="a finished run directory (local path or URI)")
    compress.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          dest="overrides", help="compress settings, e.g. "
                                                 "'compress.variants=[int8, prune]'")
    compress.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or "
                                            "embedded)")

    export = commands.add_parser("export", help="write a run's winner as a Hugging Face model "
                                                "directory (transformers, vLLM, the Hub)")
    export.add_argument("run_dir", help="a run directory (its winner/ is used) or a bundle")
    export.add_argument("--format", choices=["hf", "peft"], default="hf", help="hf: "
                        "config.json, model.safetensors and the tokenizer's files; peft: a GPT "
                        "LoRA run's adapters (adapter_config.json, adapter_model.safetensors), "
                        "for peft's PeftModel.from_pretrained over its model.pretrained")
    export.add_argument("-o", "--output", required=True,
                        help="directory (or URI) to write: new or empty, unless --overwrite")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output, replacing only the files an "
                             "export writes")

    k8s = with_spec("k8s", "write KubeRay manifests: a RayJob that runs the job (a RayCronJob "
                           "with --schedule), a RayService that serves its winner (runs_dir "
                           "and data.path in object storage)")
    k8s_defaults = K8sOptions()
    k8s.add_argument("-o", "--output", help="directory to write (default: k8s/<job name>): new, "
                                            "empty, or holding only these manifests")
    k8s.add_argument("--image", default=k8s_defaults.image,
                     help="image with Ray, torch and this project (default: %(default)s)")
    k8s.add_argument("--working-dir", default=k8s_defaults.working_dir,
                     help="the project's path in the image, or a .zip URI Ray downloads; the "
                          "spec's path here is its path there (default: %(default)s)")
    k8s.add_argument("--bundle", help="bundle URI the RayService serves (default: the RayJob's "
                                      "run directory's winner/)")
    k8s.add_argument("--schedule", help="cron schedule (e.g. '0 3 * * *' or @daily): write a "
                                        "RayCronJob that runs the job at each tick, each run "
                                        "into a new run directory (needs --bundle)")
    k8s.add_argument("--time-zone", help="time zone of --schedule (e.g. Europe/Berlin; "
                                         "default: the KubeRay operator's)")
    k8s.add_argument("--auth-secret", default=k8s_defaults.auth_secret,
                     help="Secret with the Ray auth token, key auth_token (default: %(default)s)")
    k8s.add_argument("--storage-secret", default=k8s_defaults.storage_secret,
                     help="Secret of object-storage credentials (AWS_* ...), '' for none "
                          "(default: %(default)s)")

    bench = commands.add_parser("bench", help="run a benchmark and print its figures")
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="; ".join(
        f"{name}: {what}" for name, what in BENCHMARKS.items()))
    bench.add_argument("--quick", action="store_true", help="short mode (what CI runs)")
    bench.add_argument("--json", action="store_true", help="one JSON object as the last line")
    bench.add_argument("--mb", type=lambda text: tuple(float(x) for x in text.split(",")),
                       help="data: corpus sizes in MB, comma-separated (default: 16,64,256)")
    return parser


def _validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    if spec.model.pretrained is not None:
        from orchestrator.pretrained import inspect_base

        inspect_base(spec)
    for old, new in spec.renamed.items():
        print(f"note: {old} is now called {new}; {args.spec} still works as written",
              file=sys.stderr)
    if not args.quiet:
        print(spec_to_yaml(spec), end="")
        print(f"# {args.spec}: valid")
    return 0


class Console:
    """Where `orchestrator run` prints: our lines on stdout, and unless verbose everything else in
    a log file.

    Ray's C++ core and raylet messages, Tune's banner and Python warnings are written by many
    hands to file descriptors 1 and 2 of this process (and of the Ray processes it starts, which
    inherit them), so both descriptors are pointed at the log and our lines go to a copy of the
    original stdout. The log starts beside the run directories, because Ray starts before the run
    directory exists, and moves to RUN_DIR/logs/ray.log once it does.

    It holds descriptor numbers, not file objects: Tune pickles its callbacks, and `say` with them.
    """

    def __init__(self, runs_dir: str, verbose: bool) -> None:
        self.log: Path | None = None
        self.out = 1
        self._saved: list[int] = []
        if verbose:
            return
        from orchestrator.storage import is_uri

        if is_uri(runs_dir):
            runs_dir = tempfile.gettempdir()
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".ray-", suffix=".log", dir=runs_dir)
        self.log = Path(name)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self.out = self._saved[0]
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def say(self, line: str) -> None:
        sys.stdout.flush()  # with --verbose, Ray's buffered lines come before ours
        data = f"{line}\n".encode()
        while data:
            data = data[os.write(self.out, data):]

    def move_log(self, run_dir: RunDir) -> None:
        if self.log and run_dir.root.is_local:
            target = Path(run_dir.ray_log.path)
            if target.exists():  # a resumed run keeps the log of its first driver
                target = target.with_name(f"ray-resumed-{int(time.time())}.log")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.log, target)  # the same file system: the open descriptors follow
            self.log = target

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Give stdout and stderr back, for the error lines main() prints after us."""
        if not self._saved:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in enumerate(self._saved, start=1):
            os.dup2(saved, fd)
            os.close(saved)
        if error is not None:
            print(f"Ray's output: {self.log}", file=sys.stderr)


class StopSignals:
    """SIGINT and SIGTERM both stop `orchestrator run` as Ctrl-C does: KeyboardInterrupt in the
    main thread, on the first signal only, so that Ray's shutdown after it runs to its end.

    KeyboardInterrupt and no exception of our own, because Ray's core worker turns any other
    exception raised by a signal handler during ray.get or ray.wait into a SystemError. Which
    signal came is kept here instead.
    """

    def __init__(self) -> None:
        self.received = signal.SIGINT

    def install(self) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, self._stop)

    def ignore(self) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        self.ignore()
        raise KeyboardInterrupt


def _stopped_line(received: signal.Signals, progress: Progress, log: Path | None) -> str:
    stage = progress.current or ("start-up" if progress.run_dir is None else "final report")
    line = f"stopped by {STOP_SIGNALS[received]} in the {stage} stage"
    if progress.run_dir is not None:
        line += (f"; continue it with `orchestrator resume {progress.run_dir}` "
                 "(completed stages are kept)")
    return line + (f"; Ray's output: {log}" if log else "")


def _run(args: argparse.Namespace) -> int:
    from orchestrator.runner import run
    from orchestrator.submit import RUNS_DIR_ENV, runs_dir_in_submitted_job

    spec = load_spec(args.spec, args.overrides)
    if args.run_dir and args.resume:
        raise SpecError("--run-dir starts a new run; --resume continues the latest: give one")
    durable = None if args.run_dir else runs_dir_in_submitted_job(spec.runs_dir)
    if durable:
        print(f"run directories go under {durable}: runs_dir {spec.runs_dir!r} is relative and "
              "this job runs in Ray's temporary copy of its working directory (set "
              f"{RUNS_DIR_ENV}, or an absolute or object-storage runs_dir, to choose)", flush=True)
        spec = spec.model_copy(update={"runs_dir": durable})
    runs_dir = args.run_dir.rstrip("/").rsplit("/", 1)[0] if args.run_dir else spec.runs_dir
    return _drive(runs_dir, args, lambda progress: run(spec, args.address, progress,
                                                       resume=args.resume, run_dir=args.run_dir),
                  Ingress(spec.serve.ingress))


def _resume(args: argparse.Namespace) -> int:
    from orchestrator.resume import resume_spec
    from orchestrator.rundir import RunDir
    from orchestrator.runner import resume

    run_dir = RunDir.open(args.run_dir)
    spec = resume_spec(run_dir, args.overrides)  # a bad override fails here, before Ray starts
    parent = run_dir.uri.rsplit("/", 1)[0]
    return _drive(parent, args, lambda progress: resume(run_dir, args.address, args.overrides,
                                                        progress), Ingress(spec.serve.ingress))


def _drive(runs_dir: str, args: argparse.Namespace, pipeline: Callable[[Progress], dict],
           ingress: Ingress) -> int:
    """Run a job's stages with calm output, Ctrl-C and SIGTERM handling, and the summary;
    `ingress`: how the Serve of an embedded Ray takes requests in (the spec's serve.ingress)."""
    import ray

    from orchestrator.pipeline import Progress
    from orchestrator.report import summary
    from orchestrator.runner import connect
    from orchestrator.submit import RESULT_MARKER

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # else Tune takes Ctrl-C to end the sweep
    with Console(runs_dir, args.verbose) as console:
        progress = Progress(console.say, on_run_dir=console.move_log)
        stop, stopped = StopSignals(), False
        try:
            stop.install()
            embedded = connect(args.address, console.say, ingress)
            stop.install()  # ray.init installs a SIGTERM handler of its own
            report = pipeline(progress)
            serving = report["endpoint"] is not None
            console.say(summary(report))
            if console.log:
                console.say(f"Ray's and Tune's own output: {console.log}")
            if _wants_result_line(args):
                console.say(RESULT_MARKER + json.dumps(report))
            if serving and embedded:
                console.say(f"serving at {report['endpoint']}")
                _wait_for_interrupt(console.say)
        except KeyboardInterrupt:
            console.say(_stopped_line(stop.received, progress, console.log))
            stopped = True
        finally:
            stop.ignore()  # a signal now would cut Ray's shutdown short
            ray.shutdown()  # inside Console: Ray's last words go to the log too
    if stopped:
        # Python's own teardown of the torch and Ray heap (half a million objects) takes 10 s and
        # more on a busy 2-core machine, and a stopped run has nothing left to do.
        os._exit(128 + stop.received)
    return 0


def _wants_result_line(args: argparse.Namespace) -> bool:
    """The machine-readable result line is for programs: `--json`, or the Jobs API running us
    (the thin client's Job.report() reads it from the job's log)."""
    from orchestrator.submit import submitted_job_id

    return bool(getattr(args, "json", False)) or submitted_job_id() is not None


def _submit(args: argparse.Namespace) -> int:
    """Validate locally, then submit; an unreachable or refusing cluster is one line, exit 1."""
    from ray.exceptions import AuthenticationError

    from orchestrator.submit import submit

    load_spec(args.spec, args.overrides)  # fail here, not on the cluster
    try:
        job = submit(Path(args.spec).resolve(), args.address, args.working_dir, args.overrides,
                     args.token, say=lambda line: print(line, flush=True))
    except (AuthenticationError, ConnectionError) as error:
        print(f"error: cannot submit to {args.address}: {error}", file=sys.stderr)
        return 1
    print(f"submitted job {job.job_id} to {args.address}", flush=True)
    if args.no_wait:
        return 0
    status = job.wait()
    print(job.logs(), end="")
    print(f"job {job.job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _bundle_and_spec(args: argparse.Namespace) -> tuple[str, JobSpec]:
    """The bundle (local path or URI) and its spec with the command's overrides."""
    from orchestrator.bundle import read_spec_and_info
    from orchestrator.rundir import find_bundle

    bundle_dir = find_bundle(args.run_dir).uri
    spec, _ = read_spec_and_info(bundle_dir)
    return bundle_dir, parse_spec(apply_overrides(spec.model_dump(mode="json"), args.overrides))


def _deploy(args: argparse.Namespace) -> int:
    from orchestrator.runner import connect
    from orchestrator.serve import deploy
    from orchestrator.serve.ingress import mismatch, running_ingress

    bundle_dir, spec = _bundle_and_spec(args)
    embedded = connect(args.address, ingress=Ingress(spec.serve.ingress))
    try:
        url = deploy(spec, bundle_dir, timeout_s=args.timeout)
    except DeployError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    running = running_ingress()
    print(f"serving {spec.name} from {bundle_dir} at {url} (ingress: "
          f"{running.value if running else 'unknown'})", flush=True)
    if (wrong := mismatch(Ingress(spec.serve.ingress), running)) is not None:
        print(f"note: {wrong}", flush=True)
    if embedded:
        _wait_for_interrupt()
    return 0


def _services(args: argparse.Namespace) -> int:
    from orchestrator.runner import connect
    from orchestrator.serve import services

    connect(args.address or os.environ.get("RAY_ADDRESS") or "auto", say=lambda _: None)
    rows = [("model", "task", "version", "replicas", "route", "state", "application", "bundle")]
    for service in services():
        served = service.served
        rows.append((served.model if served else "-", served.task if served else "-",
                     served.version[:12] if served else "-", service.replicas,
                     service.route or "-", service.status, service.app,
                     served.bundle if served else "-"))
    if len(rows) == 1:
        print("no application is served on this cluster")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _undeploy(args: argparse.Namespace) -> int:
    from orchestrator.runner import connect
    from orchestrator.serve import undeploy
    from orchestrator.serve.ingress import Ingress, running_ingress

    connect(args.address or os.environ.get("RAY_ADDRESS") or "auto", say=lambda _: None)
    if running_ingress() is Ingress.HAPROXY:  # else the wait looks like a hang
        print(f"removing {args.model}: with the HAProxy ingress Serve drains each replica for at "
              "least 30 s (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S on the cluster's nodes) "
              "before it stops, so that load balancers stop sending to it first, and each "
              "application in turn", flush=True)
    print(f"removed {undeploy(args.model)}; nothing else was touched")
    return 0


def _serve_config(args: argparse.Namespace) -> int:
    from orchestrator.serve import serve_config_yaml

    bundle_dir, spec = _bundle_and_spec(args)
    Path(args.output).write_text(serve_config_yaml(spec, bundle_dir))
    print(f"wrote {args.output}; deploy it with: serve deploy {args.output}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from orchestrator.evaluate import predict, refuse_non_empty_output
    from orchestrator.runner import connect

    bundle_dir, _ = _bundle_and_spec(args)
    refuse_non_empty_output(args.output)  # before Ray starts
    connect(args.address)
    started = time.monotonic()
    rows = predict(bundle_dir, args.input, args.output, args.column, args.max_tokens,
                   args.temperature, args.seed, args.replicas, args.cpus)
    print(f"wrote {rows} predictions to {args.output} in {time.monotonic() - started:.1f} s")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from orchestrator.compress.stage import compress_finished_run
    from orchestrator.report import summary
    from orchestrator.runner import connect

    connect(args.address)
    report = compress_finished_run(args.run_dir, args.overrides, say=print)
    print(summary(report))
    return 0


def _export(args: argparse.Namespace) -> int:
    from orchestrator.export import export_hf, export_peft

    if args.format == "peft":
        export = export_peft(args.run_dir, args.output, overwrite=args.overwrite)
        print(f"wrote {export.uri}: peft's PeftModel.from_pretrained(BASE, {export.uri!r}) "
              "loads it onto the run's model.pretrained")
    else:
        export = export_hf(args.run_dir, args.output, overwrite=args.overwrite)
        print(f"wrote {export.uri}: transformers' from_pretrained({export.uri!r}) loads it")
    print(f"round trip: max |logit difference| {export.max_logit_difference:.2e} against our "
          f"model on {export.texts_checked} texts (serve.sample_requests)")
    return 0


def _k8s(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    options = K8sOptions(image=args.image, working_dir=args.working_dir, bundle=args.bundle,
                         auth_secret=args.auth_secret, storage_secret=args.storage_secret or None,
                         schedule=args.schedule, time_zone=args.time_zone)
    manifests = build(spec, Path(args.spec), args.overrides, options)
    paths = write(manifests, Path(args.output or Path("k8s") / spec.name))
    print(f"wrote {' and '.join(map(str, paths))} (image {options.image})")
    if manifests.run_dir is None:
        print(f"the RayCronJob runs the job at {options.schedule!r}, each time into a new run "
              f"directory under {spec.runs_dir}; the RayService serves {manifests.bundle}")
    else:
        print(f"the RayJob runs the job into {manifests.run_dir}; the RayService serves "
              f"{manifests.bundle} (apply it once that exists)")
    secrets = [name for name in (options.auth_secret, options.storage_secret) if name]
    print(f"create these Secrets first: {', '.join(secrets)} (docs/operations.md, Kubernetes "
          "(KubeRay))")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from orchestrator.bench import BenchmarkUnavailable, render, run_benchmark

    try:
        options = {"sizes_mb": args.mb} if args.mb else {}
        result = run_benchmark(args.name, quick=args.quick, **options)
    except BenchmarkUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(result, as_json=args.json))
    return 0


def _wait_for_interrupt(say: Callable[[str], None] = print) -> None:
    say("Ray is embedded in this process: press Ctrl-C to stop serving")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"validate": _validate, "run": _run, "resume": _resume, "submit": _submit,
                "deploy": _deploy, "services": _services, "undeploy": _undeploy,
                "serve-config": _serve_config, "predict": _predict,
                "compress": _compress, "export": _export, "bench": _bench, "k8s": _k8s}
    try:
        return handlers[args.command](args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    except (FileNotFoundError, ValueError, DeployError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
