"""What a tool call returns, and the one exception tools raise internally."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolResult:
    """The outcome of one tool call.

    `text` is exactly what the model sees. `display` is optional structured data for the UI
    (a diff, an exit code, a job id); the model never sees it.
    """

    text: str
    is_error: bool = False
    display: dict[str, Any] | None = None

    @classmethod
    def error(cls, message: str, display: dict[str, Any] | None = None) -> ToolResult:
        return cls(text=message, is_error=True, display=display)


class ToolError(Exception):
    """A failure the model can act on.

    The message is one line that says what went wrong and what to do next. Optional `detail`
    (for example the closest match of a failed edit) is appended below that line.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        if "\n" in message:
            raise ValueError("ToolError message must be a single line; put extra text in detail")
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_result(self) -> ToolResult:
        text = self.message if not self.detail else f"{self.message}\n{self.detail}"
        return ToolResult.error(text)


@dataclass
class FileChange:
    """One file write, as recorded by the undo journal (None = the file did not exist)."""

    path: str
    before: bytes | None
    after: bytes | None
    tool: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
