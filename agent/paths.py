"""Where ds4-agent keeps its files: XDG base directories, with one override.

`DS4_AGENT_HOME=/some/dir` puts everything under that one directory (config/, data/, cache/,
state/), like `CODEX_HOME`; it is also what tests use to stay out of the user's home. Without
it the XDG variables apply on every platform, macOS included (users asked for that rather
than `~/Library/...` or a dot-directory in $HOME).

Sessions are keyed by repository: the git top level when there is one, else the working
directory. The key is a readable slug plus a short hash of the absolute path, so two
checkouts named `app` never collide (a known problem of cwd-slug schemes).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

APP = "ds4-agent"


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var, "")
    # The XDG spec says relative paths are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / default


def _home_override() -> Path | None:
    value = os.environ.get("DS4_AGENT_HOME", "")
    return Path(value).expanduser().resolve() if value else None


def config_dir() -> Path:
    home = _home_override()
    return home / "config" if home else _xdg("XDG_CONFIG_HOME", ".config") / APP


def data_dir() -> Path:
    home = _home_override()
    return home / "data" if home else _xdg("XDG_DATA_HOME", ".local/share") / APP


def cache_dir() -> Path:
    home = _home_override()
    return home / "cache" if home else _xdg("XDG_CACHE_HOME", ".cache") / APP


def state_dir() -> Path:
    home = _home_override()
    return home / "state" if home else _xdg("XDG_STATE_HOME", ".local/state") / APP


def history_file() -> Path:
    """Prompt input history (one file for all repositories, like a shell's)."""
    return state_dir() / "history"


def snapshots_dir() -> Path:
    """KV snapshots: large and regenerable from transcripts, hence the cache dir."""
    return cache_dir() / "snapshots"


@dataclass(frozen=True)
class Repo:
    root: Path  # git top level, or the working directory outside git
    is_git: bool

    @property
    def key(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.root.name).strip("-") or "root"
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:10]
        return f"{slug}-{digest}"

    def sessions_dir(self) -> Path:
        return data_dir() / "sessions" / self.key


def find_repo(cwd: Path | None = None) -> Repo:
    cwd = (cwd or Path.cwd()).resolve()
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return Repo(cwd, False)
    if r.returncode == 0 and r.stdout.strip():
        return Repo(Path(r.stdout.strip()).resolve(), True)
    return Repo(cwd, False)
