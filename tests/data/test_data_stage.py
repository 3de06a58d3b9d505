"""The data stage on a real local Ray: every format, and bad datasets rejected before training."""

from __future__ import annotations

import itertools
import json
import re

import pandas as pd
import pyarrow as pa
import pytest
from conftest import tiny_spec

from orchestrator.data.sources import read_source
from orchestrator.data.stage import load_data_info, prepare_data, read_split
from orchestrator.spec import SpecError, parse_spec


@pytest.fixture(scope="module")
def frame(sample_rows) -> pd.DataFrame:
    return pd.DataFrame(sample_rows[:600])


SUFFIX = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "text": "txt"}


def _write(frame: pd.DataFrame, directory, fmt: str):
    path = directory / f"corpus.{SUFFIX[fmt]}"
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        path.write_text("\n".join(frame["text"]))
    return path


def test_the_stage_prepares_splits_tokenizer_and_info(ray_local, tmp_path, frame):
    path = _write(frame, tmp_path, "jsonl")
    spec = parse_spec(tiny_spec("gpt", path=path))
    info = prepare_data(spec, tmp_path / "run")
    assert sum(info.texts.values()) == len(frame)
    assert all(info.rows[s] > 0 for s in ("train", "val", "test"))
    ids = read_split(tmp_path / "run", "train").take_batch(4)["ids"]
    assert ids.shape == (4, spec.data.block_size + 1) and ids.max() < info.vocab_size
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    assert load_data_info(tmp_path / "run") == info


def _trained_on(lines: list[str]) -> tuple[float, float]:
    """(MB of the training split, MB the tokenizer trained on) from the stage's progress."""
    split = next(line for line in lines if line.startswith("training the tokenizer"))
    trained = next(line for line in lines if line.startswith("tokenizer trained on"))
    return (float(re.search(r"\(([\d.e+-]+) MB\)", split).group(1)),
            float(re.search(r", ([\d.e+-]+) MB", trained).group(1)))


def test_the_tokenizer_trains_on_a_bounded_seeded_sample(ray_local, tmp_path, frame):
    """data.tokenizer_sample_mb bounds the tokenizer's sample; a smaller training split is
    all of it."""
    path = _write(frame, tmp_path, "jsonl")
    whole: list[str] = []
    prepare_data(parse_spec(tiny_spec("gpt", path=path)), tmp_path / "whole", whole.append)
    split_mb, trained_mb = _trained_on(whole)
    assert trained_mb == split_mb > 0.1
    bounded: list[str] = []
    spec = parse_spec(tiny_spec("gpt", path=path, data={"tokenizer_sample_mb": 0.05}))
    info = prepare_data(spec, tmp_path / "bounded", bounded.append)
    assert any("a 0.05 MB sample of the training split" in line for line in bounded), bounded
    assert _trained_on(bounded)[0] == split_mb and 0.03 < _trained_on(bounded)[1] < 0.07
    assert all(info.rows[s] > 0 for s in ("train", "val", "test"))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "text"])
def test_every_format_reads_the_same_texts_as_jsonl(ray_local, tmp_path, frame, fmt):
    """The stage after reading is the same for every format (splits are a hash of the text), so
    equal texts mean equal splits; the whole stage runs once, on jsonl, above."""
    def texts(fmt: str) -> list[str]:
        data = parse_spec(tiny_spec("gpt", path=_write(frame, tmp_path, fmt))).data
        return sorted(read_source(data).to_pandas()["text"])

    assert texts(fmt) == texts("jsonl") == sorted(frame["text"])


def test_classifier_labels_come_from_the_training_split(ray_local, tmp_path, frame):
    path = _write(frame, tmp_path, "parquet")
    info = prepare_data(parse_spec(tiny_spec("classifier", path=path)), tmp_path / "run")
    assert info.labels == sorted(info.label_counts["train"])
    batch = read_split(tmp_path / "run", "test").take_batch(1000)
    assert batch["ids"].shape[1] == 48 and len(batch["label"]) == info.rows["test"]


def _rejects(spec_raw: dict, run_dir, *words: str) -> str:
    with pytest.raises(SpecError) as error:
        prepare_data(parse_spec(spec_raw), run_dir)
    for word in words:
        assert word in str(error.value)
    assert not (run_dir / "data" / "meta.json").exists()  # nothing half-written looks done
    return str(error.value)


def test_missing_path(ray_local, tmp_path):
    _rejects(tiny_spec("gpt", path=tmp_path / "nope.jsonl"), tmp_path / "run",
             "data.path", "nope.jsonl", "no such file")


def test_unknown_text_and_label_columns(ray_local, tmp_path, frame):
    path = _write(frame, tmp_path, "jsonl")
    _rejects(tiny_spec("gpt", path=path, data={"text_column": "body"}), tmp_path / "run",
             "data.text_column = 'body'", "columns: text, label, source")
    _rejects(tiny_spec("classifier", path=path, data={"label_column": "topic"}),
             tmp_path / "run", "data.label_column = 'topic'")


def test_empty_dataset(ray_local, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "   "}) + "\n")
    _rejects(tiny_spec("gpt", path=path), tmp_path / "run", "no non-empty texts")


def test_single_class(ray_local, tmp_path, frame):
    path = _write(frame.assign(label="only"), tmp_path, "jsonl")
    _rejects(tiny_spec("classifier", path=path), tmp_path / "run", "single class", "'only'")


def test_unreadable_file(ray_local, tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_text("this is not parquet")
    _rejects(tiny_spec("gpt", path=path), tmp_path / "run", "cannot read it as parquet")


def _labels_on_disk(run_dir, split: str) -> list[str]:
    """The labels of a written split in file order, as a reader streaming the files sees them."""
    import pyarrow.parquet as pq

    directory = run_dir / "data" / f"split={split}"
    return [label for path in sorted(directory.glob("*.parquet"))
            for label in pq.read_table(path).column("label").to_pylist()]


def test_sorted_source_is_written_shuffled_and_counted_as_on_disk(ray_local, tmp_path, frame):
    """Sources are often sorted by label: the written splits are not, and meta.json's row counts
    are the rows in the files."""
    import pyarrow.parquet as pq

    path = _write(frame.sort_values("label", kind="stable"), tmp_path, "jsonl")
    info = prepare_data(parse_spec(tiny_spec("classifier", path=path)), tmp_path / "run")
    for split in ("train", "val", "test"):
        assert info.rows[split] == pq.read_table(tmp_path / "run" / "data" / f"split={split}").num_rows
        assert info.rows[split] == info.texts[split]  # one row per text for the classifier
    labels = _labels_on_disk(tmp_path / "run", "train")
    runs = 1 + sum(a != b for a, b in itertools.pairwise(labels))
    assert len(set(labels)) > 3 and runs > len(labels) / 3  # sorted, it would be one run a label
    gpt = prepare_data(parse_spec(tiny_spec("gpt", path=path)), tmp_path / "gpt")
    assert gpt.rows == {s: pq.read_table(tmp_path / "gpt" / "data" / f"split={s}").num_rows
                        for s in ("train", "val", "test")}


def test_bad_datasets_fail_before_the_tokenizer_trains(ray_local, tmp_path, frame):
    """Counts are checked as soon as the texts are read: no tokenizer training for a dataset
    that cannot be used."""
    path = _write(frame.head(3), tmp_path, "jsonl")
    lines: list[str] = []
    with pytest.raises(SpecError, match="split empty"):
        prepare_data(parse_spec(tiny_spec("gpt", path=path)), tmp_path / "run", lines.append)
    assert not any("tokenizer" in line for line in lines), lines
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_no_full_block(ray_local, tmp_path, frame):
    path = _write(frame, tmp_path, "jsonl")
    _rejects(tiny_spec("gpt", path=path, data={"block_size": 20000}), tmp_path / "run",
             "no full block of data.block_size = 20000")


def test_unreadable_jsonl(ray_local, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a fine line"}\n{"text": "a broken\n')
    _rejects(tiny_spec("gpt", path=path), tmp_path / "run", "cannot read it as jsonl")


def _write_jsonl(rows: list[dict], path):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_equal_numeric_labels_are_one_class(ray_local, tmp_path, frame):
    """Each file is typed by its own values: 1 in a file of integers is 1.0 in a file that also
    holds 0.5. Equal numbers are one class, in the labels and in the written split texts."""
    from orchestrator.data.stage import read_split_texts

    texts, half = frame["text"].tolist(), len(frame) // 2
    (tmp_path / "numbers").mkdir()
    _write_jsonl([{"text": t, "label": i % 2} for i, t in enumerate(texts[:half])],
                 tmp_path / "numbers" / "a.jsonl")
    _write_jsonl([{"text": t, "label": [0.0, 1.0, 0.5][i % 3]} for i, t in enumerate(texts[half:])],
                 tmp_path / "numbers" / "b.jsonl")
    spec = tiny_spec("classifier", path=tmp_path / "numbers", data={"format": "jsonl"})
    info = prepare_data(parse_spec(spec), tmp_path / "run")
    assert info.labels == ["0", "0.5", "1"]
    written = read_split_texts(tmp_path / "run", "test").column("label").to_pylist()
    assert set(written) == {"0", "0.5", "1"}


def test_null_labels_are_refused_and_counted(ray_local, tmp_path, frame):
    rows = [{"text": text, "label": None if i % 100 == 7 else f"c{i % 3}"}
            for i, text in enumerate(frame["text"])]
    path = _write_jsonl(rows, tmp_path / "nulls.jsonl")
    _rejects(tiny_spec("classifier", path=path), tmp_path / "run",
             "data.label_column = 'label'", str(path), f" {len(frame) // 100} of the ")


MARKER, BAD = "<not utf-8>", b"caf\xe9"  # Latin-1 é: 0xe9 needs continuation bytes


def _encoded(fmt: str, rows: list[dict]) -> bytes:
    if fmt == "text":
        lines = [row["text"] for row in rows]
    elif fmt == "jsonl":
        lines = [json.dumps(row) for row in rows]
    else:
        lines = ["text,label", *(f'"{row["text"]}",{row["label"]}' for row in rows)]
    return "".join(line + "\n" for line in lines).encode()


def _with_bad_byte(fmt: str, rows: list[dict], column: str) -> tuple[bytes, int]:
    """A file's bytes with row 300's `column` not UTF-8, and the offset of the bad byte."""
    content = _encoded(fmt, [*rows[:300], {**rows[300], column: MARKER}, *rows[301:]])
    offset = content.index(MARKER.encode()) + BAD.index(b"\xe9")
    return content.replace(MARKER.encode(), BAD), offset


@pytest.mark.parametrize(("fmt", "column"), [("text", "text"), ("jsonl", "text"),
                                             ("csv", "text"), ("csv", "label")])
def test_a_file_that_is_not_utf8_is_named_with_its_byte(ray_local, tmp_path, frame, fmt, column):
    """One bad byte among many files: a SpecError naming the file and the byte's offset."""
    rows = [{"text": t.replace('"', "'").replace("\n", " "), "label": f"c{i % 3}"}
            for i, t in enumerate(frame["text"])]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.data").write_bytes(_encoded(fmt, rows))
    content, offset = _with_bad_byte(fmt, rows[::-1], column)
    (corpus / "b.data").write_bytes(content)
    family = "classifier" if column == "label" else "gpt"
    _rejects(tiny_spec(family, path=corpus, data={"format": fmt}), tmp_path / "run",
             f"file {corpus / 'b.data'} is not UTF-8 at byte {offset} (0xe9: invalid "
             "continuation byte)")


def _write_parts(rows: list[dict], directory, parts: int) -> None:
    """`rows` as `parts` jsonl files, gzip and zstd compressed in turn."""
    directory.mkdir()
    for part in range(parts):
        lines = "".join(json.dumps(row) + "\n" for row in rows[part::parts]).encode()
        name = f"part-{part:02}.jsonl." + ("gz" if part % 2 else "zst")
        with pa.CompressedOutputStream(str(directory / name), "gzip" if part % 2 else "zstd") as out:
            out.write(lines)


def test_many_compressed_files_make_the_same_splits_as_one_file(ray_local, tmp_path, frame):
    """20 gzip and zstd jsonl files are read as the same texts as one plain file: the same
    splits, counts, labels and split texts."""
    from orchestrator.data.stage import read_split_texts

    rows = frame[["text", "label"]].to_dict("records")
    _write_parts(rows, tmp_path / "parts", 20)
    one = prepare_data(parse_spec(tiny_spec("classifier", path=_write(frame, tmp_path, "jsonl"))),
                       tmp_path / "one")
    many = prepare_data(parse_spec(tiny_spec("classifier", path=tmp_path / "parts",
                                             data={"format": "jsonl"})), tmp_path / "many")
    assert (many.texts, many.rows, many.labels, many.label_counts) \
        == (one.texts, one.rows, one.labels, one.label_counts)
    for split in ("train", "val", "test"):
        assert sorted(read_split_texts(tmp_path / "many", split).column("text").to_pylist()) \
            == sorted(read_split_texts(tmp_path / "one", split).column("text").to_pylist())


@pytest.mark.parametrize("damage", ["truncated", "not json"])
def test_a_file_that_cannot_be_read_is_named(ray_local, tmp_path, frame, damage):
    rows = frame[["text", "label"]].to_dict("records")
    _write_parts(rows, tmp_path / "parts", 20)
    bad = tmp_path / "parts" / "part-07.jsonl.gz"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-100])
    else:
        with pa.CompressedOutputStream(str(bad), "gzip") as out:
            out.write(b'{"text": "fine"}\n{"text": "cut\n')
    _rejects(tiny_spec("gpt", path=tmp_path / "parts", data={"format": "jsonl"}),
             tmp_path / "run", "cannot read it as jsonl", f"file {bad}:")
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "texts").exists()
