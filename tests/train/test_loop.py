"""The training loop without Ray: train_loop in this process through LocalSession, on run
directories written here as the data stage writes them (a byte-level tokenizer, the splits as
parquet, meta.json), for both tasks. What a user relies on: reports every eval_interval with
their figures, a restarted or resumed run ending exactly where an uninterrupted one ends,
accumulated micro-batches making one big batch's update, a pruned model's zeros kept through its
recovery, the distillation objective from the teacher's weights, and LoRA training only its
adapters. Ray's own part (a killed Ray Train worker, several workers, Tune) is in
test_resume.py, test_parallel.py and tests/sweep/.

The helpers live here rather than in a tests/train/conftest.py: a second conftest module would
shadow tests/conftest.py for the `from conftest import ...` of the modules collected after it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from conftest import SAMPLE, tiny_spec
from tokenizers import Tokenizer

from orchestrator.bundle import write_bundle
from orchestrator.compress.distill import Distillation, student_spec_and_info
from orchestrator.compress.prune import PrunedRecovery, prune_globally, sparsity_of
from orchestrator.data.datasets import SPLITS, pack_blocks, pad_or_truncate, split_of
from orchestrator.models import build_model
from orchestrator.records import DataInfo
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, parse_spec
from orchestrator.tokenizer import EOS, PAD, TOKENIZER_FILE, save_tokenizer, train_tokenizer
from orchestrator.train.batches import BatchStream
from orchestrator.train.config import FromSpec, Start, worker_config
from orchestrator.train.loop import train_loop
from orchestrator.train.masks import prunable_weights
from orchestrator.train.optim import warmup_cosine
from orchestrator.train.parallel import transformer_blocks
from orchestrator.train.session import (
    InMemorySplit,
    LocalSession,
    first_batches,
    read_split_tensors,
)
from orchestrator.weights.checkpoint import TRAINER_STATE_FILE, load_model_weights
from orchestrator.weights.model import load_bundle, save_bundle, starting_model

FAMILIES = ["gpt", "classifier"]
# Every third text of the sample: all ten labels, and epochs of 20-40 batches of 16 rows.
TEXTS = [json.loads(line) for line in SAMPLE.read_text().splitlines()][::3]


# A prepared run directory, written without Ray

@dataclass(frozen=True)
class Prepared:
    run_dir: RunDir
    info: DataInfo


def _write_split(run_dir: RunDir, name: str, ids: np.ndarray, labels: np.ndarray | None) -> None:
    folder = Path(run_dir.split(name).path)
    folder.mkdir(parents=True)
    columns = {"ids": pa.array(ids.tolist(), type=pa.list_(pa.int32()))}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    pq.write_table(pa.table(columns), str(folder / "part-0.parquet"))


def write_prepared(root: Path, family: str, rows: list[dict], block_size: int = 32,
                   max_length: int = 48, tokenizer: Tokenizer | None = None,
                   eos_id: int | None = None, pad_id: int | None = None,
                   architecture: dict | None = None, vocab_size: int | None = None) -> Prepared:
    """What the data stage leaves in a run directory, for tiny_spec(family)'s data section:
    texts split as the stage splits them, a tokenizer trained on the training split (or the
    one given: a pretrained checkpoint's), packed LM blocks or padded texts with integer labels
    in shuffled order, and meta.json."""
    run_dir = RunDir.at(root)
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for row in rows:
        by_split[split_of(row["text"], 0, 0.1, 0.1)].append(row)
    if tokenizer is None:
        tokenizer = train_tokenizer((row["text"] for row in by_split["train"]), 512)
        eos_id, pad_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    save_tokenizer(tokenizer, run_dir.tokenizer.path)
    labels = sorted({row["label"] for row in by_split["train"]}) if family == "classifier" else []
    label_ids = {label: i for i, label in enumerate(labels)}
    counts = {}
    for split, texts in by_split.items():
        encoded = [e.ids for e in tokenizer.encode_batch([row["text"] for row in texts])]
        if family == "gpt":
            ids, split_labels = pack_blocks(encoded, eos_id, block_size), None
        else:
            ids = pad_or_truncate(encoded, pad_id, max_length)
            split_labels = np.array([label_ids.get(row["label"], -1) for row in texts])
        # Shuffled as the stage writes them: blocks cut from one stream (or texts sorted by
        # label) would otherwise sit next to their neighbours in the validation batches.
        order = np.random.default_rng(0).permutation(len(ids))
        _write_split(run_dir, split, ids[order],
                     None if split_labels is None else split_labels[order])
        counts[split] = len(ids)
    info = DataInfo.from_dict({  # as meta.json is read back
        "family": family, "vocab_size": vocab_size or tokenizer.get_vocab_size(),
        "eos_id": eos_id, "pad_id": pad_id,
        "context_length": block_size if family == "gpt" else max_length, "labels": labels,
        "texts": {split: len(texts) for split, texts in by_split.items()}, "rows": counts,
        "architecture": architecture})
    run_dir.data_info.write_text(json.dumps(asdict(info), indent=2))
    return Prepared(run_dir, info)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """prepared(family): that task's run directory, written once per module."""
    made: dict[str, Prepared] = {}

    def get(family: str) -> Prepared:
        if family not in made:
            made[family] = write_prepared(tmp_path_factory.mktemp(f"prepared-{family}"), family,
                                          TEXTS)
        return made[family]
    return get


# Running the loop

def spec_of(family: str, **sections) -> JobSpec:
    """A tiny spec whose device is decided (a driver decides it before it tells any worker)."""
    raw = tiny_spec(family, **sections)
    raw["resources"]["use_gpu"] = False
    return parse_spec(raw)


def run(data: Prepared, spec: JobSpec, checkpoints: Path, start: Start | None = None,
        restored: str | None = None, resume_from: str | None = None) -> LocalSession:
    """train_loop in this process; the session holds its reports."""
    config = worker_config(spec, data.info, data.run_dir, start=start or FromSpec(),
                           resume_from=resume_from)
    session = LocalSession(config, checkpoints, restored=restored)
    train_loop(config, session)
    return session


def weights(checkpoint: str, spec: JobSpec, data: Prepared) -> dict[str, torch.Tensor]:
    """A checkpoint's trained weights, in the model its spec builds."""
    model = starting_model(spec, data.info, data.run_dir.base)
    load_model_weights(checkpoint, model)
    return model.state_dict()


def trainer_state(checkpoint: str) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text())


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


TOKENS_PER_ROW = {"gpt": 32, "classifier": 48}  # block_size targets; max_length ids


def test_the_loop_runs_without_importing_ray(tmp_path):
    """In a fresh interpreter: this module's helpers, the loop and a LocalSession run, and
    nothing imports Ray (the fast tests need none)."""
    code = f"""
import sys
from pathlib import Path
sys.path[:0] = [{str(Path(__file__).parents[1])!r}, {str(Path(__file__).parent)!r}]
import test_loop as t
root = Path({str(tmp_path)!r})
data = t.write_prepared(root / "run", "gpt", t.TEXTS[::4])
spec = t.spec_of("gpt", train={{"max_steps": 2, "eval_interval": 1, "warmup_steps": 1}})
print(len(t.run(data, spec, root / "checkpoints").reports))
print(sorted(name for name in sys.modules if name.split(".")[0] == "ray"))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-3:] == ["2", "[]", ""]


# Reports

@pytest.mark.parametrize("family", FAMILIES)
def test_a_run_reports_every_interval_with_its_figures_and_learns(family, prepared, tmp_path):
    data = prepared(family)
    spec = spec_of(family, train={"max_steps": 25, "eval_interval": 10, "warmup_steps": 2})
    reports = run(data, spec, tmp_path).reports
    assert [r["step"] for r in reports] == [10, 20, 25]  # the short last interval too
    for report in reports:
        assert report["lr"] == pytest.approx(
            spec.train.lr * warmup_cosine(report["step"], 2, 25), rel=1e-9)
        assert report["resumed_from_step"] == -1
        assert report["tokens_per_s"] > 0 and report["samples_per_s"] > 0
        assert report["tokens_per_s"] / report["samples_per_s"] == pytest.approx(
            TOKENS_PER_ROW[family])
        assert math.isfinite(report["train_loss"])
        assert trainer_state(report["checkpoint"])["step"] == report["step"]
    # The validation figures are those of the weights checkpointed with them.
    last = reports[-1]
    model = starting_model(spec, data.info, None)
    load_model_weights(last["checkpoint"], model)
    expected = _val_figures(model.eval(), family, first_batches(
        read_split_tensors(data.run_dir, "val"), 16, 2, torch.device("cpu")))
    assert {key: last[key] for key in expected} == pytest.approx(expected, rel=1e-5)
    if family == "classifier":
        assert 0 <= last["val_f1"] <= 1
    # It learns.
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
    assert reports[-1]["val_loss"] < reports[0]["val_loss"]
    guessing = math.log(data.info.vocab_size if family == "gpt" else data.info.num_classes)
    assert reports[-1]["val_loss"] < guessing - (0.5 if family == "gpt" else 0.05)


def _val_figures(model, family: str, batches) -> dict[str, float]:
    """The validation figures of the first 2 batches, computed here: mean cross entropy over
    the targets, and perplexity or accuracy."""
    ids = torch.cat([batch["ids"] for batch in batches]).long()
    with torch.no_grad():
        if family == "gpt":
            logits = model(ids[:, :-1]).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            return {"val_loss": float(loss), "val_perplexity": math.exp(float(loss))}
        labels = torch.cat([batch["label"] for batch in batches]).long()
        assert (labels >= 0).all()  # every validation label is one the training split has
        logits = model(ids).float()
        return {"val_loss": float(F.cross_entropy(logits, labels)),
                "val_accuracy": float((logits.argmax(-1) == labels).float().mean())}


# Resume

# 48 rows a batch: an epoch is 30 (language model) or 7 (classifier) steps.
RESUME = {"train": {"max_steps": 40, "eval_interval": 10, "batch_size": 48},
          "model": {"dropout": 0.1}}


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """uninterrupted(family): a 40-step run with dropout (so that a resumed run must also
    restore the random state), once per module."""
    made: dict[str, LocalSession] = {}

    def get(family: str) -> LocalSession:
        if family not in made:
            made[family] = run(prepared(family), spec_of(family, **RESUME),
                               tmp_path_factory.mktemp(f"uninterrupted-{family}"))
        return made[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_a_run_restarted_from_its_checkpoint_ends_exactly_like_an_uninterrupted_one(
        family, prepared, uninterrupted, tmp_path):
    data, spec, reference = prepared(family), spec_of(family, **RESUME), uninterrupted(family)
    # Restarted mid-epoch (step 20), it crosses an epoch boundary before its end.
    assert reference.reports[-1]["epoch"] > reference.reports[1]["epoch"]
    assert 20 % (data.info.rows["train"] // 48) != 0
    restarted = run(data, spec, tmp_path, restored=reference.reports[1]["checkpoint"])
    assert [r["step"] for r in restarted.reports] == [30, 40]
    for got, expected in zip(restarted.reports, reference.reports[2:]):
        assert got["resumed_from_step"] == 20
        for key in ("train_loss", "val_loss", "lr", "epoch"):
            assert got[key] == expected[key], key
    assert trainer_state(restarted.reports[-1]["checkpoint"])["restarts"] == 1
    assert_same_weights(weights(restarted.reports[-1]["checkpoint"], spec, data),
                        weights(reference.reports[-1]["checkpoint"], spec, data))


def test_a_new_run_resumed_from_another_runs_checkpoint_continues_from_its_step(
        prepared, uninterrupted, tmp_path):
    data, spec, reference = prepared("gpt"), spec_of("gpt", **RESUME), uninterrupted("gpt")
    resumed = run(data, spec, tmp_path, resume_from=reference.reports[1]["checkpoint"])
    assert [r["step"] for r in resumed.reports] == [30, 40]
    assert all(r["resumed_from_step"] == 20 for r in resumed.reports)
    assert [r["train_loss"] for r in resumed.reports] == \
        [r["train_loss"] for r in reference.reports[2:]]
    assert trainer_state(resumed.reports[-1]["checkpoint"])["restarts"] == 0  # not a failure
    assert_same_weights(weights(resumed.reports[-1]["checkpoint"], spec, data),
                        weights(reference.reports[-1]["checkpoint"], spec, data))


def test_a_run_stopped_by_its_time_ends_on_a_decayed_learning_rate(prepared, tmp_path):
    """train.max_time_s, far short of max_steps: the run stops at its first evaluation past the
    time, and the learning rate has decayed to about its end by then (without the time horizon
    it would still be near its peak, at a few percent of max_steps)."""
    spec = spec_of("classifier", train={"max_steps": 100_000, "max_time_s": 1.5,
                                        "eval_interval": 20, "warmup_steps": 2})
    reports = run(prepared("classifier"), spec, tmp_path).reports
    last = reports[-1]
    assert last["train_time_s"] >= 1.5 and reports[-2]["train_time_s"] < 1.5
    assert last["step"] < 0.1 * spec.train.max_steps
    assert last["lr"] < 0.15 * spec.train.lr  # the cosine's floor is 0.1 of it
    assert reports[0]["lr"] > 0.5 * spec.train.lr


# Gradient accumulation

@pytest.mark.parametrize("family", FAMILIES)
def test_accumulated_micro_batches_make_the_update_of_one_big_batch(family, prepared, tmp_path):
    """With SGD and no clipping the update is linear in the gradient, so a mis-scaled or
    dropped micro-batch shows (Adam would normalise a scale away)."""
    data = prepared(family)
    def trained(name: str, **train) -> tuple[dict[str, torch.Tensor], float]:
        spec = spec_of(family, train={"max_steps": 4, "eval_interval": 2, "warmup_steps": 1,
                                      "optimizer": "sgd", "lr": 0.5, "grad_clip": 0.0, **train})
        session = run(data, spec, tmp_path / name)
        return weights(session.reports[-1]["checkpoint"], spec, data), \
            session.reports[-1]["train_loss"]

    assert spec_of(family, train={"batch_size": 16, "global_batch_size": 32}).grad_accum_steps(1) == 2
    accumulated, accumulated_loss = trained("accumulated", batch_size=16, global_batch_size=32)
    big, big_loss = trained("big", batch_size=32)
    small, _ = trained("small", batch_size=16)
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-5)
    for name, value in big.items():
        assert torch.allclose(accumulated[name], value, rtol=1e-4, atol=1e-6), name
    # The same comparison tells one micro-batch's update from two.
    assert max(float((small[name] - value).abs().max()) for name, value in big.items()) > 1e-3


# Compression starts

@pytest.mark.parametrize("family", FAMILIES)
def test_a_pruned_model_recovers_with_its_pruned_weights_kept_at_zero(family, prepared,
                                                                      tmp_path):
    data = prepared(family)
    spec = spec_of(family, model={"n_layer": 2},
                   train={"max_steps": 10, "eval_interval": 5, "warmup_steps": 1, "lr": 1e-2})
    torch.manual_seed(1)
    model = build_model(spec, data.info)
    kept = {k: v.clone() for k, v in model.state_dict().items()
            if k not in prunable_weights(model)}  # embeddings, norms, biases, the head
    assert prune_globally(model, 0.5) == pytest.approx(0.5, abs=0.01)
    pruned = {name: weight.detach().clone() for name, weight in prunable_weights(model).items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    bundle = tmp_path / "pruned"
    write_bundle(bundle, spec, data.info, model.state_dict(),
                 Path(data.run_dir.tokenizer.path) / TOKENIZER_FILE, {}, {})

    session = run(data, spec, tmp_path / "recovery", start=PrunedRecovery(str(bundle)))
    assert [r["step"] for r in session.reports] == [5, 10]
    recovered = build_model(spec, data.info)
    recovered.load_state_dict(weights(session.reports[-1]["checkpoint"], spec, data))
    for name, weight in prunable_weights(recovered).items():
        # Exactly the pruned weights are zero; the others trained.
        assert torch.equal(weight == 0, pruned[name] == 0), name
        assert not torch.equal(weight, pruned[name]), name
    assert sparsity_of(recovered) == pytest.approx(0.5, abs=0.01)


@pytest.fixture(scope="module")
def teacher(prepared, tmp_path_factory):
    """teacher(family): a 2-block model trained 20 steps, as a bundle."""
    made: dict[str, tuple[JobSpec, str]] = {}

    def get(family: str) -> tuple[JobSpec, str]:
        if family not in made:
            data, root = prepared(family), tmp_path_factory.mktemp(f"teacher-{family}")
            spec = spec_of(family, model={"n_layer": 2, "dropout": 0.0},
                           compress={"variants": ["distill"],
                                     "distill": {"temperature": 2.0, "alpha": 1.0, "steps": 10}})
            session = run(data, spec, root / "checkpoints")
            bundle = save_bundle(root / "bundle", spec, data.info,
                                 session.reports[-1]["checkpoint"], data.run_dir.tokenizer, {},
                                 "teacher").uri
            made[family] = spec, bundle
        return made[family]
    return get


def _hand_distillation_loss(family: str, student, teacher_model, batch, temperature: float,
                            alpha: float) -> tuple[float, float]:
    """(alpha × T² × KL(teacher ‖ student) + (1 - alpha) × cross entropy, cross entropy),
    written out here from the definitions, in float64."""
    ids = batch["ids"].long()
    inputs = ids[:, :-1] if family == "gpt" else ids
    with torch.no_grad():
        s, t = student(inputs).double(), teacher_model(inputs).double()
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    targets = ids[:, 1:].reshape(-1) if family == "gpt" else batch["label"].long()
    p_teacher = torch.softmax(t / temperature, -1)
    kl = (p_teacher * (torch.log(p_teacher) - torch.log_softmax(s / temperature, -1))).sum(-1)
    cross_entropy = F.cross_entropy(s, targets)
    return float(alpha * temperature**2 * kl.mean() + (1 - alpha) * cross_entropy), \
        float(cross_entropy)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_student_starts_from_its_teacher_and_learns_the_distillation_objective(
        family, prepared, teacher, tmp_path):
    data = prepared(family)
    teacher_spec, bundle = teacher(family)
    student_spec, student_info = student_spec_and_info(teacher_spec, data.info)
    assert student_spec.model.n_layer == 1 and student_spec.compress.variants == []
    student_spec = student_spec.model_copy(update={"train": student_spec.train.model_copy(
        update={"eval_interval": 1})})
    distill = teacher_spec.compress.distill  # all soft targets: alpha 1
    start = Distillation(bundle, temperature=distill.temperature, alpha=distill.alpha)
    student_data = Prepared(data.run_dir, student_info)

    # The student the loop starts from: the teacher's block 0 and everything around the blocks.
    config = worker_config(student_spec, student_info, data.run_dir, start=start)
    torch.manual_seed(student_spec.train.seed)  # as the loop seeds before it begins
    student = start.begin(config, torch.device("cpu")).model
    teacher_model = load_bundle(bundle).model
    teacher_state = teacher_model.state_dict()
    assert len(transformer_blocks(student)) == 1 and len(transformer_blocks(teacher_model)) == 2
    for name, value in student.state_dict().items():
        assert torch.equal(value, teacher_state[name]), name

    session = run(student_data, student_spec, tmp_path, start=start)
    assert [r["step"] for r in session.reports] == list(range(1, 11))
    # The first step's loss is the distillation objective on the first batch: T² × KL, far
    # below the cross entropy, since the student starts close to its teacher.
    first_batch = next(BatchStream(InMemorySplit(read_split_tensors(data.run_dir, "train"),
                                                 torch.device("cpu"), student_spec.train.seed),
                                   student_spec.train.batch_size))
    expected, cross_entropy = _hand_distillation_loss(family, student.train(), teacher_model,
                                                      first_batch, 2.0, 1.0)
    # (float32 in the loop: the KL of near distributions is a small difference of log-probs)
    assert session.reports[0]["train_loss"] == pytest.approx(expected, rel=1e-3)
    assert expected < cross_entropy / 10
    # Its training brings it closer to the teacher on the validation texts (the cross entropy
    # alone takes a language model's student further away).
    trained = starting_model(student_spec, student_info, None)
    load_model_weights(session.reports[-1]["checkpoint"], trained)
    val = first_batches(read_split_tensors(data.run_dir, "val"), 16, 2, torch.device("cpu"))
    assert _gap(family, trained, teacher_model, val) < _gap(family, student, teacher_model, val)


def _gap(family: str, student, teacher_model, batches) -> float:
    """The mean KL(teacher ‖ student) over the batches' predictions."""
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            inputs = batch["ids"].long()[:, :-1] if family == "gpt" else batch["ids"].long()
            total += float(F.kl_div(torch.log_softmax(student.eval()(inputs), -1),
                                    torch.log_softmax(teacher_model(inputs), -1),
                                    log_target=True, reduction="none").sum(-1).mean())
    return total / len(batches)


# LoRA

@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A run directory staged from a tiny local GPT-2 (base/) with its tokenizer's splits, and
    the LoRA spec that trains on it."""
    from orchestrator.bench.checkpoints import tiny_gpt2
    from orchestrator.pretrained import stage_base
    from orchestrator.storage import resolve

    root = tmp_path_factory.mktemp("pretrained")
    raw = tiny_spec("gpt", train={"finetune": "lora", "max_steps": 10, "eval_interval": 5,
                                  "warmup_steps": 1, "lr": 3e-2})
    raw["model"] = {"task": "language_model", "pretrained": str(tiny_gpt2(root / "gpt2")),
                    "dropout": 0.0}
    raw["resources"]["use_gpu"] = False
    spec = parse_spec(raw)
    run_dir = root / "run"
    base = stage_base(spec, resolve(run_dir / "base"))
    tokenizer = Tokenizer.from_file(str(run_dir / "base" / TOKENIZER_FILE))
    data = write_prepared(run_dir, "gpt", TEXTS[::2], tokenizer=tokenizer, eos_id=base.eos_id,
                          pad_id=base.pad_id, architecture=base.config,
                          vocab_size=base.config["vocab_size"])
    return data, spec


def test_lora_trains_only_its_adapters(pretrained_run, tmp_path):
    data, spec = pretrained_run
    session = run(data, spec, tmp_path)
    assert [r["step"] for r in session.reports] == [5, 10]
    assert session.reports[-1]["train_loss"] < session.reports[0]["train_loss"]
    checkpoint = session.reports[-1]["checkpoint"]
    saved = list(dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata)
    model_tensors = [name for name in saved if name.startswith("model.")]
    optimizer_tensors = [name for name in saved if name.startswith("optimizer.state.")]
    assert model_tensors and all("lora_" in name for name in model_tensors)
    assert optimizer_tensors and all("lora_" in name for name in optimizer_tensors)
    # Over the pretrained weights, the trained adapters change the model (peft starts B at 0).
    adapted = starting_model(spec, data.info, data.run_dir.base)
    load_model_weights(checkpoint, adapted)
    lora_b = [p for name, p in adapted.named_parameters() if "lora_B" in name]
    assert lora_b and all(float(p.abs().max()) > 0 for p in lora_b)


def test_an_evaluation_reads_only_the_validation_rows_it_uses(prepared, tmp_path):
    """The val split is read no further than eval_batches x batch_size rows (a large val split
    stays on disk), and those rows are the split's first, the same at every evaluation."""
    data = prepared("classifier")
    whole = read_split_tensors(data.run_dir, "val")
    first = read_split_tensors(data.run_dir, "val", first=5)
    assert len(whole["ids"]) > 5 and len(first["ids"]) == 5
    assert torch.equal(first["ids"], whole["ids"][:5])
    assert torch.equal(first["label"], whole["label"][:5])
