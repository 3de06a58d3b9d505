"""MB/s of raw text per core through the data stage (`prepare_data`), end to end, against the
tokenizer alone (`tokenizers` training on the same texts and encoding all of them in one process,
no Ray): the ceiling that "as fast as the tokenizer allows" means.

The corpus is the shipped sample repeated until it holds a few MB, each copy's texts rotated by
a different number of words so that copies are distinct texts (each hashed to its own split),
and kept in source order (sorted by module), as real corpora often are. The stage's seconds per
phase are the intervals between its progress lines.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray

from orchestrator.bench import BenchResult
from orchestrator.bench.repository import sample_corpus
from orchestrator.bench.training import ensure_ray
from orchestrator.data.datasets import split_of
from orchestrator.data.stage import prepare_data
from orchestrator.spec import JobSpec, parse_spec
from orchestrator.tokenizer import train_tokenizer

QUICK_MB, FULL_MB = 0.1, 8.0  # quick: the shipped sample once (0.38 MB of text)


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


def time_stage(spec: JobSpec, run_dir: Path) -> tuple[float, list[tuple[str, float]]]:
    """(wall seconds of prepare_data, [(progress line, seconds until the next one)])."""
    marks: list[tuple[str, float]] = []
    started = time.perf_counter()
    prepare_data(spec, run_dir, lambda line: marks.append((line, time.perf_counter())))
    ended = time.perf_counter()
    marks.insert(0, ("(before the first progress line)", started))
    ends = [t for _, t in marks[1:]] + [ended]
    return ended - started, [(line, end - t) for (line, t), end in zip(marks, ends)]


def time_tokenizer_alone(spec: JobSpec) -> float:
    """Seconds to train on the training split's texts and encode every text, in this process."""
    data = spec.data
    texts = [json.loads(line)["text"] for line in Path(data.path).read_text().splitlines()]
    started = time.perf_counter()
    train = [t for t in texts
             if split_of(t, data.split_seed, data.val_fraction, data.test_fraction) == "train"]
    tokenizer = train_tokenizer(train, data.vocab_size)
    tokenizer.encode_batch(texts)
    return time.perf_counter() - started


def run(quick: bool) -> BenchResult:
    ensure_ray()
    cores = int(ray.cluster_resources().get("CPU", 1))
    with tempfile.TemporaryDirectory(prefix="orchestrator-bench-data-") as directory:
        work = Path(directory)
        texts, size = build_corpus(work / "corpus.jsonl", QUICK_MB if quick else FULL_MB)
        spec = bench_spec(work / "corpus.jsonl")
        wall, phases = time_stage(spec, work / "run")
        alone = time_tokenizer_alone(spec)
        meta = json.loads((work / "run" / "data" / "meta.json").read_text())
    megabytes = size / 1e6
    rows = [{"phase": line, "seconds": seconds, "share": seconds / wall}
            for line, seconds in phases]
    rows.append({"phase": "data stage, end to end", "seconds": wall, "share": 1.0})
    stage_rate, alone_rate = megabytes / wall / cores, megabytes / alone / cores
    return BenchResult(
        name="data", rows=rows, ratio=stage_rate / alone_rate,
        ratio_means="the stage's MB/s over the tokenizer alone's (train + encode, no Ray); "
                    "1 is as fast as the tokenizer allows",
        notes={"mb_per_s_per_core": round(stage_rate, 3),
               "tokenizer_alone_mb_per_s_per_core": round(alone_rate, 3),
               "tokenizer_alone_seconds": round(alone, 2),
               "corpus": f"{megabytes:.2f} MB of text in {texts} jsonl rows (vocab 2048, "
                         f"block 64), {cores} Ray CPUs",
               "rows_written": meta["rows"],
               "target": ">= 5 MB/s per core end to end"})
