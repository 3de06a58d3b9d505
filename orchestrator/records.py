"""What the stages hand each other: the typed records every stage reads and writes, below all of
them (this module imports only the spec).

A stage's outputs are files in the run directory (rundir.py); stages.json records, per completed
stage, what it hands on, as the records here: `RunDir.completed()` reads it back as `Completed`,
fields rather than keys, so that a reader and a writer cannot disagree on a name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.spec import FAMILY_TASKS, Task

# A bundle folder's files (bundle.py writes them; see its docstring).
MODEL_FILE, SPEC_FILE, INFO_FILE = "model.pt", "spec.yaml", "data_info.json"
METRICS_FILE, PROVENANCE_FILE = "metrics.json", "provenance.json"
COMPRESSION_FILE = "compression.json"
ENSEMBLE_FILE = "ensemble.json"
# The variants the compress stage builds (compress.variants), each in compressed/<variant>/.
COMPRESSED_VARIANTS = ("int8", "prune", "distill")


@dataclass
class DataInfo:
    """What later stages need to know about the prepared data."""

    task: Task
    vocab_size: int
    eos_id: int
    pad_id: int
    context_length: int  # tokens a model sees at once: data.block_size (LM), data.max_length
    labels: list[str] = field(default_factory=list)
    texts: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # The tokenizer's special tokens by role (eos_token, pad_token, cls_token...): what an
    # exported tokenizer declares.
    special_tokens: dict[str, str] = field(default_factory=dict)
    # With model.pretrained: the checkpoint's Hugging Face config, which build_model builds
    # instead of the spec's sizes (models/hf.py).
    architecture: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.task = Task(FAMILY_TASKS.get(self.task, self.task))  # model.family's names too

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def seq_len(self) -> int:
        """Tokens per stored row: a language model's rows hold one more token than its context
        (the last position's target)."""
        return self.context_length + 1 if self.task == Task.LANGUAGE_MODEL else self.context_length

    @classmethod
    def from_dict(cls, raw: dict) -> DataInfo:
        """From meta.json or a bundle's data_info.json, also those written before `task`
        replaced `family` and context_length replaced seq_len."""
        raw = dict(raw)
        if "family" in raw:
            raw["task"] = raw.pop("family")
        if "seq_len" in raw:
            seq_len = raw.pop("seq_len")
            language_model = FAMILY_TASKS.get(raw["task"], raw["task"]) == Task.LANGUAGE_MODEL
            raw.setdefault("context_length", seq_len - 1 if language_model else seq_len)
        return cls(**raw)


@dataclass(frozen=True)
class BundleRef:
    """Where a model bundle is (a local path or an object-storage URI): what the select and
    compress stages hand on, and what evaluate, deploy and predict read."""

    uri: str

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class EnsembleMember:
    """One trial of an ensemble bundle (ensemble.json): its model section builds its part of
    the weights in model.pt (`members.<i>.`), in this order."""

    trial_id: str
    values: dict[str, Any]   # its sweep values, by dotted spec key
    model: dict[str, Any]    # its spec's model section, as JSON
    val_metric: float        # its own best value of the sweep metric

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EnsembleMember:
        return cls(**raw)


@dataclass
class SweepTiming:
    """Where the sweep's wall time went: the trials' training steps, shared by the trials that
    ran at once, against everything else (start-up, validation, checkpoints, coordination)."""

    wall_s: float
    training_s: float         # the training steps of every trial, summed
    checkpoint_s: float       # saving checkpoints, summed over trials
    concurrent_trials: int

    @property
    def overhead(self) -> float:
        """Wall time over the best it could be: training time ÷ concurrent trials (1 = none)."""
        ideal = self.training_s / self.concurrent_trials
        return self.wall_s / ideal if ideal else math.nan


@dataclass
class SplitEvaluation:
    """One split's evaluation: the model's metrics beside the trivial baseline's and the
    classical reference's (each with its `name`), the split's text statistics, and a
    classifier's confusion matrix (counts[true][predicted])."""

    model: dict[str, float]
    baseline: dict[str, Any]
    reference: dict[str, Any]
    text: dict[str, float]
    rows: int
    confusion_matrix: list[list[int]] | None = None


@dataclass
class Evaluation:
    """The evaluate stage's result, by split ("val", "test")."""

    splits: dict[str, SplitEvaluation]

    @property
    def test(self) -> SplitEvaluation:
        return self.splits["test"]

    def to_json(self) -> dict[str, Any]:
        """report.json's and stages.json's shape: {split: {model, baseline, ...}}, JSON-safe."""
        return {split: json_safe(asdict(result)) for split, result in self.splits.items()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Evaluation:
        return cls({split: SplitEvaluation(**result) for split, result in raw.items()})


@dataclass
class CompressedVariant:
    """One variant of the winner the compress stage built, evaluated and measured."""

    name: str  # "winner" (uncompressed), "int8", "prune", "distill"
    bundle: str
    quality: float  # test perplexity (language model) or accuracy (classifier)
    quality_loss: float  # relative to the winner's: > 0 is worse
    size_bytes: int
    speed: dict[str, float]
    p50_latency_s: float | None = None
    within_bound: bool = True
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Compression:
    """What the compress stage hands on: every variant and the one served."""

    variants: list[CompressedVariant]
    selected: str
    bundle: str  # the selected variant's
    rule: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Compression:
        return cls(**{**raw, "variants": [CompressedVariant(**v) for v in raw["variants"]]})


@dataclass
class Completed:
    """What stages.json records of the completed stages, each as the record it hands on; a
    stage not completed is None. The file's shape ({stage: {field: value}}) is kept, so that
    runs written by earlier versions resume."""

    data: DataInfo | None = None
    sweep: SweepTiming | None = None
    select: BundleRef | None = None
    evaluate: Evaluation | None = None
    compress: Compression | None = None
    report: str | None = None  # when the report was written: the run has finished

    def names(self) -> set[str]:
        return {name for name, value in vars(self).items() if value is not None}

    def to_json(self) -> dict[str, Any]:
        encoders = {"data": lambda v: {"info": asdict(v)}, "sweep": lambda v: {"timing": asdict(v)},
                    "select": lambda v: {"bundle": v.uri},
                    "evaluate": lambda v: {"evaluation": v.to_json()},
                    "compress": lambda v: {"compression": json_safe(v.to_json())},
                    "report": lambda v: {"finished": v}}
        return {name: encoders[name](value) for name, value in vars(self).items()
                if value is not None}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Completed:
        decoders = {"data": lambda v: DataInfo.from_dict(v["info"]),
                    "sweep": lambda v: SweepTiming(**v["timing"]),
                    "select": lambda v: BundleRef(v["bundle"]),
                    "evaluate": lambda v: Evaluation.from_json(v["evaluation"]),
                    "compress": lambda v: Compression.from_json(v["compression"]),
                    "report": lambda v: v["finished"]}
        return cls(**{name: decoders[name](value) for name, value in raw.items()
                      if name in decoders})


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN becomes None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
