"""The typed job spec: the only configuration of a job.

A job is a YAML file validated into `JobSpec`. Every default lives here. Errors name the field
path, the bad value and what is allowed, so a user can fix the YAML without reading our code.
"""

from __future__ import annotations

import copy
import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

DATA_FORMATS = ("parquet", "jsonl", "csv", "text")
# The longest block or text a model reads: beyond it, attention's memory grows past any machine
# we run on (GPT-2 reads 1024; long-context models 32k).
MAX_CONTEXT = 32768
FORMAT_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv",
                    ".txt": "text", ".text": "text"}
# Whole-file compressions that Ray Data undoes by a file's last suffix (`a.jsonl.gz`); parquet
# compresses inside the file.
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".lz4")
SUFFIXES_KNOWN = (f"known: {', '.join(FORMAT_BY_SUFFIX)}, each but .parquet optionally followed "
                  f"by {', '.join(COMPRESSION_SUFFIXES)}")


def format_of(name: str) -> str | None:
    """The data format a file name's suffixes imply (`a.jsonl.zst`: jsonl), or None."""
    path = Path(name.rstrip("/"))
    compressed = path.suffix.lower() in COMPRESSION_SUFFIXES
    fmt = FORMAT_BY_SUFFIX.get((path.with_suffix("") if compressed else path).suffix.lower())
    return None if compressed and fmt == "parquet" else fmt


class SpecError(ValueError):
    """A job spec that cannot run, with a message meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSpec(_Section):
    path: str = Field(description="File, directory or URI (s3://, gs://, file://) of the text data.")
    format: Literal["auto", "parquet", "jsonl", "csv", "text"] = Field(
        "auto", description="auto: from the file's suffixes, or those of every file in a folder "
        "or prefix (one format; files named . or _ first skipped): .parquet, .jsonl/.json, .csv, "
        ".txt/.text, all but .parquet also compressed (.gz, .zst, .bz2, .lz4).")
    text_column: str = "text"
    label_column: str | None = Field(None, description="Required for the classifier.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    split_seed: int = 0
    vocab_size: int = Field(2048, ge=64, le=65536)
    tokenizer_sample_mb: float = Field(
        128.0, gt=0, description="Megabytes of the training split's text that the tokenizer "
        "trains on: a seeded sample when the split is larger (as sentencepiece's "
        "input_sentence_size), so a corpus of any size trains it in the same time and memory.")
    block_size: int = Field(64, ge=8, le=MAX_CONTEXT,
                            description="Tokens per training block (language model).")
    max_length: int = Field(128, ge=8, le=MAX_CONTEXT, description="Tokens per text (classifier).")
    cache: bool = Field(
        True, description="Keep the tokenized splits in memory for the whole trial: a "
        "one-worker trial reads them into its own process (and trains in its Tune trial actor), "
        "several workers share them in Ray's object store; epochs after the first read no files. "
        "Turn off for data larger than memory: every trial is then a Ray Train run that streams "
        "the splits, and resources.data_cpus stay free for reading.")

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a file, directory or URI")
        return value

    @property
    def resolved_format(self) -> str:
        """The explicit format, or the one the path's suffixes imply (a folder's files are
        looked at by data.sources.source_format)."""
        if self.format != "auto":
            return self.format
        fmt = format_of(self.path)
        if fmt is None:
            raise SpecError(
                f"data.format: cannot infer the format of {self.path!r} from its suffix "
                f"{Path(self.path.rstrip('/')).suffix.lower() or '(none)'!r} "
                f"({SUFFIXES_KNOWN}); set data.format to one of {', '.join(DATA_FORMATS)}"
            )
        return fmt


class Task(str, Enum):
    """What a job's model does: predict the next token of text, or label a text."""

    LANGUAGE_MODEL = "language_model"
    CLASSIFIER = "classifier"

    def __str__(self) -> str:
        return self.value


# Renamed spec fields: the old name keeps working, and `orchestrator validate` prints the new one.
RENAMED_FIELDS = {"run_dir": "runs_dir", "model.family": "model.task"}
# model.family's values as model.task's.
FAMILY_TASKS = {"gpt": Task.LANGUAGE_MODEL.value, "classifier": Task.CLASSIFIER.value}

# The architectures of each task and which of them are built from repeated transformer blocks,
# the unit that FSDP shards and compile / activation checkpointing wrap.
ARCHS = {Task.LANGUAGE_MODEL: ("transformer", "lstm"),
         Task.CLASSIFIER: ("transformer", "lstm", "bow", "linear")}
BLOCKWISE_ARCHS = ("transformer",)


class LSTMSizes(_Section):
    """model.arch 'lstm': the language model's LSTM, or the classifier's bidirectional one."""

    n_layer: int = Field(1, ge=1, le=8)
    d_model: int = Field(128, ge=8, le=8192, description="Embedding width and hidden units "
                         "(per direction in the classifier).")


class BowSizes(_Section):
    """model.arch 'bow' (classifier): fastText-style averaged n-gram embeddings."""

    d_model: int = Field(64, ge=8, le=4096, description="Embedding width.")
    buckets: int = Field(65536, ge=64, le=2**24,
                         description="Hash buckets of the token bigrams' embeddings.")


class LinearSizes(_Section):
    """model.arch 'linear' (classifier): one weight per class for each hashed n-gram."""

    buckets: int = Field(262144, ge=64, le=2**24, description="Hash buckets of each hashed "
                         "feature's weights: token bigrams, words, word bigrams, character "
                         "n-grams (each).")


# What a pretrained checkpoint fixes: set next to model.pretrained (or swept), they are refused.
SIZED_BY_CHECKPOINT = ("arch", "n_layer", "n_head", "d_model", "lstm", "bow", "linear")


class ModelSpec(_Section):
    task: Task = Field(
        Task.LANGUAGE_MODEL, description="The task: language_model (next-token prediction, "
        "served by /v1/completions) or classifier (labels, /v1/classify). Formerly "
        "model.family (gpt, classifier), which still works.")
    pretrained: str | None = Field(
        None, description="Start from a Hugging Face checkpoint: a local directory, a Hub id or "
        "a storage URI (s3://...) of a GPT-2-architecture causal LM (gpt) or a BERT, RoBERTa or "
        "DistilBERT encoder (classifier); or from an earlier run of ours (its run directory, "
        "runs/<job name> for the job's latest run, or a bundle). Its tokenizer replaces the data "
        "stage's and its config the model sizes.")
    arch: Literal["transformer", "lstm", "bow", "linear"] = Field(
        "transformer", description="The architecture: transformer or lstm for either task, "
        "bow (a bag of n-gram embeddings) or linear (a linear model on hashed word and "
        "character n-grams; best with train.loss squared_hinge) for the classifier. Sweepable "
        "(sweep.space model.arch).")
    # The transformer's sizes (GPT decoder, or the classifier's encoder).
    n_layer: int = Field(2, ge=1, le=96)
    n_head: int = Field(4, ge=1, le=128)
    d_model: int = Field(128, ge=8, le=16384)
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Every architecture's dropout but "
                           "linear's (weight decay is its regularization).")
    lstm: LSTMSizes = Field(default_factory=LSTMSizes)
    bow: BowSizes = Field(default_factory=BowSizes)
    linear: LinearSizes = Field(default_factory=LinearSizes)

    @model_validator(mode="after")
    def _sizes_from_one_place(self) -> ModelSpec:
        if self.pretrained is not None:
            if not self.pretrained.strip():
                raise ValueError("model.pretrained: must name a directory, Hub id or URI")
            # Compared with the defaults, not model_fields_set: a dumped spec (spec.yaml, a
            # trial's) holds every field.
            fixed = [name for name in SIZED_BY_CHECKPOINT
                     if getattr(self, name) != type(self).model_fields[name].get_default(
                         call_default_factory=True)]
            if fixed:
                raise ValueError(
                    f"model.{fixed[0]} = {getattr(self, fixed[0])!r} is fixed by model.pretrained "
                    f"= {self.pretrained!r} (its config sets the architecture and sizes); "
                    "remove it")
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


class LoraSpec(_Section):
    """train.finetune 'lora': low-rank adapters (peft) on the pretrained model's linear layers."""

    r: int = Field(8, ge=1, le=1024, description="Adapter rank. Sweepable.")
    alpha: float = Field(16.0, gt=0, description="Scale: updates are multiplied by alpha / r. "
                         "Sweepable.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Names (or name suffixes) of the linear layers to adapt; "
        "default: the attention projections (qkv for GPT, query/value or q_lin/v_lin for "
        "encoders).")


class TrainSpec(_Section):
    finetune: Literal["full", "lora"] = Field(
        "full", description="With model.pretrained: full trains every weight, lora only "
        "low-rank adapters (and a classifier's head); the winner bundle holds merged weights.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    freeze_embeddings: bool = Field(
        False, description="Keep the token and position embeddings as they are.")
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False,
                                description="L2 penalty (decoupled for adamw).")
    l1: float = Field(0.0, ge=0, allow_inf_nan=False,
                      description="L1 penalty coefficient added to the loss.")
    loss: Literal["cross_entropy", "squared_hinge"] = Field(
        "cross_entropy", description="The classifier's loss: cross_entropy, or squared_hinge "
        "(one-vs-rest, a linear SVM's: with model.arch linear it is the stronger on short texts; "
        "the scores served are then the softmax of margins, which rank the labels but are not "
        "calibrated probabilities). Sweepable.")
    batch_size: int = Field(32, ge=1, description="Per-worker micro-batch size.")
    shuffle_buffer: int = Field(
        2048, ge=0, description="Rows in each worker's shuffle buffer; 0 reads in file order.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    global_batch_size: int = Field(
        0, ge=0, description="Rows per optimizer step over all workers. When set, "
        "grad_accum_steps follows from it (global / (batch_size × num_workers)), so the "
        "effective batch stays the same for any worker count, also while an elastic group "
        "resizes; 0: batch_size × num_workers (its max when elastic) × grad_accum_steps.")
    grad_clip: float = Field(1.0, ge=0, allow_inf_nan=False,
                             description="Max gradient norm; 0 disables clipping.")
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(200, ge=1, description="Optimizer steps per trial.")
    max_time_s: float = Field(
        0, ge=0, description="Seconds of training steps per trial (not counting validation or "
        "checkpoints): the trial ends at the first evaluation past it, and the learning rate "
        "decays to its end by then (or by max_steps, whichever comes first); 0: "
        "max_steps alone. With the sweep drawing model.arch or sizes, early stopping compares "
        "trials at equal training time.")
    eval_interval: int = Field(50, ge=1, description="Validate and checkpoint every N steps.")
    eval_batches: int = Field(8, ge=1, description="Validation batches per evaluation.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole model; fsdp: parameters, gradients "
        "and optimizer state are sharded per transformer block (FSDP2), for models that do not "
        "fit one device.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that have it (else fp16 with a grad "
        "scaler), fp32 on CPU. fp16 needs a GPU.")
    compile: bool = Field(False, description="torch.compile each transformer block.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward: less memory, "
        "about a third more compute.")
    seed: int = 0
    max_failures: int = Field(0, ge=-1, description="Worker failures to recover from; -1: always.")
    checkpoints_to_keep: int = Field(2, ge=1, description="Checkpoints kept per trial.")
    checkpoint_keep: Literal["best", "latest"] = Field(
        "best", description="best: the best by the sweep metric (plus always the latest, to "
        "resume from); latest: the most recent ones.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"both betas must be in [0, 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainSpec:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})"
            )
        return self


class Choice(_Section):
    choice: list[Any] = Field(min_length=1)


class Grid(_Section):
    grid: list[Any] = Field(min_length=1)


class Uniform(_Section):
    uniform: tuple[float, float]


class LogUniform(_Section):
    loguniform: tuple[float, float]


Distribution = Annotated[Choice | Grid | Uniform | LogUniform, Field(union_mode="left_to_right")]
SWEEPABLE = ("train.optimizer", "train.lr", "train.momentum", "train.weight_decay", "train.l1",
             "train.batch_size", "train.warmup_steps", "model.dropout", "model.arch",
             "model.n_layer", "model.d_model", "model.lstm.n_layer", "model.lstm.d_model",
             "model.bow.d_model", "model.bow.buckets", "model.linear.buckets", "train.loss",
             "train.finetune", "train.lora.r",
             "train.lora.alpha", "train.lora.dropout")


# What population-based training may change in a live trial: the optimizer's step and the
# regularization, which a checkpoint's weights and optimizer state do not fix.
PBT_MUTABLE = ("train.lr", "train.weight_decay", "train.l1", "train.momentum", "model.dropout")


def _bohb_missing() -> str | None:
    """The package BOHB needs that this Python cannot import, if any."""
    import importlib.util

    return next((name for name in ("hpbandster", "ConfigSpace")
                 if importlib.util.find_spec(name) is None), None)


class SweepSpec(_Section):
    num_samples: int = Field(4, ge=1, description="Trials to sample (times each grid point).")
    space: dict[str, Distribution] = Field(default_factory=dict)
    metric: Literal["auto", "val_loss", "val_accuracy", "val_f1"] = "auto"
    grace_period: int = Field(2, ge=1, description="ASHA: evaluations before a trial may stop.")
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int = Field(0, ge=0, description="0: as many as the cluster fits.")
    seed: int = Field(0, description="Seeds the values the search draws (the same trials on "
                                     "every run and resume of the spec).")
    search: Literal["random", "tpe", "bohb", "pbt"] = Field(
        "random", description="random: values drawn from sweep.seed, ASHA ends the weak trials "
        "early; tpe: Optuna's TPE proposes each trial from the results so far (with ASHA); bohb: "
        "TuneBOHB with HyperBand for BOHB; pbt: population-based training, every grace_period "
        "evaluations the worst quarter of the trials continue from a best one's checkpoint with "
        "its lr and regularization perturbed.")
    time_budget_s: float = Field(
        0, ge=0, description="Wall-clock seconds for the whole sweep: no trial starts after it "
        "and running trials end at it, each keeping its best checkpoint; 0: no budget.")
    ensemble: int = Field(
        1, ge=1, description="Classifiers: up to this many of the best trials serve as one "
        "model that averages their class probabilities: the first n of them (by the sweep "
        "metric) whose mean scores best on the validation split; 1: the best trial alone.")

    @model_validator(mode="after")
    def _search_fits_space(self) -> SweepSpec:
        """Combinations a searcher cannot run, refused naming the fields."""
        if self.search == "random":
            return self
        for key, dist in self.space.items():
            if isinstance(dist, Grid):
                raise ValueError(f"sweep.space.{key}: a grid runs every value, and sweep.search "
                                 f"{self.search!r} proposes the values itself; use {{choice: "
                                 f"[...]}} or sweep.search 'random'")
            if self.search == "pbt" and key not in PBT_MUTABLE:
                raise ValueError(
                    f"sweep.space.{key}: sweep.search 'pbt' changes the settings of live trials, "
                    f"which continue from their checkpoints, so it sweeps only "
                    f"{', '.join(PBT_MUTABLE)} (an architecture, sizes or an optimizer fix "
                    f"what a checkpoint holds); use sweep.search 'random', 'tpe' or 'bohb'")
        if self.search == "pbt" and not self.space:
            raise ValueError(f"sweep.search 'pbt' needs sweep.space to draw at least one of "
                             f"{', '.join(PBT_MUTABLE)}")
        if self.search == "bohb" and (missing := _bohb_missing()):
            raise ValueError(f"sweep.search 'bohb' needs {missing}, which is not installed "
                             f"(pip install hpbandster ConfigSpace); or use sweep.search 'tpe'")
        return self

    @field_validator("space")
    @classmethod
    def _known_parameters(cls, space: dict[str, Any]) -> dict[str, Any]:
        for key, dist in space.items():
            if key not in SWEEPABLE:
                raise ValueError(f"cannot sweep {key!r}; sweepable settings: {', '.join(SWEEPABLE)}")
            if key in ("model.arch", "train.finetune") and not isinstance(dist, (Choice, Grid)):
                raise ValueError(f"{key}: sweep it with {{choice: [...]}} or {{grid: [...]}}")
            bounds = getattr(dist, "uniform", None) or getattr(dist, "loguniform", None)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{key}: lower bound {bounds[0]} must be below {bounds[1]}")
            if isinstance(dist, LogUniform) and bounds[0] <= 0:
                raise ValueError(f"{key}: loguniform bounds must be > 0, got {list(bounds)}")
        return space


# Serve's DEFAULT_METRICS_INTERVAL_S (ray.serve.config), kept here: validating a spec imports no Ray.
SERVE_METRICS_PUSH_INTERVAL_S = 10.0


class AutoscalingSpec(_Section):
    """Serve's replica autoscaling: replicas follow the number of ongoing requests."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    # Replicas push their load to Serve every 10 s; Serve warns now, and will refuse, a window
    # that is not longer than that.
    look_back_period_s: float = Field(30.0, gt=SERVE_METRICS_PUSH_INTERVAL_S)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas "
                             f"{self.max_replicas}")
        return self


KEY_ID_PATTERN = r"^[0-9a-f]{8,64}$"


class QuotaLimits(_Section):
    """What one API key may use per minute (a sliding 60-second window); null: no limit."""

    requests_per_minute: int | None = Field(
        None, ge=1, description="Requests to the routes that do work (completions, classify, "
        "tokenize, detokenize); more get 429 with Retry-After.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt plus completion tokens (a completion reserves its "
        "max_tokens until it ends; a classify charges the tokens the model reads).")


class QuotasSpec(_Section):
    """Per-key quotas, enforced across every replica of the model (one ledger per model app)."""

    default: QuotaLimits = Field(default_factory=QuotaLimits,
                                 description="The limits of every key without an override.")
    keys: dict[str, QuotaLimits] = Field(
        default_factory=dict, description="Overrides by key id: the start (8 to 64 hex digits) "
        "of the key's SHA-256 (`printf %s KEY | sha256sum | cut -c1-12`), never the key; the "
        "fields an override sets replace the default's, null included.")

    @field_validator("keys", mode="before")
    @classmethod
    def _key_ids(cls, keys: Any) -> Any:
        for key_id in keys if isinstance(keys, dict) else ():
            if not isinstance(key_id, str):  # YAML reads 123456789012 as a number
                raise ValueError(f"key id {key_id!r} was read as a number: quote it in YAML")
            if not re.fullmatch(KEY_ID_PATTERN, key_id):
                raise ValueError(f"{key_id!r} is not a key id: give the first 8 to 64 lower-case "
                                 "hex digits of the key's SHA-256, not the key")
        return keys


class ServeSpec(_Section):
    enabled: bool = True
    keep_running: bool = Field(False, description="Leave the service up after the job.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="How requests reach the replicas on a Ray this job starts (on a "
        "running cluster, where its nodes start; see docs/operations.md): proxy, Serve's proxy "
        "actor on each node; haproxy, HAProxy straight to the replicas with Serve's "
        "throughput-optimized mode (RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED).")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (without autoscaling).")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale replicas with load instead of a fixed num_replicas.")
    replica_cpus: float = Field(0.5, gt=0, description="CPUs reserved by each replica.")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per replica; the model runs on GPU.")
    max_batch_size: int = Field(8, ge=1, description="Most rows (prompts x n) decoded together.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="Classifier: how long a batch waits to fill (completions never "
                                "wait: the engine admits requests into the running batch).")
    max_queued_requests: int = Field(
        32, ge=1, description="Completion requests waiting per replica beyond a full batch; "
                              "more get 503 with Retry-After.")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Larger bodies get 413.")
    max_inputs: int = Field(16, ge=1, description="Most prompts (times n) or texts per request.")
    max_prompt_tokens: int = Field(256, ge=1)
    max_new_tokens: int = Field(128, ge=1, description="Cap on a completion's max_tokens.")
    request_timeout_s: float = Field(60.0, gt=0, description="A request running longer gets 408.")
    p99_latency_target_s: float = Field(
        2.0, gt=0, description="p99 request latency the ServeP99AboveTarget alert holds it to.")
    api_keys_env: str | None = Field(
        None, description="Environment variable with the API keys (comma separated).")
    api_keys_file: str | None = Field(None, description="File with one API key per line.")
    quotas: QuotasSpec | None = Field(
        None, description="Requests and tokens per minute per API key, with usage metered per "
        "key; needs api_keys_env or api_keys_file.")
    sample_requests: list[str] = Field(
        default_factory=lambda: ["The event loop", "Return the number of"],
        description="Texts the quickstart sends to the service at the end of the run.",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters of the run's base served beside it, "
        "by name: PEFT adapter directories (orchestrator export RUN --format peft), local or in "
        "object storage. With adapters the model answered is the run's pretrained checkpoint "
        "(model.pretrained, as staged in the run directory), not its merged winner; a request's "
        "`model` names an adapter as `<adapter>` or `<model>:<adapter>`.")
    max_adapters: int = Field(8, ge=1, description="Adapters each replica holds loaded at once; "
                              "the least recently used one no running request uses makes room.")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"adapter name {name!r}: letters, digits, '_', '.' and '-', "
                                 "starting with a letter or digit (':' joins model and adapter)")
        return adapters

    @model_validator(mode="after")
    def _one_way_to_size(self) -> ServeSpec:
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValueError("set serve.num_replicas or serve.autoscaling, not both")
        return self

    @model_validator(mode="after")
    def _quotas_need_keys(self) -> ServeSpec:
        """serve.quotas needs API keys (serve.api_keys_env or serve.api_keys_file): quotas are
        per key."""
        if self.quotas is not None and not (self.api_keys_env or self.api_keys_file):
            raise ValueError("serve.quotas needs API keys (serve.api_keys_env or "
                             "serve.api_keys_file): quotas are per key")
        return self



class Int8Spec(_Section):
    """compress 'int8': dynamic int8 quantization of the linear layers (and weight-only int8
    embeddings) for CPU serving."""

    clip_percentile: float | None = Field(
        None, gt=50, le=100, description="Clip each weight matrix at this percentile of its "
        "absolute values before quantizing (outliers otherwise stretch the int8 scale); "
        "none: no clipping.")


class PruneSpec(_Section):
    """compress 'prune': global magnitude pruning of the transformer blocks' linear weights,
    then a recovery fine-tune that keeps the pruned weights at zero (one worker with the
    splits in memory: an actor of its own; else a Ray Train run)."""

    sparsity: float = Field(0.5, gt=0, lt=1, description="Share of the weights set to zero.")
    recovery_steps: int = Field(100, ge=0, description="Fine-tuning steps after pruning.")
    lr: float = Field(3e-4, gt=0, le=10, description="The recovery fine-tune's learning rate.")


class DistillSpec(_Section):
    """compress 'distill': a smaller student (fewer transformer blocks) trained on the teacher's
    (the winner's) soft targets, mixed with the hard labels, as the prune recovery trains. It
    starts from the teacher's embeddings and every other block."""

    n_layer: int | None = Field(None, ge=1, description="Student blocks; none: half the "
                                "teacher's (at least 1).")
    temperature: float = Field(2.0, gt=0, description="Softens both distributions in the KL.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft (KL) loss; the rest "
                         "is the hard-label loss.")
    steps: int | None = Field(None, ge=1, description="Training steps; none: train.max_steps.")
    lr: float | None = Field(None, gt=0, le=10, description="none: train.lr.")


class CompressSpec(_Section):
    variants: list[Literal["int8", "prune", "distill"]] = Field(
        default_factory=list, description="Compressed variants of the winner to build, evaluate "
        "and measure after the evaluate stage; empty (the default): no compress stage.")
    max_quality_loss: float = Field(
        0.02, ge=0, lt=1, description="Relative quality a served variant may lose on the test "
        "split (perplexity up, or accuracy down, by at most this share); the fastest variant "
        "within it is served, else the uncompressed winner.")
    latency_requests: int = Field(
        20, ge=0, description="Requests sent one at a time to each variant's real service for "
        "its p50 latency; 0: not measured.")
    int8: Int8Spec = Field(default_factory=Int8Spec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)

    @field_validator("variants")
    @classmethod
    def _each_once(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError(f"each variant at most once, got {variants}")
        return variants


class WorkerRange(_Section):
    """Elastic training (Ray Train's ScalingConfig(num_workers=(min, max))): a trial starts with
    as many workers as fit, from min to max, shrinks when a node is lost and grows when nodes
    join, each time resuming from its latest checkpoint with the same global batch."""

    min: int = Field(ge=1, description="Fewest workers a trial trains with; it waits for them.")
    max: int = Field(ge=1, description="Most workers a trial trains with.")
    resize_check_s: float = Field(
        60.0, gt=0, description="How often a running trial looks for room to grow (Ray Train's "
        "elastic_resize_monitor_interval_s); growing restarts the workers from the latest "
        "checkpoint.")

    @model_validator(mode="after")
    def _min_below_max(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be at most max ({self.max})")
        return self


def _workers_form(value: Any) -> str | None:
    """Which form of resources.num_workers `value` is written in (tags that error paths hide)."""
    if isinstance(value, dict | WorkerRange):
        return "tagged-range"
    return None if isinstance(value, bool) or not isinstance(value, int) else "tagged-int"


WorkerCount = Annotated[
    Annotated[int, Field(ge=1), Tag("tagged-int")] | Annotated[WorkerRange, Tag("tagged-range")],
    Discriminator(_workers_form, custom_error_type="workers",
                  custom_error_message="expected a whole number ≥ 1 or {min: M, max: N}")]


class ResourcesSpec(_Section):
    num_workers: WorkerCount = Field(
        1, description="Ray Train workers per trial: a number, or "
        "{min: M, max: N} for elastic training (shrinks on node loss, which needs "
        "train.max_failures, and grows when nodes join).")
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    data_cpus: float = Field(
        1.0, ge=0, description="CPUs left free for Ray Data while training (data.cache false).")

    @property
    def min_workers(self) -> int:
        return self.num_workers.min if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers.max if self.elastic else self.num_workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, WorkerRange)

    @property
    def worker_counts(self) -> range:
        """Every number of workers a trial may train with."""
        return range(self.min_workers, self.max_workers + 1)


class MlflowSpec(_Section):
    """Tracking in MLflow: the job is a parent run (the spec as parameters, the data and
    tokenizer digests as tags, the report and its plots as artifacts), each trial a child run
    (its sweep values as parameters, every validation report as metrics by step), and the winner
    a logged model (the bundle, its metrics) registered as a new version of the model named
    after the job. Tracking never fails the job: a failure prints one warning and the job goes
    on."""

    uri: str | None = Field(
        None, description="http(s)://HOST[:PORT] of an MLflow server, or sqlite:///PATH of a "
        "local MLflow database. None: sqlite database mlflow.db beside the run directories "
        "(in runs_dir), artifacts in mlartifacts/ there (the full mlflow package's `mlflow ui "
        "--backend-store-uri sqlite:///runs/mlflow.db` shows them).")
    experiment: str | None = Field(
        None, min_length=1, max_length=500, description="The MLflow experiment (created when "
        "missing). None: the job's name.")

    @field_validator("uri")
    @classmethod
    def _tracking_uri(cls, uri: str | None) -> str | None:
        if uri is None:
            return uri
        scheme, _, rest = uri.partition("://")
        if scheme == "sqlite" and rest.startswith("/") and len(rest) > 1:
            return uri
        if scheme in ("http", "https") and rest and not rest.startswith("/"):
            return uri.rstrip("/")
        raise ValueError("use http(s)://HOST[:PORT] (an MLflow server) or sqlite:///PATH (a "
                         "local MLflow database); a folder (MLflow's file store) is refused by "
                         "MLflow 3, which keeps it in maintenance mode")

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, name: str | None) -> str | None:
        if name is not None and name != name.strip():
            raise ValueError("an experiment name neither starts nor ends with whitespace")
        return name


class TrackingSpec(_Section):
    """Where the job is recorded besides its run directory."""

    mlflow: MlflowSpec | None = Field(
        None, description="Set (`mlflow: {}` for the defaults) to track the job in MLflow.")


class JobSpec(_Section):
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    runs_dir: str = Field("runs", description="Where this job's runs go: each run is a folder "
                          "<runs_dir>/<name>-<UTC time> (a local path or an object-storage URI). "
                          "Formerly run_dir, which still works.")
    # The renamed fields this spec was written with (old name -> new name), for validate to say.
    _renamed: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def renamed(self) -> dict[str, str]:
        return dict(self._renamed)
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    compress: CompressSpec = Field(default_factory=CompressSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _tracking_has_a_home(self) -> JobSpec:
        """MLflow's default database (tracking.mlflow.uri unset) lives beside the run
        directories: runs_dir must then be a local folder."""
        mlflow = self.tracking.mlflow
        if mlflow is not None and mlflow.uri is None and "://" in self.runs_dir:
            raise ValueError(
                f"tracking.mlflow.uri is unset and runs_dir = {self.runs_dir!r} is object "
                "storage, where MLflow's default sqlite database cannot live; set "
                "tracking.mlflow.uri to http(s)://HOST[:PORT] or sqlite:///PATH")
        return self

    @model_validator(mode="after")
    def _task_needs(self) -> JobSpec:
        if self.model.task is Task.CLASSIFIER and not self.data.label_column:
            raise ValueError("model.task 'classifier' needs data.label_column")
        if self.model.task is Task.LANGUAGE_MODEL and self.sweep.metric in ("val_accuracy",
                                                                            "val_f1"):
            raise ValueError(f"sweep.metric {self.sweep.metric!r} needs model.task 'classifier'")
        if self.model.task is Task.LANGUAGE_MODEL and self.train.loss != "cross_entropy":
            raise ValueError(f"train.loss {self.train.loss!r} is a classifier's loss, and "
                             "model.task is 'language_model' (next-token cross entropy); remove "
                             "it or use model.task 'classifier'")
        return self

    @model_validator(mode="after")
    def _ensemble_fits(self) -> JobSpec:
        """An ensemble averages class probabilities, and is served and evaluated as a whole."""
        if self.sweep.ensemble == 1:
            return self
        if self.model.task is not Task.CLASSIFIER:
            raise ValueError(f"sweep.ensemble = {self.sweep.ensemble} averages class "
                             f"probabilities, and model.task is {self.model.task.value!r}; "
                             "use it with model.task 'classifier', or set it to 1")
        if self.compress.variants:
            raise ValueError(f"sweep.ensemble = {self.sweep.ensemble} and compress.variants "
                             f"{list(self.compress.variants)}: compression works on one model; "
                             "set one of them aside (sweep.ensemble 1, or no variants)")
        return self

    @model_validator(mode="after")
    def _finetune_needs_a_checkpoint(self) -> JobSpec:
        if self.model.pretrained is not None:
            swept = [key for key in self.sweep.space
                     if key.startswith("model.") and key.split(".")[1] in SIZED_BY_CHECKPOINT]
            if swept:
                raise ValueError(f"sweep.space.{swept[0]}: model.pretrained = "
                                 f"{self.model.pretrained!r} fixes the architecture; remove it "
                                 "from the sweep")
        elif self.train.finetune == "lora" or "train.finetune" in self.sweep.space:
            raise ValueError("train.finetune = 'lora' (set or swept) adapts a pretrained model: "
                             "set model.pretrained, or use finetune 'full' (training from "
                             "scratch)")
        return self

    @model_validator(mode="after")
    def _compressions_apply(self) -> JobSpec:
        """A variant that cannot apply to every model the job may pick, or to the serving
        device, fails here, naming the field."""
        variants = self.compress.variants
        if "int8" in variants and (self.serve.replica_gpus > 0 or self.resources.use_gpu is True):
            where = ("serve.replica_gpus" if self.serve.replica_gpus > 0 else "resources.use_gpu")
            raise ValueError(f"compress.variants 'int8' is dynamic quantization for CPU serving "
                             f"and {where} puts the model on a GPU; drop 'int8' or serve on CPU")
        for variant in ("prune", "distill"):
            blockless = [arch for arch in self.archs if arch not in BLOCKWISE_ARCHS]
            if variant in variants and blockless:
                raise ValueError(
                    f"compress.variants {variant!r} works on transformer blocks and model.arch "
                    f"{blockless[0]!r} (which the job may pick) has none; use it with model.arch "
                    "'transformer' only")
        student = self.compress.distill.n_layer
        if "distill" in variants and student is not None and self.model.pretrained is None \
                and student >= self.model.n_layer:
            raise ValueError(f"compress.distill.n_layer = {student} is not smaller than the "
                             f"teacher's model.n_layer = {self.model.n_layer}; a student must "
                             "have fewer blocks")
        if "distill" in variants and student is None and self.model.pretrained is None \
                and self.model.n_layer == 1 and "model.n_layer" not in self.sweep.space:
            raise ValueError("compress.variants 'distill' needs a teacher of at least 2 blocks "
                             "and model.n_layer = 1; a student must have fewer")
        if "distill" in variants and "model.n_layer" in self.sweep.space and student is not None:
            raise ValueError("compress.distill.n_layer is fixed while sweep.space draws "
                             "model.n_layer; leave it unset (half the winner's)")
        return self

    @property
    def archs(self) -> tuple[str, ...]:
        """Every architecture this job may train: model.arch, or the values its sweep draws."""
        dist = self.sweep.space.get("model.arch")
        return tuple(dict.fromkeys(getattr(dist, "choice", None) or getattr(dist, "grid", None)
                                   or [self.model.arch]))

    @model_validator(mode="after")
    def _archs_fit(self) -> JobSpec:
        """An architecture the task lacks, or a per-block option for an architecture without
        transformer blocks, fails here, naming the field (also for archs only the sweep draws)."""
        task, allowed = self.model.task, ARCHS[self.model.task]
        field = "sweep.space.model.arch" if "model.arch" in self.sweep.space else "model.arch"
        for arch in self.archs:
            if arch not in allowed:
                raise ValueError(f"{field}: {arch!r} is not an architecture of model.task "
                                 f"{task.value!r}; choose from {', '.join(allowed)}")
        blockless = [a for a in self.archs if a not in BLOCKWISE_ARCHS]
        if blockless:
            for name, value, why in (
                    ("train.strategy", self.train.strategy == "fsdp", "shards per transformer "
                     "block"),
                    ("train.compile", self.train.compile, "compiles each transformer block"),
                    ("train.activation_checkpointing", self.train.activation_checkpointing,
                     "recomputes each transformer block")):
                if value:
                    shown = getattr(self.train, name.split(".")[1])
                    raise ValueError(
                        f"{name} = {shown!r} {why}, and model.arch {blockless[0]!r} has none: "
                        f"use it with model.arch 'transformer' only (strategy ddp works for "
                        f"every architecture)")
        return self

    @model_validator(mode="after")
    def _grace_period_fits(self) -> JobSpec:
        evaluations = -(-self.train.max_steps // self.train.eval_interval)
        if self.sweep.grace_period > evaluations:
            raise ValueError(
                f"sweep.grace_period = {self.sweep.grace_period} is more than the {evaluations} "
                f"evaluations a trial makes (train.max_steps {self.train.max_steps} / "
                f"train.eval_interval {self.train.eval_interval}); use at most {evaluations}")
        return self

    @model_validator(mode="after")
    def _global_batch_divides(self) -> JobSpec:
        """The global batch is the same for every worker count a trial may train with (each
        worker accumulates global / (batch_size × workers) micro-batches)."""
        train, resources = self.train, self.resources
        if train.global_batch_size and train.grad_accum_steps != 1:
            raise ValueError("set train.grad_accum_steps or train.global_batch_size, not both")
        if not resources.elastic:
            workers, per_step = resources.num_workers, train.batch_size * resources.num_workers
            if train.global_batch_size % per_step:
                raise ValueError(
                    f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                    f"train.batch_size × resources.num_workers ({train.batch_size} × {workers} = "
                    f"{per_step}) so that every worker accumulates whole micro-batches")
            return self
        fits_all = math.lcm(*(train.batch_size * n for n in resources.worker_counts))
        for workers in resources.worker_counts:
            if self.global_batch_size % (train.batch_size * workers):
                given = (f"train.global_batch_size ({train.global_batch_size})"
                         if train.global_batch_size else
                         f"the global batch (train.batch_size × train.grad_accum_steps × "
                         f"resources.num_workers.max = {self.global_batch_size})")
                raise ValueError(
                    f"{given} must be a multiple of train.batch_size × every worker count of "
                    f"resources.num_workers ({resources.min_workers} to "
                    f"{resources.max_workers}), and {train.batch_size} × {workers} = "
                    f"{train.batch_size * workers} does not divide it, so the global batch "
                    f"would change with the group's size; set train.global_batch_size to "
                    f"{fits_all} or a multiple of it")
        return self

    @property
    def global_batch_size(self) -> int:
        """Rows per optimizer step over all workers, whatever their number."""
        train = self.train
        return (train.global_batch_size
                or train.batch_size * train.grad_accum_steps * self.resources.max_workers)

    def grad_accum_steps(self, workers: int) -> int:
        """Micro-batches per optimizer step on each of `workers` workers."""
        return self.global_batch_size // (self.train.batch_size * workers)

    @property
    def metric(self) -> str:
        """The validation metric the sweep optimizes."""
        if self.sweep.metric != "auto":
            return self.sweep.metric
        return "val_accuracy" if self.model.task is Task.CLASSIFIER else "val_loss"

    @property
    def metric_mode(self) -> str:
        return "min" if self.metric == "val_loss" else "max"


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"] if not str(p).startswith(("function-", "tagged")))
        path = re.sub(r"\.(Choice|Grid|Uniform|LogUniform)\b", "", path)
        value = item.get("input")
        shown = "(missing)" if item["type"] == "missing" else repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        # A check across sections names its fields itself; the whole spec would only hide it.
        lines.append(f"  {path} = {shown}: {message}" if path else f"  {message}")
    return "invalid job spec:\n" + "\n".join(dict.fromkeys(lines))


def parse_spec(raw: dict[str, Any]) -> JobSpec:
    """Validate a plain dict into a JobSpec, raising SpecError with a readable message. Renamed
    fields are read under their new names; `spec.renamed` says which the dict used."""
    if not isinstance(raw, dict):
        raise SpecError(f"invalid job spec: expected a mapping at the top level, got {type(raw).__name__}")
    raw, renamed = _with_new_names(raw)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_format_error(error)) from None
    _check_sweep_values(spec)
    spec._renamed = renamed
    return spec


def _drawable(dist: Choice | Grid | Uniform | LogUniform) -> list[Any]:
    """The values a distribution may draw that validation can see: every choice and grid value,
    and both ends of a range."""
    if isinstance(dist, Choice):
        return dist.choice
    if isinstance(dist, Grid):
        return dist.grid
    return list(dist.uniform if isinstance(dist, Uniform) else dist.loguniform)


def _field_type(key: str) -> Any:
    """The annotation of a dotted spec field, e.g. train.batch_size -> int."""
    model: Any = JobSpec
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name].annotation


def _check_sweep_values(spec: JobSpec) -> None:
    """Every value the sweep may draw, set alone into the spec and validated as a fixed value
    is, so that a bad one fails here, naming the field and the value, not inside a trial."""
    base = spec.model_dump(mode="json")
    problems = []
    for key, dist in spec.sweep.space.items():
        if isinstance(dist, Uniform | LogUniform) and _field_type(key) is int:
            kind = "uniform" if isinstance(dist, Uniform) else "loguniform"
            problems.append(f"  sweep.space.{key}: {key} takes whole numbers and {kind} draws "
                            "fractions; sweep it with {choice: [...]} or {grid: [...]}")
            continue
        for value in _drawable(dist):
            raw = copy.deepcopy(base)
            *sections, name = key.split(".")
            node = raw
            for section in sections:
                node = node[section]
            node[name] = value
            try:
                JobSpec.model_validate(raw)
            except ValidationError as error:
                reason = _format_error(error).removeprefix("invalid job spec:\n").strip()
                problems.append(f"  sweep.space.{key} may draw {value!r}, which is refused: "
                                f"{reason}")
    if problems:
        raise SpecError("invalid job spec:\n" + "\n".join(problems))


def _with_new_names(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw spec with every field of RENAMED_FIELDS under its new name (model.family's values
    as tasks), and the renames made; both names at once are refused."""
    raw, renamed = copy.deepcopy(raw), {}
    for old, new in RENAMED_FIELDS.items():
        *parents, old_key = old.split(".")
        section = raw
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or old_key not in section:
            continue
        new_key = new.rsplit(".", 1)[-1]
        if new_key in section:
            raise SpecError(f"{old} and {new} are both set: {old} is the old name of {new}; "
                            f"keep {new}")
        value = section.pop(old_key)
        if old == "model.family":
            value = FAMILY_TASKS.get(value, value)
        section[new_key] = value
        renamed[old] = new
    return raw, renamed


def _parse_override_value(override: str, text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"--set {override!r}: the value is not valid YAML ({problem})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last would win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"the key {key!r} is given twice (line {key_node.start_mark.line + 1}"
                                "); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def flat_fields(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A spec's dump (or any nested dict) by dotted field name; empty sections stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flat_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a raw spec dict."""
    result = copy.deepcopy(raw)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {override!r}: expected KEY=VALUE, e.g. train.lr=0.001")
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_override_value(override, value)
    return result


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML job spec, apply overrides and validate it.

    A relative data.path stays relative to the current directory, which is the working directory
    of `ray job submit` too, so the same spec runs locally and on a cluster.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job spec {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise SpecError(f"job spec {str(path)!r} is not valid YAML: {error}") from None
    except SpecError as error:
        raise SpecError(f"job spec {str(path)!r}: {error}") from None
    return parse_spec(apply_overrides(raw, overrides or []))


def spec_to_yaml(spec: JobSpec) -> str:
    """The spec with every default filled in, as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
