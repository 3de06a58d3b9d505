"""Build a real labelled corpus from the docstrings of the installed Python distributions.

Every machine that ran `pip install -e .[test]` holds the same large libraries (numpy, pandas,
torch, ray, scipy, scikit-learn, matplotlib, pyarrow ...): their docstrings are real English
technical prose written by thousands of people, and nobody here wrote them. Each row is the
first paragraph of one module, class or function docstring (short texts, like the summaries a
user would classify), labelled by the distribution that ships it. Sources are parsed, never
imported, so the script is fast and runs no third-party code.

    python scripts/build_pydocs_corpus.py runs/corpora/pydocs.jsonl      # ~1 minute

Rows: {"text", "label", "source"} (source: the module path). Texts shorter than MIN_CHARS,
doctest-only paragraphs, duplicates, and texts found in more than one distribution are dropped;
each class keeps at most PER_CLASS texts, chosen by a seeded hash so a rebuild on the same
versions gives the same corpus. The versions differ between machines, so figures name theirs.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import warnings
from collections import Counter, defaultdict
from importlib import metadata
from pathlib import Path

# Distributions a fresh `pip install -e .[test]` brings, with many docstrings each.
DISTRIBUTIONS = ("numpy", "pandas", "torch", "ray", "scipy", "scikit-learn", "matplotlib", "sympy")
MIN_CHARS = 40
MAX_CHARS = 600
PER_CLASS = 4000
SECTION = re.compile(r"^\s*(Parameters|Returns|Args|Arguments|Examples?|Notes|Raises|Yields|"
                     r"See Also|Attributes|References|Warnings?)\s*:?\s*$", re.IGNORECASE)


def summary(doc: str) -> str | None:
    """The docstring's first paragraph, whitespace collapsed; None when it is not prose."""
    lines = []
    for line in doc.strip().splitlines():
        if not line.strip() or SECTION.match(line) or set(line.strip()) <= set("-=~"):
            break
        lines.append(line.strip())
    text = " ".join(lines)
    if len(text) < MIN_CHARS or text.startswith((">>>", "..", ":", "#")):
        return None
    if sum(c.isalpha() for c in text) < 0.6 * len(text):  # signatures, tables, code
        return None
    return text[:MAX_CHARS]


def docstrings(path: Path):
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def python_files(distribution: str):
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return
    for file in dist.files or ():
        if file.suffix == ".py" and "/tests/" not in f"/{file}" and "/test/" not in f"/{file}":
            yield Path(dist.locate_file(file)), str(file)


def build(distributions: tuple[str, ...], per_class: int, seed: int) -> list[dict[str, str]]:
    texts: dict[str, dict[str, str]] = defaultdict(dict)  # label -> text -> source
    for name in distributions:
        for path, source in python_files(name):
            if not path.is_file():
                continue
            for doc in docstrings(path):
                text = summary(doc)
                if text:
                    texts[name].setdefault(text, source)
    owners = Counter(text for label in texts.values() for text in label)
    rows = []
    for label, found in texts.items():
        unique = [(text, source) for text, source in found.items() if owners[text] == 1]
        unique.sort(key=lambda item: hashlib.sha1(f"{seed}:{item[0]}".encode()).hexdigest())
        rows += [{"text": text, "label": label, "source": source}
                 for text, source in unique[:per_class]]
    rows.sort(key=lambda r: (r["label"], r["source"], r["text"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/corpora/pydocs.jsonl")
    parser.add_argument("--per-class", type=int, default=PER_CLASS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distributions", nargs="+", default=list(DISTRIBUTIONS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = build(tuple(args.distributions), args.per_class, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = Counter(row["label"] for row in rows)
    versions = {name: metadata.version(name) for name in counts}
    print(f"{len(rows)} texts in {len(counts)} classes -> {out}")
    for name, count in sorted(counts.items()):
        print(f"  {name} {versions[name]}: {count}")
    print(f"Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
