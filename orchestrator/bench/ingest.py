"""Rows/s that our Ray Data pipeline delivers to a training loop, against a torch DataLoader over
the same tokenized rows and against pre-built in-memory batches (the ceiling), with and without
a consumer that does real work (a forward and backward pass of the benchmark model)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

from orchestrator.bench import BenchResult
from orchestrator.bench.training import bench_spec, prepare
from orchestrator.models import build_model
from orchestrator.rundir import RunDir
from orchestrator.train.batches import BatchStream
from orchestrator.train.hosts import RayDataShard
from orchestrator.train.objectives import lm_loss
from orchestrator.train.session import InMemorySplit


def timed_rows(batches: Iterator[dict[str, torch.Tensor]], count: int,
               consume: Callable[[torch.Tensor], None]) -> tuple[float, float]:
    """(rows/s, share of the time spent waiting for batches) over `count` batches."""
    waited, rows, started = 0.0, 0, time.perf_counter()
    for _ in range(count):
        asked = time.perf_counter()
        ids = next(batches)["ids"]
        waited += time.perf_counter() - asked
        consume(ids)
        rows += len(ids)
    elapsed = time.perf_counter() - started
    return rows / elapsed, waited / elapsed


def forever(make_epoch: Callable[[], Iterator]) -> Iterator:
    while True:
        yield from make_epoch()


def run(quick: bool) -> BenchResult:
    spec = bench_spec(quick)
    prepared = prepare(spec)
    batch_size, buffer = spec.train.batch_size, spec.train.shuffle_buffer
    # The sample corpus repeated, so that an epoch holds as many rows as a real dataset's
    # shard rather than a few hundred batches: per-epoch start-up would dominate otherwise.
    split = pq.read_table(RunDir.at(prepared.run_dir).split("train").path)
    repeated = prepared.run_dir / "ingest.parquet"
    pq.write_table(pa.concat_tables([split] * (4 if quick else 40)), repeated)
    ids = torch.tensor(pq.read_table(repeated).column("ids").to_pylist())
    # Our pipeline as a worker sees it: the materialized split, streamed through Ray Train's
    # splitter to one consumer, shuffled locally, epoch after epoch.
    shard = ray.data.read_parquet(str(repeated)).materialize().streaming_split(1)[0]
    sources = {
        "ray data (ours, Ray Train)": lambda: BatchStream(
            RayDataShard(shard, torch.device("cpu"), buffer, 0), batch_size),
        "in memory (ours, 1-worker trials)": lambda: BatchStream(
            InMemorySplit({"ids": ids}, torch.device("cpu"), 0), batch_size),
        "torch DataLoader": lambda: forever(lambda: (
            {"ids": b} for (b,) in DataLoader(TensorDataset(ids), batch_size=batch_size,
                                              shuffle=True, drop_last=True))),
        "in-memory batches": lambda: forever(lambda: (
            {"ids": ids[i:i + batch_size]}
            for i in range(0, len(ids) - batch_size + 1, batch_size))),
    }
    torch.set_num_threads(int(spec.resources.cpus_per_worker))
    model = build_model(spec, prepared.info)

    def train_step(batch: torch.Tensor) -> None:
        lm_loss(model, batch.long()).backward()

    consumers = {"none": lambda batch: None, "forward+backward": train_step}
    counts = {"none": 500 if quick else 20000, "forward+backward": 10 if quick else 100}
    rows = []
    for consumer, consume in consumers.items():
        for source, make in sources.items():
            batches = make()
            timed_rows(batches, 3, consume)  # warm-up: the stream starts, the model allocates
            rows_per_s, wait_share = timed_rows(batches, counts[consumer], consume)
            if isinstance(batches, BatchStream):
                batches.close()
            rows.append({"consumer": consumer, "source": source, "rows_per_s": rows_per_s,
                         "data_wait_share": wait_share})
    by = {(row["consumer"], row["source"]): row["rows_per_s"] for row in rows}
    return BenchResult(
        name="ingest", rows=rows,
        ratio=by[("none", "ray data (ours, Ray Train)")] / by[("none", "torch DataLoader")],
        ratio_means="our Ray Data rows/s over the DataLoader's, no consumer (target >= 0.9)",
        notes={"data": f"{len(ids)} tokenized rows of {ids.shape[1]} tokens, batch {batch_size}, "
                       f"shuffle buffer {buffer}",
               "consumer": f"forward+backward of GPT d_model {spec.model.d_model} on "
                           f"{spec.resources.cpus_per_worker:g} threads",
               "with_ray_train": "the data_wait_share each Ray Train run reports is in "
                                 "`orchestrator bench train-overhead`"})
