"""Drawing the agent's work in the terminal's normal screen buffer (rich).

Finished lines go to scrollback as they complete, so native scrollback, search and copy keep
working and nothing is ever redrawn full-screen (the flicker users complain about). Answers
stream line by line as Markdown (a long paragraph is cut at word boundaries as it grows;
fenced code is held until its closing fence, then syntax-highlighted); reasoning streams
dimmed and can be collapsed to a one-line counter; tool calls are
drawn when parsed (a shell command, a path, an edit as a highlighted diff); shell output shows
its head and tail with the exit status.

Plain output: with NO_COLOR set, TERM=dumb, or stdout not a terminal, the console renders no
escape codes at all (rich's `color_system=None` drops every style, bold and dim included).
"""

from __future__ import annotations

import difflib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, TextIO

from ds4_agent.agent.loop import AgentEvents, RoundStats, ToolCall
from rich.console import Console
from rich.markdown import Markdown
from rich.syntax import Syntax
from rich.text import Text


def plain_output(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR", "") != "":
        return True
    if os.environ.get("TERM", "") == "dumb":
        return True
    if os.environ.get("FORCE_COLOR", "") != "":
        return False
    return not (hasattr(stream, "isatty") and stream.isatty())


def make_console(stream: TextIO | None = None, width: int | None = None) -> Console:
    """A console for the agent's output. Without `stream` it writes to whatever `sys.stdout`
    is at the time of each print, so output goes through prompt_toolkit's patch_stdout while
    the prompt is live (text appears above the prompt instead of through it)."""
    plain = plain_output(stream or sys.stdout)
    if plain:
        return Console(
            file=stream,
            color_system=None,
            force_terminal=False,
            highlight=False,
            width=width or 100,
        )
    return Console(file=stream, highlight=False, force_terminal=True, width=width)


@dataclass
class Status:
    """What the bottom status line shows (read by the UI thread, written by the worker)."""

    session: str = ""
    ctx_used: int = 0
    ctx_limit: int = 0
    phase: str = "idle"  # idle | prefill | thinking | writing | tool NAME | compacting
    prefill_done: int = 0
    prefill_total: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    mode: str = "ask"
    queued: int = 0

    def line(self) -> str:
        ctx = f"ctx {_k(self.ctx_used)}/{_k(self.ctx_limit)}"
        if self.phase == "prefill" and self.prefill_total:
            frac = self.prefill_done / self.prefill_total
            bar = "█" * int(frac * 20) + "·" * (20 - int(frac * 20))
            left = self.prefill_total - self.prefill_done
            eta = f" ETA {left / self.prefill_tps:.0f}s" if self.prefill_tps > 0 else ""
            work = (
                f"prefill [{bar}] {self.prefill_done}/{self.prefill_total} "
                f"{self.prefill_tps:.0f} tok/s{eta}"
            )
        elif self.phase == "idle":
            work = "idle"
        else:
            work = f"{self.phase} {self.decode_tps:.1f} tok/s" if self.decode_tps else self.phase
        q = f" | {self.queued} queued" if self.queued else ""
        return f"{self.session} | {ctx} | {work} | {self.mode}{q}"


def _k(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


class TerminalEvents(AgentEvents):
    """Renders loop events; safe to call from the worker thread (one lock for output)."""

    def __init__(self, console: Console, status: Status, show_reasoning: bool = True) -> None:
        self.con = console
        self.status = status
        self.show_reasoning = show_reasoning
        self.lock = threading.Lock()
        self._md = ""  # answer text not yet rendered (incomplete Markdown block)
        self._think_line = ""
        self._think_tokens = 0
        self._in_fence = False
        self._lang = ""
        self._code: list[str] = []
        self.approver: Any = None  # set by the UI: asks the user about a tool call

    # -- the loop's events -----------------------------------------------------------------

    def prefill_progress(self, done: int, total: int, elapsed_s: float) -> None:
        st = self.status
        st.phase = "prefill" if done < total else "thinking"
        st.prefill_done, st.prefill_total = done, total
        st.prefill_tps = done / elapsed_s if elapsed_s > 0 else 0.0

    def reasoning(self, delta: str) -> None:
        self.status.phase = "thinking"
        self._think_tokens += 1
        if not self.show_reasoning:
            return
        self._think_line += delta
        while "\n" in self._think_line:
            line, self._think_line = self._think_line.split("\n", 1)
            self._print(Text(line, style="dim italic"))

    def text(self, delta: str) -> None:
        self._end_reasoning()
        self.status.phase = "writing"
        self._md += delta
        while "\n" in self._md:
            line, self._md = self._md.split("\n", 1)
            self._line(line)
        # A long paragraph streams too: cut it at a word boundary once it passes the width.
        width = max(40, (self.con.width or 80) - 4)
        if not self._in_fence and len(self._md) > width:
            cut = self._md.rfind(" ", 0, width)
            if cut > 0:
                self._line(self._md[:cut])
                self._md = self._md[cut + 1 :]

    def tool_call_streaming(self, name: str, partial_dsml: str) -> None:
        self._end_reasoning()
        self._render_blocks(final=True)
        self.status.phase = f"calling {name}" if name else "calling a tool"

    def tool_call(self, call: ToolCall) -> None:
        self.status.phase = f"tool {call.name}"
        self._print(render_call(call))

    def tool_result(self, call: ToolCall, text: str, is_error: bool, display: Any) -> None:
        self._print(render_result(call, text, is_error, display))

    def invalid_calls(self, message: str, raw: str) -> None:
        self._print(Text(f"[invalid tool call] {message}", style="bold red"))

    def notice(self, message: str) -> None:
        self._print(Text(f"• {message}", style="yellow"))

    def round_end(self, stats: RoundStats) -> None:
        self._end_reasoning()
        self._render_blocks(final=True)
        if stats.decode_tps:
            self.status.decode_tps = stats.decode_tps

    @property
    def approve(self) -> Any:  # type: ignore[override]
        return self.approver

    # -- helpers -----------------------------------------------------------------------------

    def _print(self, renderable: Any) -> None:
        with self.lock:
            self.con.print(renderable)

    def _end_reasoning(self) -> None:
        if self._think_line and self.show_reasoning:
            self._print(Text(self._think_line, style="dim italic"))
        elif self._think_tokens and not self.show_reasoning:
            self._print(Text(f"(thought for {self._think_tokens} tokens)", style="dim"))
        if self._think_line or self._think_tokens:
            self._print(Text(""))
        self._think_line = ""
        self._think_tokens = 0

    def _render_blocks(self, final: bool) -> None:
        """End of the answer: print what is left of the last line (and an open fence)."""
        if not final:
            return
        if self._md:
            self._line(self._md)
            self._md = ""
        if self._in_fence:
            self._print(
                Syntax(
                    "\n".join(self._code),
                    self._lang or "text",
                    theme="ansi_dark",
                    background_color="default",
                )
            )
            self._in_fence, self._code = False, []

    def _line(self, line: str) -> None:
        stripped = line.strip()
        if stripped.startswith("```"):
            if self._in_fence:
                code = "\n".join(self._code)
                self._print(
                    Syntax(
                        code, self._lang or "text", theme="ansi_dark", background_color="default"
                    )
                )
                self._in_fence, self._code = False, []
            else:
                self._in_fence, self._lang, self._code = True, stripped[3:].strip(), []
            return
        if self._in_fence:
            self._code.append(line)
        elif not stripped:
            self._print(Text(""))
        else:
            self._print(Markdown(line))


def render_call(call: ToolCall) -> Any:
    a = call.arguments
    name = call.name
    low = name.lower()
    if low in ("bash", "shell"):
        return Text.assemble(
            ("⏺ ", "cyan"), ("$ ", "bold cyan"), (str(a.get("command", "")), "bold")
        )
    if low in ("edit", "multiedit", "edit_file") and ("old_string" in a or "old" in a):
        old = str(a.get("old_string", a.get("old", "")))
        new = str(a.get("new_string", a.get("new", "")))
        path = str(a.get("file_path", a.get("path", "")))
        diff = "".join(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                fromfile=path,
                tofile=path,
                n=2,
            )
        )
        return _group(
            Text.assemble(("⏺ ", "cyan"), ("Edit ", "bold"), (path, "")),
            Syntax(diff or "(no change)", "diff", theme="ansi_dark", background_color="default"),
        )
    path = a.get("file_path") or a.get("path") or a.get("pattern") or ""
    rest = {k: v for k, v in a.items() if k not in ("file_path", "path", "content")}
    extra = " ".join(f"{k}={v!r}" for k, v in rest.items())
    if low == "write" and "content" in a:
        extra = f"({len(str(a['content']).splitlines())} lines) {extra}"
    return Text.assemble(
        ("⏺ ", "cyan"), (f"{name} ", "bold"), (str(path), ""), (f" {extra}".rstrip(), "dim")
    )


def render_result(call: ToolCall, text: str, is_error: bool, display: Any) -> Any:
    d = display if isinstance(display, dict) else {}
    low = call.name.lower()
    if low in ("bash", "shell"):
        lines = text.rstrip("\n").splitlines()
        shown = (
            lines if len(lines) <= 12 else [*lines[:5], f"… {len(lines) - 10} lines …", *lines[-5:]]
        )
        code = d.get("exit_code")
        style = "red" if is_error or (isinstance(code, int) and code != 0) else "dim"
        body = Text("\n".join("  " + x for x in shown), style=style)
        tail = Text(f"  exit {code}" if code is not None else "", style=style)
        return _group(body, tail) if code is not None else body
    if is_error:
        first = text.strip().splitlines()[0] if text.strip() else "error"
        return Text(f"  ✗ {first}", style="red")
    n = len(text.splitlines())
    return Text(f"  ✓ {n} line{'s' if n != 1 else ''}", style="dim")


def _group(*items: Any) -> Any:
    from rich.console import Group

    return Group(*items)
