"""The run directory's layout: the one place that spells its paths.

A run directory is a local folder or an object-storage prefix (see storage.py). Each stage
writes its part; later stages, `orchestrator resume`, `deploy` and `predict` only read them:

  spec.yaml                     the validated spec with every default filled in
  stages.json                   the stages completed so far and what they handed on (written
                                last by each stage, whole or not at all: what resume trusts)
  tokenizer/tokenizer.json      the data stage's tokenizer
  base/                         with model.pretrained: the checkpoint the job starts from, as a
                                Hugging Face model directory (config, weights, tokenizer files)
  data/split=<name>/*.parquet   the data stage's tokenized splits; data/meta.json its DataInfo
  texts/split=<name>/*.parquet  the splits' texts (and labels), for the classical references
  sweep/tune/                   Tune's experiment: its state, one folder per trial, and the
                                checkpoints of one-worker trials (trained in their trial actor)
  train/trial-<id>/             several-worker trials' Ray Train runs and their checkpoints
  sweep/trials.parquet          one row per trial; sweep/history.parquet every report
  winner/                       the select stage's bundle (bundle.py), test metrics after evaluate
  compressed/<variant>/         the compress stage's bundles; compressed/selection.json names
                                the one served (compress/stage.py)
  report.json, report.md        the summary
  plots/                        the report's figures
  logs/ray.log                  what Ray and Tune printed (a local run directory only)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from orchestrator.records import COMPRESSED_VARIANTS, MODEL_FILE, BundleRef, Completed
from orchestrator.storage import Location, StorageError, check_writable, resolve


@dataclass(frozen=True)
class RunDir:
    root: Location

    @classmethod
    def create(cls, base: str | os.PathLike, name: str) -> RunDir:
        """A new, empty run directory `<base>/<name>-<UTC time>`; fails at once, naming the URI,
        when the base cannot be written."""
        base_location = resolve(base)
        check_writable(base_location)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        root = base_location.join(f"{name}-{stamp}")
        if root.exists():
            raise StorageError(f"{root.uri} exists already; start the run again in a second")
        return cls(root)

    @classmethod
    def create_at(cls, location: str | os.PathLike) -> RunDir:
        """A new, empty run directory exactly at `location` (what `submit` chose and printed
        before the job started); fails at once when it exists or cannot be written."""
        root = resolve(location)
        check_writable(resolve(root.uri.rstrip("/").rsplit("/", 1)[0]))
        if root.exists():
            raise StorageError(f"{root.uri} exists already: a run directory is never reused")
        return cls(root)

    @classmethod
    def at(cls, location: RunDir | str | os.PathLike | Location) -> RunDir:
        """The run directory at a path or URI (or the one given), whatever it holds yet."""
        return location if isinstance(location, RunDir) else cls(resolve(location))

    @classmethod
    def open(cls, location: str | os.PathLike | Location) -> RunDir:
        """An existing run directory; StorageError when the location is not one of ours."""
        run_dir = cls(resolve(location))
        if not run_dir.spec_file.is_file():
            raise StorageError(f"{run_dir.uri} is not a run directory of orchestrator "
                               f"(no {run_dir.spec_file.name} in it)")
        return run_dir

    @classmethod
    def latest(cls, base: str | os.PathLike, name: str) -> RunDir | None:
        """The most recent run directory of the job `name` under `base`, if any."""
        base_location = resolve(base)
        if not base_location.exists():
            return None
        from pyarrow.fs import FileSelector, FileType

        infos = base_location.fs.get_file_info(FileSelector(base_location.path))
        # <name>-<UTC time> exactly: job "quickstart" is not "quickstart-finetune"
        stamped = re.compile(rf"{re.escape(name)}-\d{{8}}-\d{{6}}")
        runs = sorted(info.base_name for info in infos if info.type == FileType.Directory
                      and stamped.fullmatch(info.base_name))
        return cls(base_location.join(runs[-1])) if runs else None

    @classmethod
    def of_job(cls, location: str | os.PathLike) -> RunDir | None:
        """`<base>/<job name>` (no run directory there): that job's latest run, if any."""
        target = resolve(location)
        if target.exists():
            return None
        base, _, name = target.uri.rstrip("/").rpartition("/")
        return cls.latest(base, name) if base and name else None

    @property
    def uri(self) -> str:
        return self.root.uri

    def __str__(self) -> str:
        return self.uri

    # The layout
    @property
    def spec_file(self) -> Location:
        return self.root.join("spec.yaml")

    @property
    def stages_file(self) -> Location:
        return self.root.join("stages.json")

    @property
    def tokenizer(self) -> Location:
        return self.root.join("tokenizer")

    @property
    def base(self) -> Location:
        return self.root.join("base")

    @property
    def data(self) -> Location:
        return self.root.join("data")

    def split(self, name: str) -> Location:
        return self.data.join(f"split={name}")

    @property
    def texts(self) -> Location:
        return self.root.join("texts")

    def split_texts(self, name: str) -> Location:
        """One split's untokenized texts (and labels), for the classical references."""
        return self.texts.join(f"split={name}")

    @property
    def data_info(self) -> Location:
        return self.data.join("meta.json")

    @property
    def sweep(self) -> Location:
        """Tune's storage path; the experiment is its `tune/` folder."""
        return self.root.join("sweep")

    @property
    def tune_experiment(self) -> Location:
        return self.sweep.join(TUNE_EXPERIMENT)

    @property
    def train(self) -> Location:
        """Ray Train's storage path for several-worker trials."""
        return self.root.join("train")

    @property
    def trials(self) -> Location:
        return self.sweep.join("trials.parquet")

    @property
    def history(self) -> Location:
        return self.sweep.join("history.parquet")

    @property
    def winner(self) -> Location:
        return self.root.join("winner")

    def compressed(self, variant: str) -> Location:
        return self.root.join("compressed", variant)

    def served_bundle(self, variant: str) -> Location:
        """Where a variant the compress stage may serve lives: winner/ or compressed/<variant>/.
        Derived from the layout, never from a path a file in the run directory names, so that
        whoever can write one file there cannot point deploys elsewhere."""
        if variant == "winner":
            return self.winner
        if variant not in COMPRESSED_VARIANTS:
            raise ValueError(f"{self.compression_selection.uri} selects {variant!r}, which is not "
                             f"a variant the compress stage builds ({', '.join(COMPRESSED_VARIANTS)})")
        return self.compressed(variant)

    @property
    def compression_selection(self) -> Location:
        return self.root.join("compressed", "selection.json")

    @property
    def report_json(self) -> Location:
        return self.root.join("report.json")

    @property
    def report_md(self) -> Location:
        return self.root.join("report.md")

    @property
    def plots(self) -> Location:
        return self.root.join("plots")

    @property
    def ray_log(self) -> Location:
        return self.root.join("logs", "ray.log")

    # Completed stages
    def completed(self) -> Completed:
        """What each completed stage handed on (nothing for a new run)."""
        if not self.stages_file.exists():
            return Completed()
        return Completed.from_json(json.loads(self.stages_file.read_text()))

    def mark_completed(self, **handed_on: Any) -> None:
        """Record stages as done with what they hand on (Completed's fields), after everything
        they wrote (one atomic write)."""
        stages = replace(self.completed(), **handed_on)
        self.stages_file.write_text(json.dumps(stages.to_json(), indent=2))


TUNE_EXPERIMENT = "tune"


def find_bundle(location: str | os.PathLike) -> BundleRef:
    """The bundle of a run directory (the variant its compress stage chose, or its winner/), of
    `<base>/<job name>` (that job's latest run) or a bundle itself, local or in object storage;
    its path or URI."""
    run_dir = RunDir.of_job(location) or RunDir.at(location)
    if run_dir.compression_selection.is_file():  # the compress stage chose what to serve
        selected = json.loads(run_dir.compression_selection.read_text())["selected"]
        return BundleRef(run_dir.served_bundle(selected).uri)
    for candidate in (run_dir.winner, run_dir.root):
        if candidate.join(MODEL_FILE).is_file():
            return BundleRef(candidate.uri)
    raise FileNotFoundError(f"{run_dir.uri} is neither a run directory with "
                            f"{run_dir.winner.name}/ nor a model bundle ({MODEL_FILE} is missing)")
