"""Grep and Glob with ripgrep semantics (.gitignore respected), via `rg` or a Python fallback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Literal

import pathspec
from pydantic import ConfigDict, Field

from .context import ToolContext, ToolEnv
from .files import Args, missing_file_error
from .ignore import walk_files
from .result import ToolError, ToolResult
from .textutil import looks_binary

SEARCH_TIMEOUT_S = 60.0

# A few common ripgrep file types for the Python fallback (rg knows hundreds).
FALLBACK_TYPES = {
    "py": ["*.py", "*.pyi"],
    "js": ["*.js", "*.mjs", "*.cjs", "*.jsx"],
    "ts": ["*.ts", "*.tsx", "*.mts", "*.cts"],
    "rust": ["*.rs"],
    "go": ["*.go"],
    "c": ["*.c", "*.h"],
    "cpp": ["*.cpp", "*.cc", "*.cxx", "*.hpp", "*.hh", "*.h"],
    "java": ["*.java"],
    "md": ["*.md", "*.markdown"],
    "json": ["*.json"],
    "yaml": ["*.yaml", "*.yml"],
    "toml": ["*.toml"],
    "sh": ["*.sh", "*.bash"],
    "html": ["*.html", "*.htm"],
    "css": ["*.css"],
}


@lru_cache(maxsize=1)
def find_rg() -> str | None:
    """The `rg` from the ripgrep wheel (next to the interpreter), else one on PATH."""
    override = os.environ.get("DS4_AGENT_RG")
    if override is not None:
        return override or None  # empty string forces the Python fallback
    # The wheel installs rg into the environment's scripts directory.
    candidates = [
        Path(sysconfig.get_path("scripts")) / "rg",
        Path(sys.executable).parent / "rg",
        Path(sys.prefix) / "bin" / "rg",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("rg")


class GrepArgs(Args):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    pattern: str = Field(min_length=1)
    path: str | None = None
    glob: str | None = None
    type: str | None = None
    output_mode: Literal["content", "files_with_matches", "count"] = "files_with_matches"
    case_insensitive: bool = Field(default=False, alias="-i")
    line_numbers: bool = Field(default=True, alias="-n")
    after: int | None = Field(default=None, alias="-A", ge=0, le=50)
    before: int | None = Field(default=None, alias="-B", ge=0, le=50)
    context: int | None = Field(default=None, alias="-C", ge=0, le=50)
    multiline: bool = False
    head_limit: int | None = Field(default=None, ge=1)


class GlobArgs(Args):
    pattern: str = Field(min_length=1)
    path: str | None = None


def _search_root(env: ToolEnv, raw: str | None, tool: str) -> tuple[Path, str]:
    ws = env.workspace
    path = ws.resolve(raw or ".")
    if not path.exists():
        raise missing_file_error(env, path, raw or ".", tool)
    return path, ws.display(path)


def _secret_excludes(env: ToolEnv) -> list[str]:
    return [f"!{g}" for g in env.workspace.secret_globs]


def _cap_lines(lines: list[str], total: int, limit: int, what: str) -> str:
    text = "\n".join(lines[:limit])
    if total > limit:
        text += f"\n[... {total - limit} more {what} not shown; narrow the search with path/glob/type or raise head_limit]"
    return text


# ---- Grep ------------------------------------------------------------------------------------


def tool_grep(args: GrepArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    start, shown = _search_root(env, args.path, "Grep")
    limit = args.head_limit or env.limits.grep_default_head
    rg = find_rg()
    if rg:
        lines, total, note = _grep_rg(rg, args, env, start, ctx)
    else:
        lines, total, note = _grep_py(args, env, start, ctx)
    if total == 0:
        return ToolResult(
            f"No matches for {args.pattern!r} in {shown}" + (f"\n{note}" if note else "")
        )
    what = {"content": "lines", "files_with_matches": "files", "count": "files"}[args.output_mode]
    header = ""
    if args.output_mode == "files_with_matches":
        header = f"{total} file{'s' if total != 1 else ''} match:\n"
    body = header + _cap_lines(lines, total, limit, what) + (f"\n{note}" if note else "")
    return ToolResult(body, display={"kind": "grep", "total": total})


def _rel_arg(env: ToolEnv, path: Path) -> str:
    try:
        rel = path.relative_to(env.workspace.root).as_posix()
    except ValueError:
        return str(path)
    return rel or "."


def _prefilter(globs: list[str]) -> list[str]:
    """rg arguments that narrow the walk to the globs' file names without overriding .gitignore.

    rg's own --glob whitelists files even when .gitignore excludes them, so positive globs are
    applied in Python on rg's output instead; when every positive glob is a plain file-name
    pattern, a custom file type (which does respect ignore files) lets rg skip the rest early.
    """
    positive = [g for g in globs if not g.startswith("!")]
    if not positive or any("/" in g for g in positive):
        return []
    return [*(f"--type-add=ds4sel:{g}" for g in positive), "--type=ds4sel"]


def _rg_base(rg: str, env: ToolEnv) -> list[str]:
    return [
        rg,
        "--no-config",
        "--color=never",
        "--hidden",
        "--no-require-git",
        "--null",
        "--glob=!.git",
    ]


def _grep_rg(
    rg: str, args: GrepArgs, env: ToolEnv, start: Path, ctx: ToolContext
) -> tuple[list[str], int, str]:
    # stderr goes to a file: a pipe nobody reads while stdout streams could fill up and hang rg
    # (one "permission denied" line per unreadable file adds up).
    with tempfile.TemporaryFile() as errfile:
        return _grep_rg_run(rg, args, env, start, ctx, errfile)


def _grep_rg_run(
    rg: str, args: GrepArgs, env: ToolEnv, start: Path, ctx: ToolContext, errfile: BinaryIO
) -> tuple[list[str], int, str]:
    globs = _split_globs(args.glob) if args.glob else []
    keep = _GlobFilter(globs + _secret_excludes(env))
    cmd = _rg_base(rg, env) + ["--sort=path", "--max-columns=500", "--max-columns-preview"]
    cmd += _prefilter(globs)
    if args.type:
        cmd.append(f"--type={args.type}")
    if args.case_insensitive:
        cmd.append("-i")
    if args.multiline:
        cmd += ["-U", "--multiline-dotall"]
    if args.output_mode == "files_with_matches":
        cmd.append("--files-with-matches")
    elif args.output_mode == "count":
        cmd += ["--count", "--with-filename"]
    else:
        cmd += ["--with-filename", "--no-heading"]
        cmd.append("--line-number" if args.line_numbers else "--no-line-number")
        if args.context is not None:
            cmd.append(f"--context={args.context}")
        if args.after is not None:
            cmd.append(f"--after-context={args.after}")
        if args.before is not None:
            cmd.append(f"--before-context={args.before}")
    cmd += ["--regexp", args.pattern, "--", _rel_arg(env, start)]
    limit = args.head_limit or env.limits.grep_default_head
    proc = subprocess.Popen(
        cmd,
        cwd=env.workspace.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=errfile,
    )
    assert proc.stdout is not None
    stopped = _watchdog(proc, ctx)
    lines: list[str] = []
    total = 0
    explicit_file = start.is_file()

    def emit(line: str) -> None:
        nonlocal total
        if line == "--" and (not lines or lines[-1] == "--"):
            return
        total += 1
        if len(lines) < limit:
            lines.append(line)

    if args.output_mode == "files_with_matches":
        # --null with -l prints "path\0path\0…" without newlines.
        for raw in proc.stdout.read().split(b"\0"):
            path = _strip_dot(raw.decode("utf-8", errors="replace").strip("\n"))
            if path and (explicit_file or keep(path)):
                emit(path)
    else:
        for raw in proc.stdout:  # streamed: memory stays bounded by `limit` whatever rg prints
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if "\0" not in line:
                emit(line)
                continue
            path, rest = line.split("\0", 1)
            path = _strip_dot(path)
            if not (explicit_file or keep(path)):
                continue
            if args.output_mode == "count":
                emit(f"{path}:{rest}")
                continue
            digits = len(rest) - len(rest.lstrip("0123456789"))
            sep = (
                rest[digits]
                if args.line_numbers and digits and rest[digits : digits + 1] in (":", "-")
                else ":"
            )
            emit(f"{path}{sep}{rest}")
    while lines and lines[-1] == "--":
        lines.pop()
        total -= 1
    code = proc.wait()
    errfile.seek(0)
    err = errfile.read(65536).decode("utf-8", errors="replace")
    if stopped:
        return lines, total, _stopped_note(stopped[0])
    if code == 2 and total == 0:
        first = next((ln for ln in err.splitlines() if ln.strip()), "unknown error")
        if "regex" in err.lower():
            raise ToolError(
                f"Grep: invalid regular expression {args.pattern!r} ({_one_line(err)}); fix the pattern (ripgrep/Rust regex syntax, escape literal braces and parentheses)"
            )
        if "unrecognized file type" in err:
            raise ToolError(
                f"Grep: unknown file type {args.type!r}; use a ripgrep type such as py, js, ts, rust, go, or use glob instead"
            )
        raise ToolError(f"Grep: ripgrep failed: {first}; check the pattern, path and glob")
    return lines, total, ""


def _one_line(err: str) -> str:
    parts = [
        ln.strip() for ln in err.splitlines() if ln.strip() and not set(ln.strip()) <= {"^", "~"}
    ]
    return " ".join(parts)[:300]


def _strip_dot(line: str) -> str:
    return line[2:] if line.startswith("./") else line


def _split_globs(glob: str) -> list[str]:
    """`*.{ts,tsx}` stays one glob (rg expands braces); commas outside braces and spaces split."""
    out, depth, cur = [], 0, ""
    for ch in glob:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if depth == 0 and ch in ", ":
            if cur:
                out.append(cur)
            cur = ""
            continue
        cur += ch
    if cur:
        out.append(cur)
    return out


def _expand_braces(glob: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", glob)
    if not m:
        return [glob]
    out = []
    for alt in m.group(1).split(","):
        out.extend(_expand_braces(glob[: m.start()] + alt + glob[m.end() :]))
    return out


class _GlobFilter:
    """rg --glob semantics: any positive glob must match; a `!glob` excludes.

    Each side is compiled into one regex from pathspec's gitignore translation, so filtering
    tens of thousands of paths costs one regex search per path, not one per pattern.
    """

    def __init__(self, globs: list[str]) -> None:
        pos = [e for g in globs if not g.startswith("!") for e in _expand_braces(g)]
        neg = [e for g in globs if g.startswith("!") for e in _expand_braces(g[1:])]
        self.pos = _combined(pos)
        self.neg = _combined(neg)

    def __call__(self, rel: str) -> bool:
        if self.neg is not None and self.neg.search(rel):
            return False
        return self.pos is None or self.pos.search(rel) is not None


_NAMED_GROUP = re.compile(r"\(\?P<\w+>")


def _combined(globs: list[str]) -> re.Pattern[str] | None:
    parts = []
    for pat in pathspec.GitIgnoreSpec.from_lines(globs).patterns:
        if pat.regex is None or not pat.include:
            continue
        # Named groups would clash once the patterns are joined; they are not needed here.
        parts.append("(?:" + _NAMED_GROUP.sub("(?:", pat.regex.pattern) + ")")
    return re.compile("|".join(parts)) if parts else None


def _py_files(env: ToolEnv, start: Path, globs: list[str]) -> list[tuple[Path, str]]:
    flt = _GlobFilter(globs + _secret_excludes(env))
    out = []
    for p in walk_files(env.workspace.root, start):
        rel = _rel_arg(env, p)
        if flt(rel):
            out.append((p, rel))
    return out


def _grep_py(
    args: GrepArgs, env: ToolEnv, start: Path, ctx: ToolContext
) -> tuple[list[str], int, str]:
    flags = re.IGNORECASE if args.case_insensitive else 0
    if args.multiline:
        flags |= re.DOTALL | re.MULTILINE
    try:
        rx = re.compile(args.pattern, flags)
    except re.error as e:
        raise ToolError(
            f"Grep: invalid regular expression {args.pattern!r} ({e}); fix the pattern (escape literal braces and parentheses)"
        ) from None
    globs = _split_globs(args.glob) if args.glob else []
    if args.type:
        if args.type not in FALLBACK_TYPES:
            raise ToolError(
                f"Grep: unknown file type {args.type!r}; use one of {', '.join(FALLBACK_TYPES)}, or use glob instead"
            )
        globs.append("{" + ",".join(FALLBACK_TYPES[args.type]) + "}")
    before = args.before if args.before is not None else (args.context or 0)
    after = args.after if args.after is not None else (args.context or 0)
    lines: list[str] = []
    deadline = time.monotonic() + SEARCH_TIMEOUT_S
    for path, rel in _py_files(env, start, globs):
        if ctx.cancel.is_set():
            return lines, len(lines), _stopped_note("interrupted")
        if time.monotonic() > deadline:
            return lines, len(lines), _stopped_note("timeout")
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if looks_binary(data):
            continue
        text = data.decode("utf-8", errors="replace")
        if args.multiline:
            hit_lines = set()
            for m in rx.finditer(text):
                a = text.count("\n", 0, m.start())
                b = text.count("\n", 0, max(m.start(), m.end() - 1))
                hit_lines.update(range(a, b + 1))
            file_lines = text.split("\n")
        else:
            file_lines = text.split("\n")
            hit_lines = {i for i, ln in enumerate(file_lines) if rx.search(ln)}
        if file_lines and file_lines[-1] == "":
            file_lines.pop()
        if not hit_lines:
            continue
        if args.output_mode == "files_with_matches":
            lines.append(rel)
            continue
        if args.output_mode == "count":
            lines.append(f"{rel}:{len(hit_lines)}")
            continue
        shown: set[int] = set()
        for i in sorted(hit_lines):
            shown.update(range(max(0, i - before), min(len(file_lines), i + after + 1)))
        prev = None
        for i in sorted(shown):
            if prev is not None and i != prev + 1:
                lines.append("--")
            sep = ":" if i in hit_lines else "-"
            ln = file_lines[i].rstrip("\r")
            if len(ln) > 500:
                ln = ln[:500] + " [... omitted end of long line]"
            lines.append(f"{rel}{sep}{i + 1}{sep}{ln}" if args.line_numbers else f"{rel}{sep}{ln}")
            prev = i
    return lines, len(lines), ""


def _watchdog(proc: subprocess.Popen[bytes], ctx: ToolContext) -> list[str]:
    """Kill `proc` on the agent's interrupt or after SEARCH_TIMEOUT_S; the list gets the reason."""
    stopped: list[str] = []
    deadline = time.monotonic() + SEARCH_TIMEOUT_S

    def watch() -> None:
        while proc.poll() is None:
            why = (
                "interrupted"
                if ctx.cancel.is_set()
                else "timeout"
                if time.monotonic() > deadline
                else ""
            )
            if why:
                stopped.append(why)
                proc.kill()
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True, name="search-watchdog").start()
    return stopped


def _stopped_note(why: str) -> str:
    if why == "interrupted":
        return "[search interrupted by the user; the results above are incomplete]"
    return f"[search stopped after {SEARCH_TIMEOUT_S:g} s; the results above are incomplete, narrow the path, glob or pattern]"


# ---- Glob ------------------------------------------------------------------------------------


def tool_glob(args: GlobArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    start, shown = _search_root(env, args.path, "Glob")
    if not start.is_dir():
        raise ToolError(f"Glob: {args.path} is a file, not a directory; pass a directory as path")
    pattern = args.pattern
    if not pattern.startswith(("/", "**", "!")) and "/" in pattern and start != env.workspace.root:
        # Make patterns like "a/*.py" relative to the search directory, as users expect.
        pattern = f"{_rel_arg(env, start)}/{pattern}"
    rg = find_rg()
    globs = _split_globs(pattern)
    if rg:
        cmd = _rg_base(rg, env) + ["--files", *_prefilter(globs), "--", _rel_arg(env, start)]
        try:
            proc = subprocess.run(
                cmd,
                cwd=env.workspace.root,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=SEARCH_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise ToolError(
                f"Glob: listing files took over {SEARCH_TIMEOUT_S:g} s; pass a narrower path"
            ) from None
        if proc.returncode == 2 and not proc.stdout:
            raise ToolError(
                f"Glob: invalid pattern {args.pattern!r} ({_one_line(proc.stderr.decode(errors='replace'))}); fix the glob"
            )
        keep = _GlobFilter(globs + _secret_excludes(env))
        rels = [
            r
            for r in (
                _strip_dot(x) for x in proc.stdout.decode("utf-8", errors="replace").split("\0")
            )
            if r and keep(r)
        ]
    else:
        rels = [rel for _, rel in _py_files(env, start, globs)]
    if not rels:
        return ToolResult(f"No files match {args.pattern!r} in {shown}")

    def mtime(rel: str) -> float:
        try:
            return (env.workspace.root / rel).stat().st_mtime
        except OSError:
            return 0.0

    # Newest first (what the model most likely cares about), ties by name for stable output.
    rels.sort(key=lambda r: (-mtime(r), r))
    total = len(rels)
    cap = env.limits.glob_max_results
    return ToolResult(
        _cap_lines(rels, total, cap, "files"), display={"kind": "glob", "total": total}
    )
