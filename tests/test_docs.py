"""The documentation stays true: docs/spec.md is what scripts/spec_reference.py generates from
the spec, the README's commands parse with the current CLI, relative links resolve, and nothing
in the repository points outside it."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO

# Linked before the file it names is written; each entry is dropped once the file exists.
PENDING_LINKS = {"docs/architecture.md"}


def _spec_reference() -> ModuleType:
    path = REPO / "scripts" / "spec_reference.py"
    spec = importlib.util.spec_from_file_location("spec_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_spec_reference_is_current() -> None:
    reference = _spec_reference()
    written = (REPO / "docs" / "spec.md").read_text()
    assert written == reference.render(), (
        f"docs/spec.md is stale: regenerate it with `{reference.COMMAND}`")


def test_the_spec_reference_covers_every_field_and_only_real_ones() -> None:
    """Every field of JobSpec has a row; every fallback note names a field that exists."""
    reference = _spec_reference()
    rendered = reference.render()
    paths = reference.known_paths()
    missing = [path for path in paths if f"| `{path}` |" not in rendered]
    assert not missing, f"fields without a row in docs/spec.md: {missing}"
    stale = sorted(set(reference.FALLBACK) - paths)
    assert not stale, (f"scripts/spec_reference.py FALLBACK describes fields the spec no longer "
                       f"has: {stale}")


def _tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in listed.decode().split("\0") if name]


def test_nothing_in_the_repository_points_outside_it() -> None:
    """A clone holds everything it refers to: no tracked file but CI's names the shared folder
    beside the checkout (the needle below)."""
    needle = ".." + "/shared"  # spelled in two pieces so that this file does not match itself
    offenders = []
    for path in _tracked_files():
        relative = path.relative_to(REPO)
        if relative.parts[0] == ".ci" or not path.is_file():
            continue
        if needle.encode() in path.read_bytes():
            offenders.append(str(relative))
    assert not offenders, f"files pointing at {needle}: {offenders}"


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for doc in _markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            file = (doc.parent / target.split("#", 1)[0]).resolve()
            name = file.relative_to(REPO).as_posix() if file.is_relative_to(REPO) else str(file)
            if not file.exists() and name not in PENDING_LINKS:
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def _readme_commands() -> list[str]:
    """The command lines in README.md's bash blocks (comments dropped, continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def test_the_readme_commands_are_real() -> None:
    """Every `orchestrator ...` line parses with the current CLI, every script it runs exists
    and is executable, and every `python -m MODULE` names a module that exists."""
    from orchestrator.cli import _parser

    commands = _readme_commands()
    assert "scripts/quickstart" in commands and "scripts/test" in commands
    for command in commands:
        words = shlex.split(command)
        if words[0] == "orchestrator":
            try:
                _parser().parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"README.md: `{command}` does not parse with the current CLI")
        elif words[0].startswith("scripts/"):
            script = REPO / words[0]
            assert script.is_file() and script.stat().st_mode & 0o111, command
        elif words[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(words[2]) is not None, command
        else:
            assert words[0] in ("ray", "curl"), f"README.md: `{command}` is not checked here"


def test_the_readme_validate_commands_pass() -> None:
    """`orchestrator validate` lines run for real (they need no Ray)."""
    for command in _readme_commands():
        words = shlex.split(command)
        if words[:2] == ["orchestrator", "validate"]:
            done = subprocess.run([sys.executable, "-m", "orchestrator", *words[1:], "--quiet"],
                                  cwd=REPO, capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"`{command}`: {done.stderr}"
