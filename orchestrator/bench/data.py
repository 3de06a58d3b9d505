"""MB/s of raw text through the data stage (`prepare_data`), end to end, at several corpus sizes,
against the tokenizer's ceiling (encoding alone, the stage's own tokenizer, on the same cores, no
Ray), with the driver's peak private memory (USS): the curve that shows how the stage grows.

The corpus is the shipped sample repeated until it holds the size asked for, each copy's texts
rotated by a different number of words so that copies are distinct texts (each hashed to its own
split), and kept in source order (sorted by module), as real corpora often are. Each size runs in
a driver process of its own (joined to this Ray), so no size inherits another's memory; its USS
is sampled every SAMPLE_S. The stage's seconds per phase are the intervals between its progress
lines. CPU seconds (user + system) are the whole process tree's, this Ray's daemons and workers
included: unlike wall seconds, they say something on a machine shared with other work.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psutil
import ray
from tokenizers import Tokenizer

from orchestrator.bench import BenchResult
from orchestrator.bench.repository import sample_corpus
from orchestrator.bench.training import ensure_ray
from orchestrator.data.stage import prepare_data
from orchestrator.spec import JobSpec, parse_spec
from orchestrator.tokenizer import load_tokenizer

QUICK_MB, FULL_MB = (0.1,), (16.0, 64.0, 256.0)  # quick: the shipped sample once (0.38 MB)
SAMPLE_S = 0.5
ENCODE_BATCH = 4096


def build_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    """Write a jsonl corpus of about `megabytes` of text; return (texts, bytes of text)."""
    rows = [json.loads(line) for line in sample_corpus().read_text().splitlines()]
    texts, size, copy = 0, 0, 0
    with path.open("w") as out:
        while size < megabytes * 1e6:
            for row in rows:
                words = row["text"].split(" ")
                shift = copy % len(words)
                text = " ".join(words[shift:] + words[:shift])
                out.write(json.dumps({"text": text, "label": row["label"]}) + "\n")
                texts, size = texts + 1, size + len(text.encode())
            copy += 1
    return texts, size


def bench_spec(path: Path) -> JobSpec:
    return parse_spec({"name": "bench-data", "data": {"path": str(path), "vocab_size": 2048,
                                                      "block_size": 64},
                       "model": {"task": "language_model"}})


@dataclass
class StageRun:
    """One size through the stage, as its driver process saw it."""

    seconds: float
    phases: list[tuple[str, float]]  # (progress line, seconds until the next one)
    start_uss: int
    peak_uss: int


class _PeakUSS:
    """This process's peak USS, sampled every SAMPLE_S in a thread while in the `with`."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_full_info().uss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, self.process.memory_full_info().uss)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_full_info().uss)


def time_stage(spec: JobSpec, run_dir: Path) -> StageRun:
    """prepare_data in this process: wall seconds, seconds per phase and the USS it took."""
    marks: list[tuple[str, float]] = []
    with _PeakUSS() as uss:
        started = time.perf_counter()
        prepare_data(spec, run_dir, lambda line: marks.append((line, time.perf_counter())))
        ended = time.perf_counter()
    marks.insert(0, ("(before the first progress line)", started))
    ends = [t for _, t in marks[1:]] + [ended]
    return StageRun(ended - started, [(line, end - t) for (line, t), end in zip(marks, ends)],
                    uss.start, uss.peak)


def _join(address: str) -> None:
    """Join the spawned child, a fresh driver process, to the bench's Ray."""
    ray.init(address=address, log_to_driver=False, logging_level="WARNING")


def _stage_in_own_driver(corpus: str, run_dir: str) -> StageRun:
    return time_stage(bench_spec(Path(corpus)), Path(run_dir))


def _text_batches(corpus: Path) -> Iterator[list[str]]:
    batch: list[str] = []
    with corpus.open() as lines:
        for line in lines:
            batch.append(json.loads(line)["text"])
            if len(batch) == ENCODE_BATCH:
                yield batch
                batch = []
    yield batch


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_s() -> float:
    """CPU seconds of this process and every process under it (Ray's daemons and workers, a
    driver of its own), with the children each of them has reaped."""
    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def time_encoding_alone(tokenizer: Tokenizer, corpus: Path) -> tuple[float, float]:
    """(wall, CPU) seconds the tokenizer takes to encode every text of the corpus, batch by
    batch, on all of this machine's cores (tokenizers' own threads), reading excluded."""
    seconds = cpu = 0.0
    for batch in _text_batches(corpus):
        started, started_cpu = time.perf_counter(), _own_cpu_s()
        tokenizer.encode_batch_fast(batch)
        seconds += time.perf_counter() - started
        cpu += _own_cpu_s() - started_cpu
    return seconds, cpu


def _measure(size_mb: float, work: Path, address: str) -> tuple[dict, StageRun]:
    corpus, run_dir = work / f"corpus-{size_mb:g}.jsonl", work / f"run-{size_mb:g}"
    texts, size = build_corpus(corpus, size_mb)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as child:
        child.submit(_join, address).result()  # the driver's start is not the stage's
        started_cpu = tree_cpu_s()
        stage = child.submit(_stage_in_own_driver, str(corpus), str(run_dir)).result()
        stage_cpu = tree_cpu_s() - started_cpu
    encode, encode_cpu = time_encoding_alone(load_tokenizer(run_dir / "tokenizer"), corpus)
    megabytes = size / 1e6
    rows_written = json.loads((run_dir / "data" / "meta.json").read_text())["rows"]
    row = {"mb": round(megabytes, 2), "texts": texts, "stage_s": stage.seconds,
           "mb_per_s": megabytes / stage.seconds, "encode_alone_mb_per_s": megabytes / encode,
           "stage_over_encode": encode / stage.seconds,
           "stage_cpu_s": stage_cpu, "encode_alone_cpu_s": encode_cpu,
           "driver_start_uss_mb": stage.start_uss / 2**20,
           "driver_peak_uss_mb": stage.peak_uss / 2**20,
           "rows_written": sum(rows_written.values())}
    corpus.unlink()
    return row, stage


def run(quick: bool, sizes_mb: tuple[float, ...] | None = None) -> BenchResult:
    ensure_ray()
    cores = int(ray.cluster_resources().get("CPU", 1))
    address = ray.get_runtime_context().gcs_address
    sizes = sizes_mb or (QUICK_MB if quick else FULL_MB)
    rows, last = [], None
    with tempfile.TemporaryDirectory(prefix="orchestrator-bench-data-") as directory:
        for size in sizes:
            row, last = _measure(size, Path(directory), address)
            rows.append(row)
    return BenchResult(
        name="data", rows=rows, ratio=rows[-1]["stage_over_encode"],
        ratio_means="the largest size's MB/s end to end over the tokenizer encoding alone on "
                    "the same cores; 1 is as fast as the tokenizer allows",
        notes={"corpus": "the shipped sample repeated, rotated, in source order; jsonl; "
                         f"vocab 2048, block 64; {cores} Ray CPUs",
               "driver": "each size in a fresh driver process; USS sampled every "
                         f"{SAMPLE_S} s",
               f"phases at {rows[-1]['mb']} MB": [
                   {"phase": line, "seconds": seconds, "share": seconds / last.seconds}
                   for line, seconds in last.phases],
               "target": "driver peak USS flat in the corpus size; >= 70% of encoding alone"})
