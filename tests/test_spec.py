"""The job spec: defaults, overrides and errors that name the field, the value and what is allowed."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from conftest import REPO, SAMPLE, tiny_spec

from orchestrator.cli import main
from orchestrator.spec import (
    SERVE_METRICS_PUSH_INTERVAL_S,
    SpecError,
    Task,
    apply_overrides,
    load_spec,
    parse_spec,
)


def test_shipped_jobs_validate():
    """Every shipped job validates and reads the shipped sample, or a real corpus that
    scripts/build_pydocs_corpus.py or build_debian_corpus.py builds (too large to ship)."""
    for path in (REPO / "jobs").glob("*.yaml"):
        spec = load_spec(path)
        assert spec.data.path.endswith(("stdlib_docs.jsonl", "runs/corpora/pydocs.jsonl",
                                        "runs/corpora/debian.jsonl")), path


def test_defaults_live_in_the_model():
    spec = parse_spec({"data": {"path": str(SAMPLE)}})
    assert spec.model.task is Task.LANGUAGE_MODEL and spec.train.optimizer == "adamw"
    assert spec.metric == "val_loss" and spec.metric_mode == "min"
    assert spec.data.resolved_format == "jsonl"


def test_classifier_metric_is_accuracy():
    spec = parse_spec(tiny_spec("classifier"))
    assert spec.metric == "val_accuracy" and spec.metric_mode == "max"


@pytest.mark.parametrize("section, values, field, words", [
    ("train", {"lr": 0}, "train.lr", "greater than 0"),
    ("train", {"lr": -1e-3}, "train.lr", "greater than 0"),
    ("model", {"dropout": 1.0}, "model.dropout", "less than 1"),
    ("model", {"dropout": -0.1}, "model.dropout", "greater than or equal to 0"),
    ("train", {"optimizer": "lion"}, "train.optimizer", "'sgd', 'adam' or 'adamw'"),
    ("train", {"batch_size": "many"}, "train.batch_size", "valid integer"),
    ("model", {"colour": "red"}, "model.colour", "unknown key"),
    ("sweep", {"space": {"train.epochs": {"choice": [1]}}}, "sweep.space", "cannot sweep"),
    ("sweep", {"space": {"train.lr": {"loguniform": [0, 1]}}}, "sweep.space", "> 0"),
])
def test_bad_values_name_field_value_and_allowed(section, values, field, words):
    raw = tiny_spec("gpt", **{section: values})
    with pytest.raises(SpecError) as error:
        parse_spec(raw)
    message = str(error.value)
    assert field in message and words in message
    shown = repr(next(iter(values.values())))
    assert shown[:20] in message or "unknown key" in message or "cannot sweep" in message


def test_an_autoscaling_window_within_serves_metrics_push_interval_is_refused():
    """Serve warns (and will refuse) a look-back window not longer than its 10 s push."""
    with pytest.raises(SpecError, match=r"serve.autoscaling.look_back_period_s = 10: .*greater "
                                        r"than 10"):
        parse_spec(tiny_spec("gpt", serve={"autoscaling": {"look_back_period_s": 10}}))
    assert parse_spec(tiny_spec("gpt", serve={"autoscaling": {"look_back_period_s": 11}}))
    from ray.serve.config import DEFAULT_METRICS_INTERVAL_S

    assert SERVE_METRICS_PUSH_INTERVAL_S == DEFAULT_METRICS_INTERVAL_S  # the bound is Serve's


def test_unknown_top_level_key():
    with pytest.raises(SpecError, match=r"epochs = 3: unknown key"):
        parse_spec({**tiny_spec("gpt"), "epochs": 3})


def test_missing_data_path():
    with pytest.raises(SpecError, match=r"data = \(missing\)"):
        parse_spec({"name": "x"})


def test_classifier_needs_label_column():
    raw = tiny_spec("gpt", model={"task": "classifier"})
    with pytest.raises(SpecError, match="needs data.label_column"):
        parse_spec(raw)


def test_unsupported_format_is_named():
    spec = parse_spec(tiny_spec("gpt", data={"path": "corpus.xlsx"}))
    with pytest.raises(SpecError, match=r"data.format.*'\.xlsx'.*parquet, jsonl, csv, text"):
        _ = spec.data.resolved_format
    with pytest.raises(SpecError, match=r"data.format = 'xlsx'"):
        parse_spec(tiny_spec("gpt", data={"format": "xlsx"}))


def test_overrides_parse_yaml_values():
    raw = apply_overrides(tiny_spec("gpt"), ["train.lr=0.01", "serve.enabled=false",
                                              "sweep.space={train.lr: {choice: [0.1, 0.2]}}"])
    spec = parse_spec(raw)
    assert spec.train.lr == 0.01 and spec.serve.enabled is False
    assert spec.sweep.space["train.lr"].choice == [0.1, 0.2]
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        apply_overrides(raw, ["train.lr"])


def test_validate_command(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_spec("gpt")))
    assert main(["validate", str(job), "--set", "train.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.5 and printed["serve"]["port"] == 8000
    assert main(["validate", str(job), "--set", "train.lr=-1"]) == 2
    assert "train.lr = -1" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2


def _with_old_names(raw: dict) -> dict:
    """A spec as users wrote it before runs_dir and model.task: run_dir and model.family."""
    old = copy.deepcopy(raw)
    old["run_dir"] = old.pop("runs_dir", "runs")
    model = old.setdefault("model", {})
    task = model.pop("task", "language_model")
    model["family"] = {"language_model": "gpt", "classifier": "classifier"}[task]
    return old


def test_every_shipped_job_written_with_the_old_names_is_the_same_job(tmp_path, capsys):
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        old = tmp_path / path.name
        old.write_text(yaml.safe_dump(_with_old_names(raw)))
        assert load_spec(old).model_dump() == load_spec(path).model_dump(), path.name
        assert load_spec(old).renamed == {"run_dir": "runs_dir", "model.family": "model.task"}
        assert load_spec(path).renamed == {}
        if load_spec(path).model.pretrained is not None:
            continue  # validate would read the checkpoint, which a test machine lacks
        assert main(["validate", str(old), "--quiet"]) == 0
        notes = capsys.readouterr().err
        assert "run_dir is now called runs_dir" in notes
        assert "model.family is now called model.task" in notes


def test_a_field_under_both_its_names_is_refused():
    raw = tiny_spec("gpt")
    with pytest.raises(SpecError, match="model.family and model.task are both set"):
        parse_spec({**raw, "model": {**raw["model"], "family": "gpt"}})
    with pytest.raises(SpecError, match="run_dir and runs_dir are both set"):
        parse_spec({**raw, "run_dir": "a", "runs_dir": "b"})


@pytest.mark.parametrize("space,refused", [
    ({"train.lr": {"choice": [-1, 0.1]}}, "sweep.space.train.lr may draw -1, which is refused: "
                                          "train.lr = -1"),
    ({"model.dropout": {"uniform": [0.0, 3.0]}}, "sweep.space.model.dropout may draw 3.0"),
    ({"train.batch_size": {"choice": ["big", 0]}}, "may draw 'big', which is refused"),
    ({"train.batch_size": {"grid": [16, 0]}}, "sweep.space.train.batch_size may draw 0"),
    ({"model.d_model": {"choice": [32, 33]}}, "d_model (33) must be divisible by n_head (2)"),
    ({"train.batch_size": {"uniform": [8, 64]}}, "takes whole numbers and uniform draws"),
    ({"model.arch": {"choice": ["transformer", "bow"]}}, "'bow' is not an architecture"),
    ({"train.loss": {"choice": ["cross_entropy", "squared_hinge"]}},
     "may draw 'squared_hinge', which is refused: train.loss 'squared_hinge' is a classifier's "
     "loss, and model.task is 'language_model'"),
])
def test_every_value_a_sweep_may_draw_is_checked_by_validate(space, refused, tmp_path, capsys):
    """Before: each of these passed `orchestrator validate` and failed or misbehaved trials."""
    with pytest.raises(SpecError, match=re.escape(refused)):
        parse_spec(tiny_spec("gpt", sweep={"space": space}))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_spec("gpt", sweep={"space": space})))
    assert main(["validate", str(job)]) == 2
    assert refused in capsys.readouterr().err


def test_a_sweep_whose_every_value_is_valid_still_validates():
    spec = parse_spec(tiny_spec("gpt", sweep={"space": {
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": {"uniform": [0.0, 0.5]},
        "model.arch": {"choice": ["transformer", "lstm"]}, "train.batch_size": {"grid": [8, 16]},
        "model.d_model": {"choice": [32, 64]}}}))
    assert set(spec.sweep.space) == {"train.lr", "model.dropout", "model.arch",
                                     "train.batch_size", "model.d_model"}


def test_a_bad_set_value_and_a_duplicate_key_are_refused_in_one_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_spec("gpt")))
    assert main(["validate", str(job), "--set", "train.lr=[1,"]) == 2
    error = capsys.readouterr().err
    assert "--set 'train.lr=[1,': the value is not valid YAML" in error
    assert "Traceback" not in error
    job.write_text(job.read_text() + "name: twice\n")  # `name` is already in the file
    assert main(["validate", str(job)]) == 2
    assert "the key 'name' is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [
    ("train.weight_decay", "inf"), ("train.grad_clip", "inf"), ("train.l1", "nan"),
    ("data.block_size", "100000"), ("data.max_length", "100000")])
def test_unbounded_and_infinite_values_are_refused(field, value):
    with pytest.raises(SpecError, match=re.escape(field)):
        parse_spec(apply_overrides(tiny_spec("gpt"), [f"{field}={value}"]))


@pytest.mark.parametrize("sweep, words", [
    ({"search": "tpe", "space": {"train.lr": {"grid": [1e-3, 1e-2]}}},
     ["sweep.space.train.lr", "grid", "'tpe'", "{choice: [...]}"]),
    ({"search": "bohb", "space": {"model.dropout": {"grid": [0.0, 0.1]}}},
     ["sweep.space.model.dropout", "grid", "'bohb'"]),
    ({"search": "pbt", "space": {"model.arch": {"choice": ["transformer", "lstm"]}}},
     ["sweep.space.model.arch", "'pbt'", "train.lr", "model.dropout"]),
    ({"search": "pbt", "space": {"model.d_model": {"choice": [32, 64]}}},
     ["sweep.space.model.d_model", "'pbt'", "sizes"]),
    ({"search": "pbt"}, ["sweep.search 'pbt' needs sweep.space", "train.lr"]),
    ({"search": "hyperopt"}, ["sweep.search", "'random'", "'tpe'", "'bohb'", "'pbt'"]),
    ({"time_budget_s": -1}, ["sweep.time_budget_s", "-1"]),
])
def test_a_search_that_cannot_run_its_space_is_refused_naming_the_fields(sweep, words):
    with pytest.raises(SpecError) as error:
        parse_spec(tiny_spec("gpt", sweep=sweep))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_each_search_with_a_space_it_can_run_validates():
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": {"uniform": [0, 0.2]}}
    for search in ("random", "tpe", "bohb", "pbt"):
        spec = parse_spec(tiny_spec("gpt", sweep={"search": search, "space": space,
                                                  "time_budget_s": 60},
                                    train={"max_time_s": 30}))
        assert (spec.sweep.search, spec.sweep.time_budget_s, spec.train.max_time_s) == (
            search, 60, 30)
