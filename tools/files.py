"""Read, Write and LS."""

from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path

from ds4_agent.engine.atomic_io import atomic_write_bytes
from pydantic import BaseModel, ConfigDict, Field

from .context import ToolContext, ToolEnv
from .result import ToolError, ToolResult
from .textutil import IMAGE_SUFFIXES, decode_text, fit_lines, looks_binary, number_lines


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadArgs(Args):
    file_path: str
    offset: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)


class WriteArgs(Args):
    file_path: str
    content: str


class LSArgs(Args):
    path: str = "."
    ignore: list[str] | None = None


def missing_file_error(env: ToolEnv, path: Path, raw: str, tool: str) -> ToolError:
    """File-not-found, with the closest names in the same directory when there are any."""
    hint = ""
    parent = path.parent
    if parent.is_dir():
        try:
            names = os.listdir(parent)
        except OSError:
            names = []
        close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
        if close:
            shown = ", ".join(env.workspace.display(parent / c) for c in close)
            hint = f" (similar: {shown})"
    return ToolError(f"{tool}: file not found: {raw}{hint}; check the path with Glob or LS")


def read_file_bytes(env: ToolEnv, raw: str, tool: str) -> tuple[Path, bytes]:
    path = env.workspace.resolve(raw)
    if path.is_dir():
        raise ToolError(f"{tool}: {raw} is a directory; use LS to list it or Glob to find files")
    if not path.exists():
        raise missing_file_error(env, path, raw, tool)
    size = path.stat().st_size
    cap = env.limits.read_max_bytes
    if size > cap:
        raise ToolError(
            f"{tool}: {raw} is {size} bytes, over the {cap}-byte limit; use Grep to find the part you need, "
            f"or Bash (e.g. sed -n '100,200p') to print a range"
        )
    return path, path.read_bytes()


def tool_read(args: ReadArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    ws = env.workspace
    path = ws.resolve(args.file_path)
    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        raise ToolError(
            f"Read: {args.file_path} is an image/PDF ({path.stat().st_size} bytes) and this model has no image "
            f"input; inspect it with Bash (e.g. `file {args.file_path}`) or ask the user to describe it"
        )
    if (
        path.is_file()
        and path.stat().st_size > env.limits.read_max_bytes
        and (args.offset or args.limit)
    ):
        return _read_large(args, env, path)
    path, data = read_file_bytes(env, args.file_path, "Read")
    if looks_binary(data):
        raise ToolError(
            f"Read: {args.file_path} is a binary file ({len(data)} bytes); Read shows text only, "
            f"use Bash (e.g. `xxd {args.file_path} | head`) to inspect it"
        )
    ws.note_read(path, data)
    text, note = decode_text(data)
    notes = [note] if note else []
    if not text:
        return ToolResult(f"[{ws.display(path)} exists and is empty]")
    crlf = "\r\n" in text
    if crlf:
        notes.append(
            "file uses CRLF line endings (not shown); Edit and Write keep them, so write plain newlines"
        )
    lines = text.split("\n")
    no_final_newline = lines[-1] != ""
    if not no_final_newline:
        lines.pop()
    if crlf:
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    total = len(lines)
    start = args.offset or 1
    if start > total:
        raise ToolError(
            f"Read: offset {start} is past the end of {args.file_path}, which has {total} lines; use an offset from 1 to {total}"
        )
    limit = args.limit or env.limits.read_default_lines
    end = min(total, start + limit - 1)
    end = fit_lines(lines, start, end, env.limits.read_max_line_chars, env.limits.read_max_chars)
    body = number_lines(lines[start - 1 : end], start, env.limits.read_max_line_chars)
    if end < total or start > 1:
        more = f"; Read with offset={end + 1} to continue" if end < total else ""
        cut = " (output size cap)" if end < min(total, start + limit - 1) else ""
        notes.append(f"showing lines {start}-{end} of {total}{cut}{more}")
    if end == total and no_final_newline:
        notes.append("no newline at end of file")
    trailer = "".join(f"\n[{n}]" for n in notes)
    return ToolResult(
        body + trailer,
        display={"kind": "read", "path": ws.display(path), "lines": [start, end], "total": total},
    )


def _read_large(args: ReadArgs, env: ToolEnv, path: Path) -> ToolResult:
    """A line range of a file over the size cap, streamed so memory stays small."""
    with open(path, "rb") as f:
        if looks_binary(f.read(8192)):
            raise ToolError(
                f"Read: {args.file_path} is a binary file; Read shows text only, use Bash (e.g. `xxd | head`) to inspect it"
            )
        f.seek(0)
        start = args.offset or 1
        limit = args.limit or env.limits.read_default_lines
        end = start + limit - 1
        picked: list[str] = []
        total = 0
        for total, raw in enumerate(f, 1):  # noqa: B007 - total is the line count afterwards
            if start <= total <= end:
                picked.append(raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r"))
    if start > total:
        raise ToolError(
            f"Read: offset {start} is past the end of {args.file_path}, which has {total} lines; use an offset from 1 to {total}"
        )
    keep = fit_lines(
        picked, 1, len(picked), env.limits.read_max_line_chars, env.limits.read_max_chars
    )
    picked = picked[:keep]
    last = start + len(picked) - 1
    body = number_lines(picked, start, env.limits.read_max_line_chars)
    more = f"; Read with offset={last + 1} to continue" if last < total else ""
    note = f"\n[showing lines {start}-{last} of {total}{more}; the file is {path.stat().st_size} bytes, too large to edit]"
    return ToolResult(body + note)


def _all_crlf(data: bytes) -> bool:
    n = data.count(b"\n")
    return n > 0 and data.count(b"\r\n") == n


def tool_write(args: WriteArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    ws = env.workspace
    path = ws.resolve(args.file_path, for_write=True)
    if path.is_dir():
        raise ToolError(f"Write: {args.file_path} is a directory; give a file path")
    before: bytes | None = None
    if path.exists():
        before = path.read_bytes()
        ws.check_fresh(path, before, "Write")
    content = args.content
    note = ""
    if before is not None and _all_crlf(before) and "\r" not in content and "\n" in content:
        # A CRLF file rewritten from LF text would change every line in the diff.
        content = content.replace("\n", "\r\n")
        note = "; kept the file's CRLF line endings"
    after = content.encode("utf-8")
    atomic_write_bytes(path, after)
    env.journal.record(ctx.turn, path, before, after, "Write")
    ws.note_read(path, after)
    n_lines = args.content.count("\n") + (
        0 if args.content.endswith("\n") or not args.content else 1
    )
    verb = "Created" if before is None else "Overwrote"
    return ToolResult(
        f"{verb} {ws.display(path)} ({n_lines} lines, {len(after)} bytes{note})",
        display={"kind": "write", "path": ws.display(path), "created": before is None},
    )


def tool_ls(args: LSArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    import pathspec

    ws = env.workspace
    path = ws.resolve(args.path)
    if not path.exists():
        raise missing_file_error(env, path, args.path, "LS")
    if not path.is_dir():
        raise ToolError(f"LS: {args.path} is a file, not a directory; use Read to see its content")
    spec = pathspec.GitIgnoreSpec.from_lines(args.ignore or [])
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.name == ".git" or spec.match_file(entry.name):
                continue
            entries.append(entry)
    entries.sort(key=lambda e: (not e.is_dir(follow_symlinks=False), e.name))
    cap = env.limits.ls_max_entries
    lines = []
    for entry in entries[:cap]:
        if entry.is_symlink():
            try:
                target = os.readlink(entry.path)
            except OSError:
                target = "?"
            lines.append(f"{entry.name}@ -> {target}")
        elif entry.is_dir(follow_symlinks=False):
            lines.append(f"{entry.name}/")
        else:
            try:
                st = entry.stat(follow_symlinks=False)
                size = st.st_size
                exe = "*" if st.st_mode & stat.S_IXUSR else ""
            except OSError:
                size, exe = 0, ""
            lines.append(f"{entry.name}{exe}  ({size} bytes)")
    header = f"{ws.display(path)}/ ({len(entries)} entries)"
    if not entries:
        header = f"{ws.display(path)}/ is empty"
    if len(entries) > cap:
        lines.append(
            f"[... {len(entries) - cap} more entries not shown; use Glob with a pattern to narrow down]"
        )
    return ToolResult("\n".join([header, *lines]))
