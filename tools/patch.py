"""apply_patch: several files changed in one all-or-nothing call, in the V4A patch format.

    *** Begin Patch
    *** Add File: path          every following line starts with "+"
    *** Delete File: path
    *** Update File: path
    *** Move to: new/path       optional, right after Update File
    @@ optional anchor line     chunks of " " context, "-" removed and "+" added lines
    *** End of File             optional: the chunk above must end at the end of the file
    *** End Patch

Every hunk is located and every file computed in memory before anything is written; if any
part fails, no file changes. Chunks are matched exactly first, then ignoring trailing
whitespace, then ignoring surrounding whitespace, and the result says when a fallback was used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ds4_agent.engine.atomic_io import atomic_write_bytes

from .context import ToolContext, ToolEnv
from .files import Args
from .result import ToolError, ToolResult
from .textutil import looks_binary

BEGIN, END = "*** Begin Patch", "*** End Patch"
ADD, DELETE, UPDATE, MOVE, EOF_MARK = (
    "*** Add File: ",
    "*** Delete File: ",
    "*** Update File: ",
    "*** Move to: ",
    "*** End of File",
)


class ApplyPatchArgs(Args):
    patch: str


@dataclass
class Chunk:
    anchor: str | None
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    at_eof: bool = False
    # For each new line: the index of the old (context) line it repeats, or -1 when added.
    # A fuzzy match then keeps the file's own version of context lines.
    new_src: list[int] = field(default_factory=list)


@dataclass
class FileOp:
    kind: str  # "add" | "delete" | "update"
    path: str
    move_to: str | None = None
    content: list[str] = field(default_factory=list)  # for add
    chunks: list[Chunk] = field(default_factory=list)  # for update


def _err(line_no: int, msg: str) -> ToolError:
    return ToolError(f"apply_patch: line {line_no}: {msg}")


def parse_patch(text: str) -> list[FileOp]:
    lines = text.replace("\r\n", "\n").strip().split("\n")
    lines = [ln.rstrip() if ln.strip().startswith("***") else ln for ln in lines]
    if not lines or lines[0].strip() != BEGIN:
        raise ToolError(
            f"apply_patch: the patch must start with '{BEGIN}'; wrap the file sections in '{BEGIN}' ... '{END}'"
        )
    if lines[-1].strip() != END:
        raise ToolError(f"apply_patch: the patch must end with '{END}'; add it as the last line")
    ops: list[FileOp] = []
    i = 1
    n = len(lines) - 1
    while i < n:
        line = (
            lines[i].strip()
            if lines[i].startswith("***") or lines[i].strip().startswith("***")
            else lines[i]
        )
        if line.startswith(ADD):
            op = FileOp("add", line[len(ADD) :].strip())
            i += 1
            while i < n and not lines[i].lstrip().startswith("*** "):
                if not lines[i].startswith("+"):
                    raise _err(
                        i + 1,
                        f"lines of an added file must start with '+' (got {lines[i][:40]!r}); prefix every line with '+'",
                    )
                op.content.append(lines[i][1:])
                i += 1
            ops.append(op)
        elif line.startswith(DELETE):
            ops.append(FileOp("delete", line[len(DELETE) :].strip()))
            i += 1
        elif line.startswith(UPDATE):
            op = FileOp("update", line[len(UPDATE) :].strip())
            i += 1
            if i < n and lines[i].strip().startswith(MOVE):
                op.move_to = lines[i].strip()[len(MOVE) :].strip()
                i += 1
            chunk: Chunk | None = None
            while i < n and not (
                lines[i].lstrip().startswith("*** ") and not lines[i].lstrip().startswith(EOF_MARK)
            ):
                ln = lines[i]
                if ln.strip() == EOF_MARK:
                    if chunk is None:
                        raise _err(
                            i + 1,
                            f"'{EOF_MARK}' must follow a hunk; put it after the last changed line",
                        )
                    chunk.at_eof = True
                elif ln.startswith("@@"):
                    chunk = Chunk(anchor=ln[2:].strip() or None)
                    op.chunks.append(chunk)
                else:
                    if chunk is None:
                        chunk = Chunk(anchor=None)
                        op.chunks.append(chunk)
                    tag, body = (ln[:1], ln[1:]) if ln else (" ", "")
                    if tag == " ":
                        chunk.new_src.append(len(chunk.old))
                        chunk.old.append(body)
                        chunk.new.append(body)
                    elif tag == "-":
                        chunk.old.append(body)
                    elif tag == "+":
                        chunk.new_src.append(-1)
                        chunk.new.append(body)
                    else:
                        raise _err(
                            i + 1,
                            f"hunk lines must start with ' ', '-' or '+' (got {ln[:40]!r}); fix the prefix",
                        )
                i += 1
            if not op.chunks or all(not c.old and not c.new for c in op.chunks):
                raise _err(
                    i,
                    f"'Update File: {op.path}' has no hunks; add @@ hunks with the lines to change",
                )
            ops.append(op)
        elif not line.strip():
            i += 1
        else:
            raise _err(
                i + 1,
                f"expected '*** Add File:', '*** Update File:' or '*** Delete File:', got {line[:60]!r}; fix the section header",
            )
    if not ops:
        raise ToolError(
            "apply_patch: the patch has no file sections; add '*** Update File: path' with hunks"
        )
    return ops


def _find(lines: list[str], pattern: list[str], start: int, at_eof: bool) -> tuple[int, str]:
    """Index where `pattern` occurs in `lines` at or after `start`, and how it matched."""
    if not pattern:
        return (len(lines), "exact") if at_eof else (start, "exact")
    for how, norm in (
        ("exact", lambda s: s),
        ("ignoring trailing whitespace", str.rstrip),
        ("ignoring surrounding whitespace", str.strip),
    ):
        target = [norm(p) for p in pattern]
        candidates = (
            [len(lines) - len(pattern)] if at_eof else range(start, len(lines) - len(pattern) + 1)
        )
        for k in candidates:
            if k >= start and [norm(x) for x in lines[k : k + len(pattern)]] == target:
                return k, how
    return -1, ""


def apply_chunks(text: str, chunks: list[Chunk], path: str) -> tuple[str, list[str]]:
    crlf = "\r\n" in text
    body = text.replace("\r\n", "\n")
    final_nl = body.endswith("\n")
    lines = body.split("\n")
    if final_nl:
        lines.pop()
    notes: list[str] = []
    pos = 0
    out: list[str] = []
    for n, ch in enumerate(chunks, 1):
        if ch.anchor is not None:
            k, _ = _find(lines, [ch.anchor], pos, False)
            if k < 0:
                raise ToolError(
                    f"apply_patch: {path}: hunk {n}: anchor line '@@ {ch.anchor[:60]}' not found; Read the file and use a line that exists"
                )
            out.extend(lines[pos : k + 1])
            pos = k + 1
        k, how = _find(lines, ch.old, pos, ch.at_eof)
        if k < 0:
            first = next((x for x in ch.old if x.strip()), "")
            raise ToolError(
                f"apply_patch: {path}: hunk {n}: its context/removed lines were not found (starting {first[:60]!r}); Read the file and copy the lines exactly"
            )
        if how != "exact":
            notes.append(f"hunk {n} matched {how}")
        out.extend(lines[pos:k])
        out.extend(
            lines[k + src] if src >= 0 else text
            for text, src in zip(ch.new, ch.new_src, strict=True)
        )
        pos = k + len(ch.old)
    out.extend(lines[pos:])
    result = "\n".join(out) + ("\n" if final_nl and out else "")
    if crlf:
        result = result.replace("\n", "\r\n")
    return result, notes


def patch_paths(patch: str) -> list[str]:
    """Every path a patch touches (for permission checks); [] when it does not parse."""
    try:
        ops = parse_patch(patch)
    except ToolError:
        return []
    out = []
    for op in ops:
        out.append(op.path)
        if op.move_to:
            out.append(op.move_to)
    return out


def tool_apply_patch(args: ApplyPatchArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    ws = env.workspace
    ops = parse_patch(args.patch)
    # Phase 1: compute every file's new content; nothing is written yet.
    plan: dict[Path, tuple[bytes | None, bytes | None]] = {}  # path -> (before, after)
    summary: list[str] = []
    for op in ops:
        path = ws.resolve(op.path, for_write=True)
        shown = ws.display(path)
        current = plan[path][1] if path in plan else (path.read_bytes() if path.is_file() else None)
        if path.is_dir():
            raise ToolError(f"apply_patch: {op.path} is a directory; patch files only")
        if op.kind == "add":
            if current is not None:
                raise ToolError(
                    f"apply_patch: cannot add {shown}: it already exists; use '*** Update File:' to change it"
                )
            data = ("\n".join(op.content) + "\n").encode() if op.content else b""
            plan[path] = (plan[path][0] if path in plan else None, data)
            summary.append(f"A {shown}")
            continue
        if current is None:
            raise ToolError(
                f"apply_patch: {shown} does not exist; check the path, or use '*** Add File:' to create it"
            )
        if path not in plan and path in ws.read_state:
            ws.check_fresh(path, current, "apply_patch")
        if op.kind == "delete":
            plan[path] = (plan[path][0] if path in plan else current, None)
            summary.append(f"D {shown}")
            continue
        if looks_binary(current):
            raise ToolError(f"apply_patch: {shown} is a binary file; patch text files only")
        try:
            text = current.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(
                f"apply_patch: {shown} is not valid UTF-8; change it with Bash instead"
            ) from None
        new_text, notes = apply_chunks(text, op.chunks, shown)
        before = plan[path][0] if path in plan else current
        if op.move_to:
            dest = ws.resolve(op.move_to, for_write=True)
            if dest.exists() and dest not in plan:
                raise ToolError(
                    f"apply_patch: cannot move {shown} to {op.move_to}: the target exists; pick a new path"
                )
            plan[path] = (before, None)
            plan[dest] = (None, new_text.encode())
            summary.append(
                f"R {shown} -> {ws.display(dest)}" + (f" ({'; '.join(notes)})" if notes else "")
            )
        else:
            plan[path] = (before, new_text.encode())
            summary.append(f"M {shown}" + (f" ({'; '.join(notes)})" if notes else ""))
    # Phase 2: write; if the disk fails half-way, put back what was already written.
    done: list[tuple[Path, bytes | None]] = []
    try:
        for path, (before, after) in plan.items():
            if after is None:
                if path.exists():
                    path.unlink()
            else:
                atomic_write_bytes(path, after)
            done.append((path, before))
    except OSError as e:
        for path, before in reversed(done):
            if before is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, before)
        raise ToolError(
            f"apply_patch: writing failed ({e.strerror}: {e.filename}); no files were changed, fix the problem and retry"
        ) from None
    for path, (before, after) in plan.items():
        env.journal.record(ctx.turn, path, before, after, "apply_patch")
        if after is not None:
            ws.note_read(path, after)
        else:
            ws.forget(path)
    return ToolResult(
        "Applied patch:\n" + "\n".join(summary), display={"kind": "patch", "files": summary}
    )
