"""What a tool implementation gets: long-lived services (ToolEnv) and per-call context (ToolContext)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .journal import UndoJournal
from .workspace import Workspace

if TYPE_CHECKING:
    from .jobs import JobManager
    from .permissions import PermissionDecision, ToolCall


@dataclass
class Limits:
    """Output and size limits, tunable from the data file's "limits" table."""

    read_default_lines: int = 2000
    read_max_line_chars: int = 2000
    read_max_bytes: int = 16 * 1024 * 1024
    read_max_chars: int = 100_000  # one Read result; beyond this the model pages with offset
    output_max_chars: int = 30000  # per tool result; beyond this, head + tail with a marker
    grep_default_head: int = 250
    glob_max_results: int = 500
    ls_max_entries: int = 1000
    bash_default_timeout_ms: int = 120_000
    bash_max_timeout_ms: int = 600_000
    bash_kill_grace_s: float = 1.0
    result_max_chars: int = 200_000  # last-resort cap on any tool result (head + tail kept)


@dataclass
class ToolEnv:
    workspace: Workspace
    journal: UndoJournal
    jobs: JobManager
    limits: Limits


@dataclass
class ToolContext:
    """Per-call state from the agent loop.

    `turn` groups writes in the undo journal. `cancel` is set by the agent's Ctrl+C/Esc and stops
    a running command. `approve` answers an "ask" decision (the UI); None means headless: asks
    become denials. Denials are appended to `denials` so headless runs can report them.
    """

    turn: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    approve: Callable[[ToolCall, PermissionDecision], bool] | None = None
    denials: list[dict[str, Any]] = field(default_factory=list)
