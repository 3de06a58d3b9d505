"""The checkout the benchmarks measure: its shipped jobs and sample corpus, which are not part of
the installed package. Benchmarks run from the repository's root, as the docs show."""

from __future__ import annotations

from pathlib import Path

from orchestrator.bench import BenchmarkUnavailable


def repository_file(relative: str) -> Path:
    """A file of the checkout, from the current directory; a clear refusal elsewhere."""
    path = Path.cwd() / relative
    if not path.exists():
        raise BenchmarkUnavailable(f"{relative} is not under {Path.cwd()}: run `orchestrator bench` "
                                   "from the repository's root")
    return path


def sample_corpus() -> Path:
    """The project's own small real corpus (jobs/data/stdlib_docs.jsonl)."""
    return repository_file("jobs/data/stdlib_docs.jsonl")
