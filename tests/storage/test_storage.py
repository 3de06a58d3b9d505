"""Run directories on local disk and on a real S3-compatible server (moto's, on 127.0.0.1): the
same layout object reads and writes both, and a location that cannot work fails at once with
an error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_spec
from s3 import S3Server, s3_server

from orchestrator.records import BundleRef, Completed, DataInfo, SweepTiming
from orchestrator.resume import check_resumable
from orchestrator.rundir import RunDir, find_bundle
from orchestrator.spec import SpecError, parse_spec, spec_to_yaml
from orchestrator.storage import StorageError, resolve


@pytest.fixture(scope="module")
def s3() -> S3Server:
    with s3_server() as server:
        server.create_bucket("runs")
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs")
    request.getfixturevalue("s3_env")
    return f"s3://runs/{tmp_path.name}"


def test_a_run_directory_round_trips_files_and_folders(base: str, tmp_path: Path) -> None:
    run_dir = RunDir.create(base, "job")
    assert run_dir.uri.startswith(base.rstrip("/") + "/job-")
    run_dir.spec_file.write_text("name: job\n")
    assert RunDir.open(run_dir.uri).spec_file.read_text() == "name: job\n"

    with run_dir.tokenizer.local_folder() as folder:
        (folder / "tokenizer.json").write_text("{}")
        (folder / "nested").mkdir()
        (folder / "nested" / "x.bin").write_bytes(b"\x00\x01")
    with run_dir.tokenizer.local_copy() as copy:
        assert (copy / "tokenizer.json").read_text() == "{}"
        assert (copy / "nested" / "x.bin").read_bytes() == b"\x00\x01"

    assert run_dir.completed() == Completed()
    info = DataInfo("gpt", 512, 0, 1, 32, rows={"train": 3})
    run_dir.mark_completed(data=info)
    run_dir.mark_completed(sweep=SweepTiming(12.5, 10.0, 1.0, 2))
    assert RunDir.open(run_dir.uri).completed() == Completed(
        data=info, sweep=SweepTiming(12.5, 10.0, 1.0, 2))

    run_dir.tokenizer.remove()
    assert not run_dir.tokenizer.exists() and run_dir.spec_file.exists()
    assert RunDir.latest(base, "job") == run_dir


def test_a_folder_rewritten_is_whole_throughout_and_kept_when_the_writer_fails(
        base: str) -> None:
    """A bundle being rewritten (a new winner, a recompressed variant) is read by replicas and
    deploys meanwhile: until the writer finishes they read the old contents, whole; then the new
    ones only; a writer that fails leaves the old ones."""
    folder = RunDir.create(base, "job").winner
    with folder.local_folder() as scratch:
        (scratch / "model.pt").write_bytes(b"old weights")
        (scratch / "old-only.json").write_text("{}")
    with folder.local_folder() as scratch:
        (scratch / "model.pt").write_bytes(b"new")
        assert folder.join("model.pt").read_bytes() == b"old weights"
        assert folder.entries() == ["model.pt", "old-only.json"]
    assert folder.join("model.pt").read_bytes() == b"new"
    assert folder.entries() == ["model.pt"]
    with pytest.raises(RuntimeError, match="writer failed"):
        with folder.local_folder() as scratch:
            (scratch / "model.pt").write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert folder.join("model.pt").read_bytes() == b"new"
    assert folder.entries() == ["model.pt"]
    if folder.is_local:  # nothing left beside it
        assert sorted(p.name for p in Path(folder.path).parent.iterdir()) == ["winner"]


def test_an_s3_run_directory_writes_only_to_the_bucket(s3_env: S3Server, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = RunDir.create("s3://runs/only-bucket", "job")
    run_dir.data_info.write_text(json.dumps({"vocab_size": 5}))
    assert any(key.endswith("/data/meta.json") for key in s3_env.keys("runs", "only-bucket/"))
    assert list(tmp_path.iterdir()) == []  # no local `s3:/runs/...` folder


def test_a_missing_bucket_is_named_before_anything_runs(s3_env: S3Server) -> None:
    with pytest.raises(StorageError, match=r"cannot write to s3://no-such-bucket/runs.*bucket"):
        RunDir.create("s3://no-such-bucket/runs", "job")


def test_an_unreachable_store_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(StorageError, match=r"s3://runs/x"):
        RunDir.create("s3://runs/x", "job")


def test_an_unknown_scheme_is_named() -> None:
    with pytest.raises(StorageError, match=r"nosuchfs://bucket/runs.*'nosuchfs'"):
        resolve("nosuchfs://bucket/runs")


def test_a_folder_that_is_not_a_run_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(StorageError, match=r"photos is not a run directory of orchestrator"):
        RunDir.open(tmp_path / "photos")


def _run_dir_with(tmp_path: Path, spec_raw: dict, completed: list[str]) -> RunDir:
    run_dir = RunDir.create(tmp_path, "test-gpt")
    run_dir.spec_file.write_text(spec_to_yaml(parse_spec(spec_raw)))
    records = {"data": DataInfo("gpt", 512, 0, 1, 32), "sweep": SweepTiming(1.0, 1.0, 0.0, 1),
               "report": "2026-12-04T00:00:00+00:00"}
    run_dir.mark_completed(**{stage: records[stage] for stage in completed})
    return run_dir


def test_resume_refuses_edits_to_what_completed_stages_used(tmp_path: Path) -> None:
    raw = tiny_spec("gpt")
    run_dir = _run_dir_with(tmp_path, raw, ["data"])
    edited = parse_spec({**raw, "data": {**raw["data"], "vocab_size": 999}})
    with pytest.raises(SpecError, match=r"data.vocab_size = 999 \(the run has \d+\)"):
        check_resumable(run_dir, edited)
    # The run directory is named after the job, and so is the service it deploys.
    with pytest.raises(SpecError, match=r"name = 'renamed' \(the run has 'test-gpt'\)"):
        check_resumable(run_dir, parse_spec({**raw, "name": "renamed"}))
    # The sweep has not started: its settings may still change, and so may serving's.
    check_resumable(run_dir, parse_spec({**raw, "train": {**raw["train"], "lr": 0.5},
                                         "serve": {"port": 8123}}))


def test_resume_refuses_sweep_edits_once_the_sweep_started(tmp_path: Path) -> None:
    raw = tiny_spec("gpt")
    run_dir = _run_dir_with(tmp_path, raw, ["data"])
    run_dir.tune_experiment.join("experiment_state.json").write_text("{}")
    with pytest.raises(SpecError, match=r"train.lr = 0.5"):
        check_resumable(run_dir, parse_spec({**raw, "train": {**raw["train"], "lr": 0.5}}))


def test_a_finished_run_is_not_resumed(tmp_path: Path) -> None:
    run_dir = _run_dir_with(tmp_path, tiny_spec("gpt"), ["data", "sweep", "report"])
    with pytest.raises(SpecError, match=r"has finished"):
        check_resumable(run_dir, parse_spec(tiny_spec("gpt")))


def test_a_pretrained_checkpoint_in_a_bucket_is_staged_into_a_bucket_run(
        s3_env: S3Server, tmp_path: Path) -> None:
    """model.pretrained = s3://...: read from the bucket, staged into the run's base/ there, and
    loaded from it, as a worker on a node without the head's disk does."""
    from orchestrator.bench.checkpoints import tiny_gpt2
    from orchestrator.pretrained import stage_base
    from orchestrator.records import DataInfo
    from orchestrator.spec import parse_spec
    from orchestrator.weights.model import starting_model

    resolve("s3://runs/checkpoints/gpt2").upload(tiny_gpt2(tmp_path / "gpt2"))
    spec = parse_spec({"data": {"path": "unused.jsonl", "block_size": 32},
                       "model": {"pretrained": "s3://runs/checkpoints/gpt2"}})
    run_dir = RunDir.create("s3://runs/pretrained", "job")
    base = stage_base(spec, run_dir.base)
    assert run_dir.base.join("model.safetensors").is_file()
    assert run_dir.base.join("tokenizer.json").is_file()
    info = DataInfo("gpt", base.config["vocab_size"], base.eos_id, base.pad_id, 32,
                    architecture=base.config)
    model = starting_model(spec, info, run_dir.base.uri)
    assert model.block_size == base.config["n_positions"]


def test_the_latest_run_of_a_job_is_never_a_run_of_a_longer_named_job(tmp_path: Path) -> None:
    """`runs/quickstart` once resolved to `quickstart-finetune-...` (it sorts after every
    `quickstart-2026...`)."""
    for name in ("quickstart-20261130-084049", "quickstart-20261130-090000",
                 "quickstart-finetune-20261130-093744"):
        (tmp_path / name).mkdir()
    latest = tmp_path / "quickstart-20261130-090000"
    assert RunDir.latest(tmp_path, "quickstart").uri == str(latest)
    assert RunDir.of_job(tmp_path / "quickstart").uri == str(latest)
    assert RunDir.of_job(tmp_path / "quickstart-finetune").root.name == \
        "quickstart-finetune-20261130-093744"
    assert RunDir.of_job(latest) is None  # a run directory itself is no job name


def test_what_a_run_serves_comes_from_its_layout_not_from_a_path_in_a_file(tmp_path: Path) -> None:
    """compressed/selection.json named the served bundle by path: whoever could write that one
    file in a shared run directory could point every later deploy anywhere."""
    run_dir = RunDir.create(tmp_path, "job")
    elsewhere = tmp_path / "elsewhere"
    run_dir.compression_selection.write_text(json.dumps(
        {"selected": "int8", "bundle": str(elsewhere)}))
    assert find_bundle(run_dir.uri) == BundleRef(run_dir.compressed("int8").uri)
    run_dir.compression_selection.write_text(json.dumps(
        {"selected": "winner", "bundle": str(elsewhere)}))
    assert find_bundle(run_dir.uri) == BundleRef(run_dir.winner.uri)
    run_dir.compression_selection.write_text(json.dumps(
        {"selected": "../../elsewhere", "bundle": str(elsewhere)}))
    with pytest.raises(ValueError, match=r"selects '../../elsewhere', which is not a variant"):
        find_bundle(run_dir.uri)
