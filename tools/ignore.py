"""A pure-Python file walker with .gitignore/.ignore semantics, for when `rg` is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pathspec

IGNORE_FILES = (".gitignore", ".ignore")

Spec = tuple[Path, pathspec.GitIgnoreSpec]


def _load(directory: Path) -> list[Spec]:
    specs = []
    for name in IGNORE_FILES:
        f = directory / name
        if f.is_file():
            try:
                lines = f.read_text(errors="replace").splitlines()
            except OSError:
                continue
            specs.append((directory, pathspec.GitIgnoreSpec.from_lines(lines)))
    exclude = directory / ".git" / "info" / "exclude"
    if exclude.is_file():
        specs.append(
            (
                directory,
                pathspec.GitIgnoreSpec.from_lines(exclude.read_text(errors="replace").splitlines()),
            )
        )
    return specs


def is_ignored(path: Path, is_dir: bool, specs: list[Spec]) -> bool:
    """The deepest ignore file with an opinion decides (later lines and files override earlier)."""
    for base, spec in reversed(specs):
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:
            continue
        res = spec.check_file(rel + "/" if is_dir else rel)
        if res.include is not None:
            return bool(res.include)
    return False


def walk_files(root: Path, start: Path) -> Iterator[Path]:
    """Files under `start` (a file or directory), skipping .git and ignored paths; sorted."""
    specs: list[Spec] = []
    # Ignore files of the ancestors between the workspace root and `start` apply too.
    try:
        rel_parts = start.relative_to(root).parts
    except ValueError:
        rel_parts = ()
        root = start if start.is_dir() else start.parent
    cur = root
    specs.extend(_load(cur))
    for part in rel_parts[:-1] if start.is_file() else rel_parts:
        cur = cur / part
        specs.extend(_load(cur))
    if start.is_file():
        yield start
        return
    # Like rg, a directory named explicitly is searched even when an ignore file excludes it:
    # drop the patterns that match the start directory itself or one of its parents.
    specs = [(base, _without_patterns_matching(spec, base, start)) for base, spec in specs]
    yield from _walk(start, specs)


def _without_patterns_matching(
    spec: pathspec.GitIgnoreSpec, base: Path, start: Path
) -> pathspec.GitIgnoreSpec:
    try:
        rel = start.relative_to(base)
    except ValueError:
        return spec
    if not rel.parts:
        return spec
    dirs = ["/".join(rel.parts[: k + 1]) + "/" for k in range(len(rel.parts))]
    kept = [p for p in spec.patterns if not (p.include and any(p.match_file(d) for d in dirs))]
    return spec if len(kept) == len(spec.patterns) else pathspec.GitIgnoreSpec(kept)


def _walk(directory: Path, specs: list[Spec]) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name == ".git":
            continue
        p = Path(entry.path)
        is_dir = entry.is_dir(follow_symlinks=False)
        if is_ignored(p, is_dir, specs):
            continue
        if is_dir:
            yield from _walk(p, specs + _load(p))
        elif entry.is_file(follow_symlinks=False):
            yield p
