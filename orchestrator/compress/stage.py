"""The compress stage: the winner's compressed variants built, evaluated on the test split by
the same batch inference as the winner, measured (size, speed on the serving device, p50
latency of the real service), and the one to serve chosen.

  compressed/<variant>/         each variant's bundle (bundle.py), with compression.json
  compressed/selection.json     the variant served (`find_bundle` on the run directory gives it)

Selection: among the winner and every variant whose test quality is within
compress.max_quality_loss of the winner's (perplexity up, or accuracy down, by at most that
share), the fastest on the serving device (decode tokens/s at batch 1, or texts/s) is served;
speeds within 5 % of the fastest count as a tie, won by the smallest bundle.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from orchestrator.bundle import read_ensemble, read_spec_and_info, write_bundle
from orchestrator.compress.distill import (
    Distillation,
    parameter_count,
    student_spec_and_info,
    teacher_blocks,
)
from orchestrator.compress.measure import service_p50_s, size_bytes, speed, speed_key
from orchestrator.compress.prune import PrunedRecovery, prune_globally, sparsity_of
from orchestrator.evaluate import evaluate_bundle
from orchestrator.models import build_model
from orchestrator.records import (
    COMPRESSION_FILE,
    CompressedVariant,
    Compression,
    DataInfo,
    Evaluation,
    SplitEvaluation,
    json_safe,
)
from orchestrator.rundir import RunDir
from orchestrator.spec import (
    FAMILY_TASKS,
    CompressSpec,
    JobSpec,
    SpecError,
    SweepSpec,
    Task,
    apply_overrides,
    parse_spec,
)
from orchestrator.storage import resolve
from orchestrator.tokenizer import TOKENIZER_FILE
from orchestrator.train.config import WorkerConfig, worker_config
from orchestrator.train.hosts import FinishedRun, RunActor, needs_ray_train
from orchestrator.train.trainer import build_trainer
from orchestrator.weights.int8 import quantize_int8
from orchestrator.weights.model import load_bundle, save_bundle

WINNER = "winner"
SPEED_TIE = 0.05


def quality_of(test_metrics: dict[str, Any], task: str) -> float:
    return test_metrics["perplexity"] if task == Task.LANGUAGE_MODEL else test_metrics["accuracy"]


def quality_loss(quality: float, reference: float, task: str) -> float:
    """Relative loss against the winner: perplexity up, or accuracy down, as a share."""
    if task == Task.LANGUAGE_MODEL:
        return quality / reference - 1
    return 1 - quality / reference if reference else 0.0


def choose(variants: list[CompressedVariant], task: str) -> CompressedVariant:
    """Of the variants within the quality bound (the winner always is), the smallest of those
    as fast as the fastest: speeds within SPEED_TIE of it are a tie, not a difference (two
    measurements of the same model differ by that much)."""
    key = speed_key(task)
    eligible = [v for v in variants if v.within_bound]
    fastest = max(v.speed[key] for v in eligible)
    tied = [v for v in eligible if v.speed[key] >= (1 - SPEED_TIE) * fastest]
    return min(tied, key=lambda v: (v.size_bytes, -v.speed[key]))


def check_compression(spec: JobSpec, info: DataInfo) -> None:
    """What only the winner tells (its blocks, for a student), refused before any variant is
    built, naming the field."""
    variants = spec.compress.variants
    if "distill" in variants:
        teacher = teacher_blocks(spec, info)
        layers = spec.compress.distill.n_layer or max(1, teacher // 2)
        if layers >= teacher:
            raise SpecError(f"compress.distill: the winner has {teacher} transformer block(s) and "
                            f"the student would have {layers}; a student needs fewer (set "
                            "compress.distill.n_layer below the winner's, or drop 'distill')")


def _build_int8(spec: JobSpec, run_dir: RunDir, info: DataInfo,
                winner: str) -> tuple[str, DataInfo, dict[str, Any]]:
    bundle = load_bundle(winner)
    clip = spec.compress.int8.clip_percentile
    model = quantize_int8(bundle.model, clip)
    details = {"variant": "int8", "clip_percentile": clip}
    with resolve(winner).local_copy() as folder:
        uri = write_bundle(run_dir.compressed("int8"), bundle.spec, bundle.info,
                           model.state_dict(), folder / TOKENIZER_FILE, {},
                           {"compressed_from": winner}, compression=details)
    return uri, info, details


def _trained_bundle(run: FinishedRun, run_dir: RunDir, name: str, spec: JobSpec, info: DataInfo,
                    details: dict[str, Any]) -> str:
    """The bundle of a compress run's last checkpoint."""
    uri = save_bundle(run_dir.compressed(name), spec, info, run.checkpoint, run_dir.tokenizer,
                      {"val": {k.removeprefix("val_"): v for k, v in run.metrics.items()
                               if k.startswith("val_")}}, f"compress-{name}").uri
    run_dir.compressed(name).join(COMPRESSION_FILE).write_text(json.dumps(details, indent=2))
    return uri


def _fine_tune(config: WorkerConfig, variant: str) -> FinishedRun:
    """A compressed model's short fine-tune. One worker with its splits in memory trains in an
    actor of its own (killed when it ends): a Ray Train run spent about 15 s starting and
    stopping around 10 to 20 steps of a small model on 2 cores. Several workers, or streamed
    splits, train in Ray Train."""
    spec, name = config.spec, _run_name(variant)
    if needs_ray_train(spec):
        result = build_trainer(config, name=name).fit()
        return FinishedRun(config.run_dir.root.of(result.checkpoint.path).uri, result.metrics)
    retries = spec.train.max_failures
    host = ray.remote(RunActor).options(
        num_cpus=spec.resources.cpus_per_worker,
        num_gpus=spec.resources.gpus_per_worker if config.use_gpu else 0,
        max_restarts=retries, max_task_retries=retries).remote()
    try:
        return ray.get(host.train.remote(config, name))
    finally:
        ray.kill(host)


def _run_name(variant: str) -> str:
    """A run name of its own: Train V2 continues a run of the same name from its last
    checkpoint, an actor's run clears its folder first, and a second `orchestrator compress`
    must train afresh beside the first's checkpoints, not find that run finished."""
    return f"compress-{variant}-{uuid.uuid4().hex[:8]}"


def _recovery_spec(spec: JobSpec, steps: int, lr: float) -> JobSpec:
    """The winner's spec for a short full fine-tune of a compressed model: these steps at this
    lr, DDP (masks are kept on whole tensors), no pretrained base (the weights come whole)."""
    train = spec.train.model_copy(update={
        "max_steps": steps, "lr": lr, "warmup_steps": min(spec.train.warmup_steps, steps - 1),
        "eval_interval": min(spec.train.eval_interval, steps), "finetune": "full",
        "freeze_embeddings": False, "strategy": "ddp"})
    model = spec.model.model_copy(update={"pretrained": None})
    raw = spec.model_copy(update={"train": train, "model": model, "compress": CompressSpec(),
                                  "sweep": SweepSpec(num_samples=1, grace_period=1)})
    return JobSpec.model_validate(raw.model_dump(mode="json"))


def _build_prune(spec: JobSpec, run_dir: RunDir, info: DataInfo,
                 winner: str) -> tuple[str, DataInfo, dict[str, Any]]:
    prune = spec.compress.prune
    bundle = load_bundle(winner)
    achieved = prune_globally(bundle.model, prune.sparsity)
    details = {"variant": "prune", "sparsity": achieved, "recovery_steps": prune.recovery_steps}
    with resolve(winner).local_copy() as folder:
        pruned = write_bundle(run_dir.compressed("prune"), bundle.spec, bundle.info,
                              bundle.model.state_dict(), folder / TOKENIZER_FILE, {},
                              {"compressed_from": winner}, compression=details)
    if prune.recovery_steps == 0:
        return pruned, info, details
    recovery = _recovery_spec(spec, prune.recovery_steps, prune.lr)
    run = _fine_tune(worker_config(recovery, info, run_dir, PrunedRecovery(pruned)), "prune")
    uri = _trained_bundle(run, run_dir, "prune", recovery, info, details)
    details["sparsity_after_recovery"] = sparsity_of(load_bundle(uri).model)
    return uri, info, details


def _build_distill(spec: JobSpec, run_dir: RunDir, info: DataInfo,
                   winner: str) -> tuple[str, DataInfo, dict[str, Any]]:
    distill = spec.compress.distill
    student_spec, student_info = student_spec_and_info(spec, info)
    teacher = load_bundle(winner).model
    details = {"variant": "distill", "temperature": distill.temperature, "alpha": distill.alpha,
               "student_blocks": student_spec.model.n_layer if student_info.architecture is None
               else teacher_blocks(student_spec, student_info),
               "teacher_params": parameter_count(teacher),
               "student_params": parameter_count(build_model(student_spec, student_info)),
               "steps": student_spec.train.max_steps}
    start = Distillation(winner, distill.temperature, distill.alpha)
    run = _fine_tune(worker_config(student_spec, student_info, run_dir, start), "distill")
    return _trained_bundle(run, run_dir, "distill", student_spec, student_info,
                           details), student_info, details


def compress_winner(spec: JobSpec, run_dir: RunDir, info: DataInfo, winner: str,
                    winner_test: SplitEvaluation, gpus: int = 0,
                    note: Callable[[str], None] = lambda _: None) -> Compression:
    """Build, evaluate and measure every variant of spec.compress.variants (spec: the winner's
    spec), and choose the one to serve; see the module docstring."""
    check_compression(spec, info)
    task, bound = info.task, spec.compress.max_quality_loss
    reference = quality_of(winner_test.model, task)
    texts = spec.serve.sample_requests * 8
    measure = ray.remote(speed).options(num_cpus=spec.serve.replica_cpus,
                                        num_gpus=spec.serve.replica_gpus)
    variants = [CompressedVariant(WINNER, winner, reference, 0.0, size_bytes(winner),
                        ray.get(measure.remote(winner, texts)))]
    builders = {"int8": _build_int8, "prune": _build_prune, "distill": _build_distill}
    for name in spec.compress.variants:
        note(f"building {name}")
        uri, variant_info, details = builders[name](spec, run_dir, info, winner)
        test = evaluate_bundle(run_dir, uri, variant_info, splits=("test",), gpus=gpus,
                               known={"test": winner_test}).test
        quality = quality_of(test.model, task)
        loss = quality_loss(quality, reference, task)
        variant = CompressedVariant(name, uri, quality, loss, size_bytes(uri),
                          ray.get(measure.remote(uri, texts)), within_bound=loss <= bound,
                          details={**details, "test": test.model})
        variants.append(variant)
        note(f"{name}: test {'perplexity' if task == Task.LANGUAGE_MODEL else 'accuracy'} {quality:.4g} "
             f"({loss:+.1%} against the winner), {variant.size_bytes / 1e6:.2f} MB, "
             f"{variant.speed}")
    chosen = choose(variants, task)
    rule = (f"the fastest ({speed_key(task)}; within {SPEED_TIE:.0%} a tie, won by the "
            f"smallest) of the winner and the variants within compress.max_quality_loss = "
            f"{bound:.1%} of the winner's test {'perplexity' if task == Task.LANGUAGE_MODEL else 'accuracy'}")
    compression = Compression(variants, chosen.name, chosen.bundle, rule)
    run_dir.compression_selection.write_text(json.dumps(
        {"selected": chosen.name, "bundle": chosen.bundle}, indent=2))
    return compression


def measure_latency(spec: JobSpec, compression: Compression, task: Task) -> None:
    """p50 latency through the real service for every variant, into compression.variants: each
    deployed on an app of its own (its own name and route, the service's settings and API keys),
    one after another, and removed, so that a live service is never touched."""
    from orchestrator import serve as service

    for variant in compression.variants:
        name = service.scratch_app_name(spec, f"latency-{variant.name}")
        try:
            url = service.deploy(spec, variant.bundle, name=name)
            variant.p50_latency_s = service_p50_s(spec, url, task,
                                                  spec.compress.latency_requests)
        finally:
            if name in service.running_apps():
                service.remove(name)


def compress_finished_run(location: str, overrides: list[str],
                          say: Callable[[str], None] = print) -> dict[str, Any]:
    """`orchestrator compress RUN_DIR`: the compress stage on a finished run, with its winner's
    spec and `overrides` (compress.*, serve.*); report.json and report.md gain the variants."""
    from orchestrator import serve as service
    from orchestrator.cluster import cluster_capacity, inference_gpus, plan_cluster, with_device
    from orchestrator.plots import plot_compression, plots_markdown
    from orchestrator.report import render_markdown

    run_dir = RunDir.of_job(location) or RunDir.open(location)  # runs/<job>: its latest
    if not run_dir.report_json.is_file():
        raise SpecError(f"RUN_DIR = {run_dir.uri!r} has no report.json: compress a finished run "
                        f"(continue this one first: orchestrator resume {run_dir.uri})")
    report = json.loads(run_dir.report_json.read_text())
    if "family" in report:  # written before model.task replaced model.family
        report["task"] = FAMILY_TASKS[report.pop("family")]
    winner_spec, info = read_spec_and_info(run_dir.winner)
    if members := read_ensemble(run_dir.winner):
        raise SpecError(f"RUN_DIR = {run_dir.uri!r}: its winner is an ensemble of "
                        f"{len(members)} trials (sweep.ensemble), and compression works on one "
                        "model")
    raw = winner_spec.model_dump(mode="json")
    raw["sweep"]["ensemble"] = 1  # the bundle is one model, whatever the job asked
    spec = parse_spec(apply_overrides(raw, overrides))
    spec = with_device(spec, plan_cluster(spec))  # decided once, here: workers must not
    if not spec.compress.variants:
        raise SpecError("compress.variants is empty: name the variants to build, e.g. "
                        "--set 'compress.variants=[int8, prune]'")
    measuring = spec.serve.enabled and spec.compress.latency_requests
    if measuring:  # fails now, not after the variants are built
        service.check_deployable(spec, service.scratch_app_name(spec, "latency"))
    compression = compress_winner(spec, run_dir, info, run_dir.winner.uri,
                                  Evaluation.from_json(report["evaluation"]).test,
                                  gpus=inference_gpus(cluster_capacity()),
                                  note=lambda message: say(f"[compress] {message}"))
    if measuring:
        say("[compress] p50 latency of each variant, each on an app of its own")
        measure_latency(spec, compression, info.task)
    before = render_markdown(report)
    report["compression"] = json_safe(compression.to_json())
    run_dir.report_json.write_text(json.dumps(report, indent=2))
    markdown = run_dir.report_md.read_text() if run_dir.report_md.is_file() else before
    plots = markdown[len(before):] if markdown.startswith(before) else ""
    with tempfile.TemporaryDirectory(prefix="orchestrator-plots-") as scratch:
        plot = plot_compression(Path(scratch), report["compression"], info.task)
        run_dir.plots.join(plot.file).write_bytes((Path(scratch) / plot.file).read_bytes())
    run_dir.report_md.write_text(render_markdown(report) + plots + plots_markdown([plot]))
    say(f"[compress] serving {compression.selected} from now on: orchestrator deploy "
        f"{run_dir.uri}")
    return report
