"""Edit and MultiEdit: exact old→new replacement with freshness guards; all-or-nothing."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from ds4_agent.engine.atomic_io import atomic_write_bytes
from pydantic import Field

from .context import ToolContext, ToolEnv
from .files import Args, missing_file_error
from .match import plan_edit
from .result import ToolError, ToolResult
from .textutil import looks_binary

BOM = "\ufeff"


class EditArgs(Args):
    file_path: str
    old_string: str
    new_string: str
    replace_all: bool = False


class EditOp(Args):
    old_string: str
    new_string: str
    replace_all: bool = False


class MultiEditArgs(Args):
    file_path: str
    edits: list[EditOp] = Field(min_length=1)


def load_for_edit(env: ToolEnv, raw: str, tool: str) -> tuple[Path, bytes | None, str]:
    """The resolved path, its bytes (None when missing) and its text (BOM removed)."""
    path = env.workspace.resolve(raw, for_write=True)
    if path.is_dir():
        raise ToolError(f"{tool}: {raw} is a directory; give a file path")
    if not path.exists():
        return path, None, ""
    data = path.read_bytes()
    if looks_binary(data):
        raise ToolError(f"{tool}: {raw} is a binary file; {tool} changes text files only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ToolError(
            f"{tool}: {raw} is not valid UTF-8 (bad byte at offset {e.start}); {tool} works on UTF-8 text only, change it with Bash instead"
        ) from None
    env.workspace.check_fresh(path, data, tool)
    return path, data, text


def _encode(text: str, had_bom: bool) -> bytes:
    return ((BOM if had_bom else "") + text).encode("utf-8")


def _snippet(text: str, first_line: int, last_line: int, context: int = 4, cap: int = 40) -> str:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lo = max(1, first_line - context)
    hi = min(len(lines), last_line + context)
    if hi - lo + 1 > cap:
        hi = lo + cap - 1
    body = "\n".join(f"{k:>6}\t{lines[k - 1].rstrip(chr(13))}" for k in range(lo, hi + 1))
    return f"Lines {lo}-{hi} now read:\n{body}" if body else "The file is now empty."


def _commit(
    env: ToolEnv,
    ctx: ToolContext,
    path: Path,
    before: bytes | None,
    new_text: str,
    had_bom: bool,
    tool: str,
) -> bytes:
    after = _encode(new_text, had_bom)
    atomic_write_bytes(path, after)
    env.journal.record(ctx.turn, path, before, after, tool)
    env.workspace.note_read(path, after)
    return after


def _diff(path: str, before: str, after: str) -> str:
    """Unified diff for the UI. Only the changed middle goes through difflib (which is slow on
    big files); the common head and tail are skipped and the hunk line numbers shifted back."""
    a = before.splitlines(keepends=True)
    b = after.splitlines(keepends=True)
    m = min(len(a), len(b))
    p = 0
    while p < m and a[p] == b[p]:
        p += 1
    q = 0
    while q < m - p and a[-1 - q] == b[-1 - q]:
        q += 1
    lo = max(0, p - 3)
    keep_tail = max(0, q - 3)
    diff = difflib.unified_diff(
        a[lo : len(a) - keep_tail], b[lo : len(b) - keep_tail], f"a/{path}", f"b/{path}"
    )

    def shift(m: re.Match[str]) -> str:
        l1, c1, l2, c2 = m.group(1), m.group(2) or "", m.group(3), m.group(4) or ""
        return f"@@ -{int(l1) + lo if int(l1) else 0}{c1} +{int(l2) + lo if int(l2) else 0}{c2} @@"

    return "".join(_HUNK.sub(shift, line) if line.startswith("@@") else line for line in diff)


_HUNK = re.compile(r"^@@ -(\d+)(,\d+)? \+(\d+)(,\d+)? @@")


def _apply_ops(text: str, ops: list[EditOp], tool: str) -> tuple[str, list[str], tuple[int, int]]:
    """Apply ops in order to `text` in memory; returns new text, notes and the changed line range."""
    notes: list[str] = []
    first, last = 10**9, 0
    for n, op in enumerate(ops, 1):
        where = "" if len(ops) == 1 else f"edit {n} of {len(ops)}: "
        if op.old_string == "" and text == "":
            text = op.new_string
            first, last = 1, max(1, text.count("\n"))
            continue
        try:
            plan = plan_edit(text, op.old_string, op.new_string, op.replace_all)
        except ToolError as e:
            nothing = " (no edits were written)" if len(ops) > 1 else ""
            raise ToolError(f"{tool}: {where}{e.message}{nothing}", e.detail) from None
        new_text = plan.apply(text)
        # Line range of the replaced text in the new content (for the snippet).
        shift = 0
        for (s, e), rep in zip(plan.spans, plan.replacements, strict=True):
            start = s + shift
            a = new_text.count("\n", 0, start) + 1
            b = a + rep.count("\n")
            first, last = min(first, a), max(last, b)
            shift += len(rep) - (e - s)
        count = len(plan.spans)
        note = f"{where}replaced {count} occurrence{'s' if count != 1 else ''}"
        if plan.strategy != "exact":
            note += f" ({plan.strategy})"
        notes.append(note)
        text = new_text
    return text, notes, (first, last)


def _run(env: ToolEnv, ctx: ToolContext, raw: str, ops: list[EditOp], tool: str) -> ToolResult:
    path, before, text = load_for_edit(env, raw, tool)
    shown = env.workspace.display(path)
    if before is None:
        if ops[0].old_string != "":
            raise missing_file_error(env, path, raw, tool)
        text = ""
    elif ops[0].old_string == "" and text != "":
        raise ToolError(
            f"{tool}: old_string is empty but {shown} is not; quote the exact text to replace, or use Write to replace the whole file"
        )
    had_bom = text.startswith(BOM)
    body = text[1:] if had_bom else text
    new_body, notes, (first, last) = _apply_ops(body, ops, tool)
    _commit(env, ctx, path, before, new_body, had_bom, tool)
    verb = "Created" if before is None else "Edited"
    head = f"{verb} {shown}: " + "; ".join(notes) if notes else f"{verb} {shown}"
    return ToolResult(
        f"{head}\n{_snippet(new_body, first, last)}",
        display={"kind": "diff", "path": shown, "diff": _diff(shown, body, new_body)},
    )


def tool_edit(args: EditArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    op = EditOp(
        old_string=args.old_string, new_string=args.new_string, replace_all=args.replace_all
    )
    return _run(env, ctx, args.file_path, [op], "Edit")


def tool_multiedit(args: MultiEditArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    return _run(env, ctx, args.file_path, list(args.edits), "MultiEdit")
