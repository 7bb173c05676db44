"""Project context: instruction files (AGENTS.md, CLAUDE.md fallback) and git facts.

Instruction files go into the system prompt, which is prefilled once per repository and
snapshotted; they are read in a fixed order (global, repository root, then each directory
down to the working directory) so nearer files come last and take precedence. In each
directory AGENTS.md wins; CLAUDE.md is read only where there is no AGENTS.md.

Dynamic facts (date, branch, changed files) change between turns, so they are never part of
the system prompt: the loop appends them as a new turn when they differ from the last ones
it told the model, which keeps every earlier KV row valid.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ds4_agent.agent.paths import config_dir

INSTRUCTION_NAMES = ("AGENTS.md", "CLAUDE.md")  # first found per directory wins
MAX_INSTRUCTION_BYTES = 32 * 1024  # per file; larger files are cut with a visible marker


@dataclass
class InstructionFile:
    path: Path
    text: str
    truncated: bool = False


def _read_capped(path: Path) -> InstructionFile:
    data = path.read_bytes()
    truncated = len(data) > MAX_INSTRUCTION_BYTES
    text = data[:MAX_INSTRUCTION_BYTES].decode("utf-8", errors="replace")
    if truncated:
        text += f"\n[… {path.name} cut at {MAX_INSTRUCTION_BYTES} bytes of {len(data)}]"
    return InstructionFile(path, text, truncated)


def _pick(directory: Path) -> Path | None:
    for name in INSTRUCTION_NAMES:
        p = directory / name
        if p.is_file():
            return p
    return None


def find_instruction_files(repo_root: Path, cwd: Path | None = None) -> list[InstructionFile]:
    """Global file, then repository root down to `cwd` (nearest last)."""
    out: list[InstructionFile] = []
    glob = _pick(config_dir())
    if glob is not None:
        out.append(_read_capped(glob))
    root = repo_root.resolve()
    cwd = (cwd or Path.cwd()).resolve()
    chain = [root]
    if cwd != root and root in cwd.parents:
        rel = cwd.relative_to(root)
        for i in range(1, len(rel.parts) + 1):
            chain.append(root.joinpath(*rel.parts[:i]))
    for d in chain:
        p = _pick(d)
        if p is not None:
            out.append(_read_capped(p))
    return out


def instructions_text(files: list[InstructionFile], repo_root: Path) -> str:
    if not files:
        return ""
    parts = ["# Project instructions"]
    for f in files:
        try:
            label = str(f.path.relative_to(repo_root))
        except ValueError:
            label = f"~/{f.path.name}" if f.path.parent == config_dir() else str(f.path)
        parts.append(f"## {label}\n\n{f.text.strip()}")
    return "\n\n".join(parts)


@dataclass
class Facts:
    date: str
    branch: str | None
    changed: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"Today is {self.date}."]
        if self.branch:
            lines.append(f"Current git branch: {self.branch}.")
        if self.changed:
            shown = self.changed[:30]
            more = len(self.changed) - len(shown)
            lines.append("Files changed in the working tree: " + ", ".join(shown))
            if more:
                lines[-1] += f" (and {more} more)"
        return " ".join(lines)


def _git(repo_root: Path, *args: str) -> str | None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_PAGER": "cat", "PAGER": "cat"}
    try:
        r = subprocess.run(
            ["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def current_branch(repo_root: Path) -> str | None:
    out = _git(repo_root, "rev-parse", "--abbrev-ref", "HEAD")
    if out is None:
        return None
    b = out.strip()
    return None if b in ("", "HEAD") else b


def collect_facts(repo_root: Path, now: float | None = None) -> Facts:
    date = time.strftime("%Y-%m-%d", time.localtime(now))
    status = _git(repo_root, "status", "--porcelain=v1", "--untracked-files=normal")
    changed = [line[3:] for line in (status or "").splitlines() if len(line) > 3]
    return Facts(date=date, branch=current_branch(repo_root), changed=changed)
