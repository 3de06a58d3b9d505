"""200 gzip-compressed JSONL files under a prefix of a real S3-compatible server (moto's, on
127.0.0.1) make the same data stage as their texts in one local file: the same DataInfo, the same
tokenizer, the same tokenized rows and split texts. Both hold when the split of a text is a hash
of the text and the tokenizer's sample a seeded hash too, never the order of files or rows.

Ray's workers read the bucket, so they need its address and keys in their environment: the two
stages run in a driver process of their own with its own 2-CPU Ray, started with them (the
session's Ray started without), and stopped by the marker in its environment."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, tiny_spec
from processes import base_env, stop_marked
from s3 import s3_server

pytestmark = pytest.mark.ray  # a Ray of its own, in a child driver

FILES = 200
MARKER = "ORCHESTRATOR_MANY_FILES_S3"
PREPARE_BOTH = """
import json, sys, ray
from orchestrator.data.stage import prepare_data
from orchestrator.spec import parse_spec
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
for spec, run_dir in json.loads(sys.argv[1]):
    prepare_data(parse_spec(spec), run_dir, print)
ray.shutdown()
"""


def _written(run_dir: Path) -> dict:
    """What a run's data stage wrote, in an order that files and rows do not decide."""
    def rows(folder: Path, *columns: str) -> list:
        table = pq.read_table(folder)
        return sorted(zip(*(map(str, table.column(c).to_pylist()) for c in columns)))

    return {"info": json.loads((run_dir / "data" / "meta.json").read_text()),
            "tokenizer": hashlib.sha256(
                (run_dir / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest(),
            **{f"rows {split}": rows(run_dir / "data" / f"split={split}", "ids", "label")
               for split in ("train", "val", "test")},
            **{f"texts {split}": rows(run_dir / "texts" / f"split={split}", "text", "label")
               for split in ("train", "val", "test")}}


def test_200_gzip_files_in_a_bucket_make_the_stage_of_one_local_file(tmp_path, sample_rows):
    rows = [{"text": row["text"], "label": row["label"]} for row in sample_rows[:800]]
    one = tmp_path / "corpus.jsonl"
    one.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scrambled = random.Random(0).sample(rows, len(rows))  # no file holds the local file's order
    marker = uuid.uuid4().hex
    with s3_server() as s3:
        s3.create_bucket("corpus")
        client = s3.client()
        for part in range(FILES):
            lines = "".join(json.dumps(row) + "\n" for row in scrambled[part::FILES])
            client.put_object(Bucket="corpus", Key=f"parts/part-{part:03}.jsonl.gz",
                              Body=gzip.compress(lines.encode()))
        # A sample smaller than the training split: which texts it keeps must not depend on order.
        data = {"tokenizer_sample_mb": 0.05}  # format: inferred from the suffixes, by prefix
        runs = [(tiny_spec("classifier", path=one, data=data), str(tmp_path / "one")),
                (tiny_spec("classifier", path="s3://corpus/parts", data=data),
                 str(tmp_path / "many"))]
        env = base_env(**s3.env(), **{MARKER: marker})
        try:
            child = subprocess.run([sys.executable, "-c", PREPARE_BOTH, json.dumps(runs)],
                                   env=env, cwd=REPO, capture_output=True, text=True,
                                   timeout=600, check=False)
        finally:
            leftover = stop_marked(MARKER, marker, tmp_path)
    assert child.returncode == 0, child.stderr[-4000:]
    assert not leftover, f"processes of the stages' Ray survived: {leftover}"
    one_run, many_run = _written(tmp_path / "one"), _written(tmp_path / "many")
    assert sum(one_run["info"]["texts"].values()) == len(rows)
    assert child.stdout.count("on a 0.05 MB sample of the training split") == 2, child.stdout
    assert many_run == one_run
