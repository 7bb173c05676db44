"""Shared helpers for the tools tests: a registry on a temporary workspace, git fixture repos."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ds4_agent.tools.context import ToolContext
from ds4_agent.tools.permissions import PermissionPolicy
from ds4_agent.tools.registry import ToolRegistry
from ds4_agent.tools.result import ToolResult


class Harness:
    """A registry in full-auto mode (permissions are tested separately) plus a call shortcut."""

    def __init__(self, root: Path, mode: str = "full-auto", **policy_kw) -> None:
        self.root = Path(os.path.realpath(root))
        policy = PermissionPolicy.from_rules(mode, root=self.root, **policy_kw)
        self.reg = ToolRegistry.from_data(self.root, policy=policy)
        self.ctx = ToolContext()

    def __call__(self, name: str, **args) -> ToolResult:
        return self.reg.call(name, args, self.ctx)

    def ok(self, name: str, **args) -> str:
        res = self(name, **args)
        assert not res.is_error, res.text
        return res.text

    def err(self, name: str, **args) -> str:
        res = self(name, **args)
        assert res.is_error, res.text
        assert_one_line_error(res.text)
        return res.text

    def write_file(self, rel: str, data: bytes | str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def close(self) -> None:
        self.reg.close()


def assert_one_line_error(text: str) -> None:
    """Tool errors: the first line is self-contained and says what to do next (after a ';')."""
    first = text.split("\n", 1)[0]
    assert first.strip(), text
    assert "; " in first, f"error does not name a next step: {first!r}"


def git(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    return subprocess.run(
        ["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True
    ).stdout


def init_repo(root: Path) -> None:
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "Test")
    git(root, "config", "commit.gpgsign", "false")


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    out = subprocess.run(
        ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
    ).stdout.strip()
    return bool(out) and not out.startswith("Z")
