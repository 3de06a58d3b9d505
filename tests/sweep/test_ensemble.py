"""sweep.ensemble without Ray: members chosen on validation (the best trials up to the cut whose
mean scores best), the ensemble answering with its members' mean class probabilities, its
bundle (ensemble.json beside one model.pt) loading as the same model for evaluate, predict and
the service, and the select stage building it from trials' checkpoints on a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE, tiny_spec

from orchestrator.bench.bundles import initial_bundle
from orchestrator.bundle import read_ensemble
from orchestrator.compress.stage import compress_finished_run
from orchestrator.export import export_hf
from orchestrator.inference.predictor import Predictor
from orchestrator.models import build_model
from orchestrator.models.ensemble import Ensemble, choose_members
from orchestrator.records import ENSEMBLE_FILE
from orchestrator.rundir import RunDir
from orchestrator.select import class_probabilities, metric_scorer, select_winner
from orchestrator.spec import SpecError, parse_spec, spec_to_yaml
from orchestrator.sweep.space import apply_trial_config
from orchestrator.sweep.tuner import pick_winner
from orchestrator.train.session import first_batches, read_split_tensors
from orchestrator.weights.checkpoint import save_checkpoint
from orchestrator.weights.model import load_bundle

LABELS = np.array([0, 0, 1, 1, 2, 2])


def probabilities(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows)


def test_the_members_are_the_best_trials_up_to_the_cut_whose_mean_scores_best():
    score = metric_scorer("val_accuracy", LABELS, 3)
    # Alone: a 4/6, b 4/6, c 2/6. a and b disagree where a is wrong, and b is sure there.
    a = probabilities([.9, .1, 0], [.9, .1, 0], [.6, .4, 0], [.1, .9, 0], [0, .1, .9], [.6, 0, .4])
    b = probabilities([.4, .6, 0], [.4, .6, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1])
    c = probabilities([0, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1])
    assert [score(p) for p in (a, b, c)] == pytest.approx([4 / 6, 4 / 6, 2 / 6])
    assert score((a + b) / 2) == 1 and score((a + b + c) / 3) == 0.5
    assert choose_members([c, a, b], score, size=3) == [1, 2]  # a+b: 6/6; c would spoil it
    assert choose_members([c, a, b], score, size=1) == [1]
    assert choose_members([a, c], score, size=2) == [0]  # a with c: 2/6


def test_the_ensemble_answers_its_members_mean_probabilities(tmp_path: Path):
    spec = parse_spec(tiny_spec("classifier"))
    _, info = _run_dir(tmp_path, spec)
    members = [build_model(apply_trial_config(spec, {"model.arch": arch}), info)
               for arch in ("bow", "lstm")]
    ids = torch.randint(2, info.vocab_size, (4, 12))
    ensemble = Ensemble(members).eval()
    with torch.no_grad():
        mean = torch.stack([m.eval()(ids).softmax(-1) for m in members]).mean(0)
        assert torch.allclose(ensemble(ids).softmax(-1), mean, atol=1e-6)


@pytest.mark.parametrize("raw, words", [
    (tiny_spec("gpt", sweep={"ensemble": 2}), ["sweep.ensemble = 2", "model.task 'classifier'"]),
    (tiny_spec("classifier", sweep={"ensemble": 3}, compress={"variants": ["int8"]}),
     ["sweep.ensemble = 3", "compress.variants ['int8']"]),
])
def test_an_ensemble_that_cannot_work_is_refused_naming_the_fields(raw, words):
    with pytest.raises(SpecError) as error:
        parse_spec(raw)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_select_builds_the_ensemble_of_trials_from_their_checkpoints(tmp_path: Path):
    """Three trials of different architectures, each at a checkpoint, on a run directory made
    here: the bundle holds the members chosen from the trials' own validation probabilities, loads as one model answering their mean, and says which trials they are."""
    spec = parse_spec(tiny_spec("classifier", sweep={"ensemble": 3}))
    run_dir, info = _run_dir(tmp_path, spec)
    trials, models = [], {}
    batches = first_batches(read_split_tensors(run_dir, "val"), spec.train.batch_size,
                            spec.train.eval_batches, torch.device("cpu"))
    labels = torch.cat([b["label"] for b in batches]).numpy()
    score = metric_scorer(spec.metric, labels, info.num_classes)
    ids = torch.cat([b["ids"] for b in batches]).long()
    for number, arch in enumerate(("transformer", "lstm", "bow")):
        torch.manual_seed(number)
        model = build_model(apply_trial_config(spec, {"model.arch": arch}), info)
        _fit(model, ids[number::3], torch.from_numpy(labels)[number::3])  # a third each
        checkpoint = tmp_path / f"checkpoint-{arch}"
        save_checkpoint(checkpoint, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, 0)
        models[arch] = model
        trials.append({"trial_id": f"t{number}", "status": "done", "config/model.arch": arch,
                       f"best_{spec.metric}": score(class_probabilities(model, batches)),
                       "best_step": 10, "checkpoint_path": str(checkpoint),
                       "best/val_accuracy": 0.0})
    table = pd.DataFrame(trials)
    probs = {arch: class_probabilities(m, batches) for arch, m in models.items()}
    ranked = table.sort_values(f"best_{spec.metric}", ascending=False)["config/model.arch"]
    expected = [list(ranked)[i] for i in
                choose_members([probs[a] for a in ranked], score, spec.sweep.ensemble)]
    notes: list[str] = []

    bundle = select_winner(spec, run_dir, info, table, pick_winner(table, spec), notes.append)

    members = read_ensemble(bundle.uri) or []
    loaded = load_bundle(bundle.uri)
    assert len(expected) > 1  # trials that learned different thirds of the rows
    assert [m.model["arch"] for m in members] == expected
    assert [m.trial_id for m in members] == [
        table.set_index("config/model.arch").loc[a, "trial_id"] for a in expected]
    assert isinstance(loaded.model, Ensemble)
    with torch.no_grad():
        mean = torch.stack([probs[a] for a in expected]).mean(0)
        assert torch.allclose(loaded.model(ids).softmax(-1), mean, atol=1e-5)
    # The replica's and batch inference's predictor: the same mean for the same texts.
    texts = [r["text"] for r in _val_rows()][:len(ids)]
    scores = [[r["scores"][label] for label in info.labels]
              for r in Predictor(loaded).classify(texts)]
    assert torch.allclose(torch.tensor(scores), mean, atol=1e-5)
    metrics = json.loads((Path(bundle.uri) / "metrics.json").read_text())
    assert metrics["val"][spec.metric] == pytest.approx(score(mean))
    assert metrics["val"][spec.metric] > max(score(probs[a]) for a in expected)
    raw = json.loads((Path(bundle.uri) / ENSEMBLE_FILE).read_text())
    assert [r["trial_id"] for r in raw] == [m.trial_id for m in members]  # plain JSON
    with pytest.raises(SpecError, match=f"an ensemble of {len(expected)} trials"):
        export_hf(bundle.uri, tmp_path / "exported")  # no Hugging Face form
    run_dir.spec_file.write_text(spec_to_yaml(spec))  # a finished run, as compress needs
    run_dir.report_json.write_text("{}")
    with pytest.raises(SpecError, match=f"an ensemble of {len(expected)} trials"):
        compress_finished_run(run_dir.uri, ["compress.variants=[int8]"])  # works on one model


def _fit(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> None:
    """A few steps on these rows alone: a trial that is right on them, less so elsewhere."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _val_rows() -> list[dict[str, str]]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return rows[::len(rows) // 48][:48]  # the sample is sorted by label: every label


def _run_dir(tmp_path: Path, spec) -> tuple[RunDir, object]:
    """A run directory with what the select stage reads: the tokenizer, and the validation
    split's rows as the data stage writes them (ids, label), here from the sample's texts."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    bundle = load_bundle(initial_bundle(tmp_path / "seed-bundle", spec, rows))
    run_dir = RunDir.at(tmp_path / "run")
    tokenizer_dir = Path(run_dir.tokenizer.path)
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "tokenizer.json").write_text(bundle.tokenizer.to_str())
    split = Path(run_dir.split("val").path)
    split.mkdir(parents=True)
    texts = _val_rows()
    length, pad = bundle.info.context_length, bundle.info.pad_id
    ids = [(e.ids[:length] + [pad] * length)[:length] for e in
           bundle.tokenizer.encode_batch([r["text"] for r in texts])]
    labels = [bundle.info.labels.index(r["label"]) for r in texts]
    pq.write_table(pa.table({"ids": ids, "label": labels}), split / "part-0.parquet")
    return run_dir, bundle.info
