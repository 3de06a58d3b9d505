"""Build the sample corpus shipped in jobs/data/ from CPython's standard library docstrings.

The docstrings are real English prose written by the CPython developers (PSF License), they are
on every machine that has Python, and they need no network. Each row is one docstring; its label
is the standard-library package it documents, which gives the classifier a real topic signal.

    python scripts/build_sample_corpus.py jobs/data/stdlib_docs.jsonl
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import sys
import warnings
from pathlib import Path

PACKAGES = ["asyncio", "email", "unittest", "xml", "multiprocessing", "http", "json", "logging",
            "importlib", "concurrent", "urllib", "sqlite3", "ctypes", "collections", "tomllib"]
LABELS = {"asyncio": "asyncio", "concurrent": "asyncio", "multiprocessing": "multiprocessing",
          "email": "email", "http": "web", "urllib": "web", "unittest": "unittest",
          "xml": "xml", "json": "data", "sqlite3": "data", "tomllib": "data",
          "logging": "logging", "importlib": "importlib", "collections": "data", "ctypes": "ctypes"}
MIN_CHARS = 60


def iter_modules(package: str):
    root = importlib.import_module(package)
    yield root
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=package + "."):
        if ".test" in info.name or info.name.endswith("__main__"):
            continue
        try:
            yield importlib.import_module(info.name)
        except Exception:  # optional platform modules (winreg, _overlapped ...)
            continue


def iter_docstrings(module):
    seen: set[int] = set()
    stack = [module]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        doc = inspect.getdoc(obj)
        if doc:
            yield doc
        if inspect.ismodule(obj) or inspect.isclass(obj):
            for name, member in sorted(vars(obj).items()):
                if name.startswith("__"):
                    continue
                if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(
                    member, "__module__", None
                ) == module.__name__:
                    stack.append(member)


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    rows, seen_text = [], set()
    for package in PACKAGES:
        for module in iter_modules(package):
            for doc in iter_docstrings(module):
                text = re.sub(r"\s+", " ", doc).strip()
                if len(text) < MIN_CHARS or text in seen_text:
                    continue
                seen_text.add(text)
                rows.append({"text": text, "label": LABELS[package], "source": module.__name__})
    rows.sort(key=lambda r: (r["source"], r["text"]))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} docstrings from Python {sys.version.split()[0]} -> {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "jobs/data/stdlib_docs.jsonl")
