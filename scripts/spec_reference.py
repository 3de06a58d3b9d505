#!/usr/bin/env python3
"""Generates docs/spec.md, the job spec reference, from the pydantic models in orchestrator/spec.py.

    python scripts/spec_reference.py            # print it
    python scripts/spec_reference.py --write    # write docs/spec.md
    python scripts/spec_reference.py --check    # exit 1 when docs/spec.md is stale

Every field of `JobSpec`, walked recursively, with its dotted path, type, default, bounds and
description. A field's description is, in this order: its `Field(description=...)`; a comment on
its own line in spec.py (`x: int = 1  # ...`); the comment block just above it (which also covers
the fields that follow it without a blank line, until one has a description of its own); a note
kept here in FALLBACK, for fields spec.py does not describe yet (spec.py wins as soon as it
does; tests/test_docs.py fails on a note for a field that no longer exists). A nested section's
text is its class docstring. Checks across fields come from the validators' docstrings.

tests/test_docs.py regenerates this in memory and fails when docs/spec.md differs.
"""

from __future__ import annotations

import ast
import enum
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "spec.md"
COMMAND = "python scripts/spec_reference.py --write"
if str(REPO) not in sys.path:  # run as a script from anywhere, without an install
    sys.path.insert(0, str(REPO))

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator import spec as spec_module

# Notes for fields whose Field() has no description yet, by dotted path. spec.py's own
# description replaces a note here as soon as it has one.
FALLBACK = {
    "name": "The job's name: run directories are `<runs_dir>/<name>-<UTC time>`, and the service "
            "answers to it as the model name.",
    "data.format": "auto: from the path's suffix (.parquet, .jsonl/.json, .csv, .txt/.text).",
    "data.text_column": "The column holding the texts.",
    "data.val_fraction": "Share of the texts held out for validation (the sweep's metric).",
    "data.test_fraction": "Share of the texts held out for the final evaluation.",
    "data.split_seed": "Seed of the random split.",
    "data.vocab_size": "Size of the byte-level BPE vocabulary trained on the training split "
                       "(not with model.pretrained: the checkpoint's tokenizer).",
    "model.n_layer": "Transformer blocks. Sweepable.",
    "model.lstm.n_layer": "Stacked LSTM layers. Sweepable.",
    "model.n_head": "Attention heads; must divide d_model.",
    "model.d_model": "Transformer width. Sweepable.",
    "train.optimizer": "Sweepable.",
    "train.lr": "Peak learning rate (after warm-up, then cosine decay). Sweepable.",
    "train.betas": "Adam/AdamW betas.",
    "train.warmup_steps": "Linear warm-up steps, then cosine decay; below max_steps. Sweepable.",
    "train.seed": "Seed of the model's initialization and the data order.",
    "sweep.space": "Setting (dotted path) to distribution; only the settings listed below "
                   "under *Sweepable settings*.",
    "sweep.metric": "auto: val_loss for the language model, val_accuracy for the classifier.",
    "sweep.reduction_factor": "ASHA: the share of trials (1/reduction_factor) that go on at "
                              "each rung.",
    "serve.enabled": "Deploy the winner at the end of the job.",
    "serve.host": "Address the HTTP proxy listens on.",
    "serve.port": "Port of the HTTP proxy.",
    "serve.max_prompt_tokens": "Longest prompt accepted, in tokens.",
    "serve.autoscaling.min_replicas": "Fewest replicas.",
    "serve.autoscaling.max_replicas": "Most replicas.",
    "serve.autoscaling.upscale_delay_s": "Load must stay high this long before a replica is added.",
    "serve.autoscaling.downscale_delay_s": "Load must stay low this long before a replica goes.",
    "serve.autoscaling.look_back_period_s": "The window over which Serve averages the ongoing "
                                            "requests it compares with the target: shorter "
                                            "follows load sooner, longer rides out bursts. "
                                            "Replicas push their load every 10 s, so the "
                                            "window must be longer.",
    "resources.use_gpu": "auto: when the cluster has GPUs.",
    "resources.cpus_per_worker": "CPUs reserved by each training worker.",
    "resources.gpus_per_worker": "GPUs per training worker (when GPUs are used).",
    "train.lora.dropout": "Dropout on the adapters' input. Sweepable.",
}

INTRO = """\
A job is one YAML file validated into `JobSpec` (orchestrator/spec.py), where every default
lives. `orchestrator validate JOB.yaml` prints the spec with every default filled in;
`--set a.b=value` (the value read as YAML) overrides any field on `validate`, `run` and
`submit`:

```bash
orchestrator validate jobs/quickstart.yaml --set train.lr=0.001
orchestrator validate jobs/classifier.yaml --set sweep.num_samples=8 --set serve.keep_running=true
```

A wrong spec fails before anything runs, naming the field, the value and what is allowed:

```
error: invalid job spec:
  train.lr = -1: Input should be greater than 0
```
"""


GROUP = "group:"  # field_comments' key prefix for a comment block above several fields


def field_comments(cls: type) -> dict[str, str]:
    """Comments in a class's source that describe its fields (see the module docstring): a
    field's own comment under its name, a comment block above it under GROUP + its name."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    found: dict[str, str] = {}
    group, group_end = "", 0  # the comment block above, and the last line it still covers
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            group = ""
            continue
        above = []
        line = node.lineno - 1
        while line in comments:
            above.insert(0, comments[line])
            line -= 1
        if above:
            group = " ".join(above)
        elif node.lineno != group_end + 1:
            group = ""  # a blank line (or other code) ends a comment block's reach
        group_end = node.end_lineno or node.lineno
        trailing = [comments[n] for n in range(node.lineno, group_end + 1) if n in comments]
        if isinstance(node.value, ast.Call) and any(keyword.arg == "description"
                                                    for keyword in node.value.keywords):
            group = ""  # a field that describes itself ends the block's reach
        elif trailing:
            found[node.target.id] = " ".join(trailing)
        elif group:
            found[f"{GROUP}{node.target.id}"] = group
    return found


def _alternatives(annotation: Any) -> list[Any]:
    """The types a field may hold besides None, each without its Annotated metadata."""
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return [typing.get_args(c)[0] if typing.get_origin(c) is typing.Annotated else c
            for c in candidates]


def section_class(annotation: Any) -> type[BaseModel] | None:
    """The spec section a field holds (also when it may be None or a plain value instead, as
    resources.num_workers: a number or {min, max}), or None for a plain value."""
    models = [c for c in _alternatives(annotation)
              if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if len(models) == 1 else None


def type_name(annotation: Any) -> str:
    """A YAML writer's view of a type: `int`, `"a" | "b"`, `list[str]`, `{choice: [...]}`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(_literal(value) for value in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin in (list, tuple, set, frozenset):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(type_name(arg) for arg in args) + "]"
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"map of {type_name(args[0])} to {type_name(args[1])}" if args else "map"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = annotation.model_fields
        if len(fields) == 1:  # a one-key mapping such as {choice: [...]}
            (name, info), = fields.items()
            return f"{{{name}: {type_name(info.annotation)}}}"
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(_literal(member.value) for member in annotation)
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _literal(value: Any) -> str:
    return "true" if value is True else "false" if value is False else \
        "null" if value is None else str(value)


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if isinstance(value, str):
        return f'"{value}"' if value == "" or value != value.strip() else value
    return _literal(value)


def bounds_text(info: FieldInfo) -> str:
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "at least",
             "max_length": "at most"}
    parts = []
    for item in info.metadata:
        for key, sign in signs.items():
            value = getattr(item, key, None)
            if value is not None:
                parts.append("non-empty" if (key, value) == ("min_length", 1) else
                             f"{sign} {value}" + (" items" if "length" in key else ""))
        pattern = getattr(item, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def describe(path: str, name: str, info: FieldInfo, comments: dict[str, str]) -> str:
    text = (info.description or comments.get(name) or FALLBACK.get(path)
            or comments.get(f"{GROUP}{name}", ""))
    if info.deprecated:
        reason = info.deprecated if isinstance(info.deprecated, str) else "deprecated"
        text = f"**Deprecated**: {reason}. {text}".strip()
    return " ".join(text.split())


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else ""


def cross_checks(cls: type[BaseModel]) -> list[str]:
    """The docstrings of a section's validators that span fields."""
    checks = []
    for decorator in cls.__pydantic_decorators__.model_validators.values():
        doc = inspect.getdoc(decorator.func)
        if doc:
            checks.append(" ".join(doc.split()))
    return checks


def walk(cls: type[BaseModel], prefix: str, out: list[str], undescribed: list[str]) -> None:
    """One section: its table, then its subsections, depth first."""
    comments = field_comments(cls)
    rows, subsections = [], []
    for name, info in cls.model_fields.items():
        path = f"{prefix}{name}"
        sub = section_class(info.annotation)
        if sub is not None:
            subsections.append((path, sub))
            kind = "section" + (", optional" if default_text(info) == "null" else "")
            if len(_alternatives(info.annotation)) > 1:
                kind = type_name(info.annotation)
            text = describe(path, name, info, comments) or _docstring(sub)
            rows.append((path, kind, default_text(info), "",
                         f"{text} See [{path}](#{_anchor(path)}).".strip()))
            continue
        text = describe(path, name, info, comments)
        if not text:
            undescribed.append(path)
        rows.append((path, type_name(info.annotation), default_text(info), bounds_text(info), text))
    out.append(f"## {prefix.rstrip('.') or 'top level'}\n")
    doc = _docstring(cls)
    if doc:
        out.append(doc + "\n")
    out.append("| field | type | default | allowed | description |")
    out.append("|---|---|---|---|---|")
    for path, kind, default, bounds, text in rows:
        out.append(f"| `{path}` | {cell(kind)} | {cell(default)} | {cell(bounds)} | {cell(text)} |")
    out.append("")
    checks = cross_checks(cls)
    if checks:
        out.append("Checks across fields:\n")
        out.extend(f"- {check}" for check in checks)
        out.append("")
    if prefix == "sweep.":
        out.append(_sweepable())
    for path, sub in subsections:
        walk(sub, f"{path}.", out, undescribed)


def _docstring(cls: type) -> str:
    """The class's own docstring (not one inherited from BaseModel or our base section)."""
    doc = cls.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(doc).split()) if doc else ""


def _anchor(path: str) -> str:
    return path.replace(".", "").lower()


def _sweepable() -> str:
    names = getattr(spec_module, "SWEEPABLE", ())
    if not names:
        return ""
    listed = ", ".join(f"`{name}`" for name in names)
    return ("### Sweepable settings\n\n"
            "`sweep.space` maps each of these to `{choice: [...]}`, `{grid: [...]}`, "
            "`{uniform: [low, high]}` or `{loguniform: [low, high]}` (`model.arch` and "
            f"`train.finetune`: choice or grid only):\n\n{listed}.\n")


def render() -> str:
    root = spec_module.JobSpec
    out = ["# The job spec\n",
           f"<!-- Generated from orchestrator/spec.py by `{COMMAND}`; do not edit by hand. -->\n",
           INTRO]
    sections = [name for name, info in root.model_fields.items()
                if section_class(info.annotation) is not None]
    out.append("Sections: " + ", ".join(f"[`{name}`](#{_anchor(name)})" for name in sections)
               + ".\n")
    undescribed: list[str] = []
    walk(root, "", out, undescribed)
    return "\n".join(out).rstrip() + "\n"


def undescribed_fields() -> list[str]:
    found: list[str] = []
    walk(spec_module.JobSpec, "", [], found)
    return found


def known_paths() -> set[str]:
    """Every dotted field path of JobSpec."""
    paths: set[str] = set()

    def visit(cls: type[BaseModel], prefix: str) -> None:
        for name, info in cls.model_fields.items():
            paths.add(prefix + name)
            sub = section_class(info.annotation)
            if sub is not None:
                visit(sub, f"{prefix}{name}.")

    visit(spec_module.JobSpec, "")
    return paths


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(REPO)} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if "--write" in argv:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT.relative_to(REPO)}", file=sys.stderr)
        missing = undescribed_fields()
        if missing:
            print(f"fields without a description: {', '.join(missing)}", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
