"""Decoding, line numbering and honest truncation of text shown to the model."""

from __future__ import annotations

import re

IMAGE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".bmp",
    ".ico",
    ".tif",
    ".tiff",
    ".heic",
    ".svgz",
    ".pdf",
}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def looks_binary(data: bytes) -> bool:
    """NUL bytes in the first 8 KiB mean binary (git and ripgrep use the same test)."""
    return b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff"))


def decode_text(data: bytes) -> tuple[str, str | None]:
    """Decode file bytes; the second value is a note for the model when it was not plain UTF-8."""
    if data.startswith(b"\xef\xbb\xbf"):
        try:
            return data[3:].decode("utf-8"), "file starts with a UTF-8 byte-order mark (not shown)"
        except UnicodeDecodeError:
            pass
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode(
                "utf-16"
            ), "file is UTF-16 encoded; Edit and Write work on UTF-8 files only"
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return (
            data.decode("utf-8", errors="replace"),
            f"file is not valid UTF-8 (first bad byte at offset {e.start}); undecodable bytes are shown as U+FFFD",
        )


def number_lines(lines: list[str], start: int, max_chars: int) -> str:
    """`cat -n` style: right-aligned 1-based numbers, a tab, the line; long lines cut with a marker."""
    out = []
    for i, line in enumerate(lines, start):
        if len(line) > max_chars:
            line = f"{line[:max_chars]}… [line cut: {len(line) - max_chars} more chars]"
        out.append(f"{i:>6}\t{line}")
    return "\n".join(out)


def fit_lines(lines: list[str], start: int, end: int, max_line_chars: int, max_chars: int) -> int:
    """The last line number (1-based, <= end) whose numbered rendering keeps the output under max_chars."""
    used = 0
    for n in range(start, end + 1):
        used += min(len(lines[n - 1]), max_line_chars + 40) + 8
        if used > max_chars and n > start:
            return n - 1
    return end


def head_tail(
    text: str, max_chars: int, saved_to: str | None = None, what: str = "output"
) -> tuple[str, bool]:
    """Keep the head and tail of `text` within `max_chars`, with an explicit marker in the middle."""
    if len(text) <= max_chars:
        return text, False
    head_n = max_chars // 2
    tail_n = max_chars - head_n
    head = text[:head_n]
    tail = text[-tail_n:]
    # Cut at line boundaries so no half line reads as a whole one.
    if "\n" in head:
        head = head[: head.rfind("\n") + 1]
    if "\n" in tail:
        tail = tail[tail.find("\n") + 1 :]
    omitted = text[len(head) : len(text) - len(tail)]
    marker = (
        f"\n[... {what} truncated: {omitted.count(chr(10))} lines ({len(omitted)} chars) omitted "
        f"of {text.count(chr(10)) + 1} lines ({len(text)} chars)"
    )
    if saved_to:
        marker += f"; full {what} saved to {saved_to}, Read it with offset/limit or Grep it"
    marker += " ...]\n"
    return head + marker + tail, True
