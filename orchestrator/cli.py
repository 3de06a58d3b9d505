"""Command line: argument parsing and printing only; the work is the SDK's."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from orchestrator.spec import SpecError, load_spec, spec_to_yaml

EXIT_SPEC_ERROR = 2


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
    submit = with_spec("submit", "submit the job to a cluster's Jobs API and follow it")
    submit.add_argument("--address", required=True, help="Jobs API, e.g. http://127.0.0.1:8265")
    submit.add_argument("--working-dir", default=".", help="directory uploaded with the job")
    submit.add_argument("--token", help="cluster auth token (RAY_AUTH_MODE=token clusters)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    return parser


def _validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    if not args.quiet:
        print(spec_to_yaml(spec), end="")
        print(f"# {args.spec}: valid")
    return 0


def _run(args: argparse.Namespace) -> int:
    from orchestrator.pipeline import RESULT_MARKER, summary
    from orchestrator.runner import connect, run_pipeline

    spec = load_spec(args.spec, args.overrides)
    embedded = connect(args.address)
    report = run_pipeline(spec, say=lambda line: print(line, flush=True))
    print(summary(report))
    print(RESULT_MARKER + json.dumps(report), flush=True)
    if spec.serve.enabled and spec.serve.keep_running and embedded:
        print(f"serving at {report['endpoint']}; press Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _submit(args: argparse.Namespace) -> int:
    """Validate locally, then submit; an unreachable or refusing cluster is one line, exit 1."""
    from ray.exceptions import AuthenticationError

    from orchestrator.submit import submit

    load_spec(args.spec, args.overrides)  # fail here, not on the cluster
    try:
        job = submit(Path(args.spec).resolve(), args.address, args.working_dir, args.overrides,
                     args.token)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"validate": _validate, "run": _run, "submit": _submit}
    try:
        return handlers[args.command](args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
