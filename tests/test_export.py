"""`orchestrator export`: a winner as a Hugging Face model directory, written without destroying
what the target folder already holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE, tiny_spec

from orchestrator.bench.bundles import initial_bundle
from orchestrator.cli import main
from orchestrator.export import export_hf
from orchestrator.spec import SpecError, parse_spec

EXPORTED = "config.json"  # one of the files every export writes


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    return initial_bundle(tmp_path_factory.mktemp("export") / "gpt", parse_spec(tiny_spec("gpt")),
                          rows)


def test_an_export_into_a_folder_with_other_files_is_refused_and_keeps_them(bundle, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("not the export's")
    with pytest.raises(SpecError, match=rf"--output '{target}' is not empty \(notes.txt\)"):
        export_hf(bundle, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_only_what_an_export_writes(bundle, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("not the export's")
    (target / EXPORTED).write_text("{}")  # a stale export's file, replaced
    assert main(["export", str(bundle), "-o", str(target), "--overwrite"]) == 0
    assert (target / "notes.txt").read_text() == "not the export's"
    assert json.loads((target / EXPORTED).read_text())["model_type"] == "gpt2"
    assert "loads it" in capsys.readouterr().out
    # The exported folder loads to our logits (the export checks the round trip itself).
    assert export_hf(bundle, tmp_path / "fresh").max_logit_difference < 1e-4


def test_the_cli_refuses_a_non_empty_output_in_one_line(bundle, tmp_path, capsys):
    (tmp_path / "keep.bin").write_bytes(b"\x00")
    assert main(["export", str(bundle), "-o", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "is not empty (keep.bin)" in error and "--overwrite" in error
    assert "Traceback" not in error and (tmp_path / "keep.bin").exists()


def test_predict_into_a_folder_with_other_files_is_refused_before_anything_runs(bundle, tmp_path,
                                                                                capsys):
    """`orchestrator predict` appended to what was there and counted it as its own rows."""
    from orchestrator.evaluate import predict

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier.parquet").write_bytes(b"PAR1")
    with pytest.raises(SpecError, match=r"--output '.*out' is not empty \(earlier.parquet\)"):
        predict(bundle, str(SAMPLE), str(tmp_path / "out"))
    assert main(["predict", str(bundle), "--input", str(SAMPLE), "--output",
                 str(tmp_path / "out")]) == 2
    assert "is not empty (earlier.parquet)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["earlier.parquet"]
