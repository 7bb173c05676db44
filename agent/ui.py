"""The interactive terminal UI: prompt_toolkit input, rich output, a worker thread for turns.

The prompt stays live while the model works: output from the worker is printed above it
(`patch_stdout`), and text submitted while busy is queued (sent inside the next tool-results
turn, or as the next prompt). Esc or Ctrl+C interrupts the running turn between tokens,
between prefill chunks, or in a shell command; Ctrl+C on an idle prompt clears it, Ctrl+D on
an empty prompt exits. Enter sends; Alt+Enter or Ctrl+J inserts a newline; pasted text keeps
its newlines (bracketed paste). `/` completes commands, `@` completes paths.

The screen is never cleared or switched to the alternate buffer: scrollback and copy work
as in any shell.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ds4_agent.agent.paths import history_file
from ds4_agent.agent.slash import COMMANDS, Shell, expand_mentions, run_slash
from ds4_agent.agent.ui_render import Status, TerminalEvents, make_console, plain_output
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.patch_stdout import patch_stdout


class AgentCompleter(Completer):
    """`/command` at the start of the input, `@path` anywhere."""

    def __init__(self, root: Path) -> None:
        self.paths = PathCompleter(expanduser=True)
        self.root = root

    def get_completions(self, document: Document, complete_event: Any) -> Iterable[Completion]:
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for name, cmd in COMMANDS.items():
                if name.startswith(text[1:]):
                    yield Completion("/" + name, start_position=-len(text), display_meta=cmd.help)
            return
        word = text.split()[-1] if text.split() and not text.endswith(" ") else ""
        if word.startswith("@"):
            sub = Document(word[1:], len(word) - 1)
            cwd = os.getcwd()
            try:
                os.chdir(self.root)
                yield from self.paths.get_completions(sub, complete_event)
            finally:
                os.chdir(cwd)


def _key_bindings(ui: InteractiveUI) -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")  # Alt+Enter
    @kb.add("c-j")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("enter")
    def _send(event: Any) -> None:
        event.current_buffer.validate_and_handle()

    @kb.add("escape")
    def _esc(event: Any) -> None:
        if ui.busy:
            ui.interrupt("esc")

    @kb.add("c-c")
    def _ctrl_c(event: Any) -> None:
        if ui.busy:
            ui.interrupt("ctrl-c")
        else:
            event.current_buffer.reset()
            ui.say("(press Ctrl+D on an empty line to exit)")

    @kb.add("c-o")
    def _toggle_reasoning(event: Any) -> None:
        ev = ui.ctrl.events
        ev.show_reasoning = not ev.show_reasoning
        ui.say(f"reasoning {'shown' if ev.show_reasoning else 'collapsed'} (Ctrl+O toggles)", "dim")

    @kb.add("c-d")
    def _ctrl_d(event: Any) -> None:
        if not event.current_buffer.text:
            event.app.exit(exception=EOFError())
        else:
            event.current_buffer.delete()

    return kb


class InteractiveUI(Shell):
    """One terminal session. The `Shell` methods (slash commands) live in slash.py."""

    def __init__(self, ctrl: Any, stdout: Any = None) -> None:
        super().__init__(ctrl)
        self.status = ctrl.status
        self.worker: threading.Thread | None = None
        self.busy = False
        self.plain = plain_output(stdout or sys.stdout)
        self._answer: threading.Event | None = None
        self._answer_text = ""

    # -- Shell output ----------------------------------------------------------------------

    def say(self, text: str, style: str = "") -> None:
        self.ctrl.events._print(_styled(text, style))

    # -- turns -----------------------------------------------------------------------------

    def interrupt(self, how: str) -> None:
        if self.ctrl.agent is not None:
            self.ctrl.agent.interrupt.set()
            self.say(f"⏹ interrupting ({how})…", "yellow")

    def submit(self, text: str) -> None:
        if self._answer is not None:  # a permission question is waiting for this answer
            self._answer_text = text
            self._answer.set()
            return
        if not text.strip():
            return
        if self.busy:
            if text.startswith("/") and text.split()[0][1:] not in ("help", "ctx", "sessions"):
                self.say("that command needs the model to be idle; it was not run", "yellow")
                return
            if not text.startswith("/"):
                self.ctrl.agent.queue.append(expand_mentions(text, self.ctrl.root))
                self.status.queued = len(self.ctrl.agent.queue)
                self.say(f"queued: {text[:80]}", "dim")
                return
        if text.startswith("/") or text.startswith("!"):
            run_slash(self, text)
            return
        self.start_turn(text)

    def start_turn(self, text: str) -> None:
        self.busy = True
        self.say(f"❯ {text}", "bold")
        self.worker = threading.Thread(target=self._work, args=(text,), daemon=True)
        self.worker.start()

    def _work(self, text: str) -> None:
        try:
            msg: str | None = expand_mentions(text, self.ctrl.root)
            while msg is not None:
                result = self.ctrl.turn(msg)
                if result.status == "interrupted":
                    self.say("interrupted; the conversation is intact", "yellow")
                elif result.status == "limit":
                    self.say(f"stopped: {result.error}", "yellow")
                msg = self.ctrl.agent.queue.popleft() if self.ctrl.agent.queue else None
                self.status.queued = len(self.ctrl.agent.queue)
                if msg is not None:
                    self.say(f"❯ {msg}", "bold")
        except Exception as e:  # noqa: BLE001 - show it, keep the UI alive
            self.say(f"error: {e.__class__.__name__}: {e}", "bold red")
        finally:
            self.busy = False
            self.status.phase = "idle"

    def ask(self, question: str) -> str:
        """Ask the user from the worker thread; the next submitted line is the answer."""
        ev = threading.Event()
        self._answer, self._answer_text = ev, ""
        self.say(question, "bold magenta")
        while not ev.wait(0.1):
            if self.ctrl.agent is not None and self.ctrl.agent.interrupt.is_set():
                break
        self._answer = None
        return self._answer_text.strip()

    def approve(self, call: Any, decision: Any) -> bool:
        reason = getattr(decision, "reason", "") or ""
        args = " ".join(f"{k}={v!r}" for k, v in (getattr(call, "arguments", {}) or {}).items())
        answer = self.ask(f"allow {call.name} {args[:200]}? {reason} [y/N]").lower()
        return answer in ("y", "yes")

    # -- the prompt loop ---------------------------------------------------------------------

    def run(self) -> int:
        try:
            history = FileHistory(str(_history_path()))
        except OSError:
            history = InMemoryHistory()
        session: PromptSession[str] = PromptSession(
            history=history,
            completer=AgentCompleter(self.ctrl.root),
            complete_while_typing=False,
            key_bindings=_key_bindings(self),
            bottom_toolbar=lambda: self.status.line(),
            refresh_interval=0.25,
            multiline=True,
            enable_open_in_editor=True,
        )
        self.ctrl.events.approver = self.approve
        with patch_stdout(raw=True):
            self.say(self.ctrl.banner(), "bold")
            while True:
                try:
                    text = session.prompt("❯ " if not self.plain else "> ")
                except EOFError:
                    break
                except KeyboardInterrupt:
                    continue
                self.submit(text)
                if self.quit_requested:
                    break
        if self.worker is not None and self.worker.is_alive():
            self.interrupt("exit")
            self.worker.join(timeout=30)
        self.ctrl.close()
        return 0


def _history_path() -> Path:
    p = history_file()
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _styled(text: str, style: str) -> Any:
    from rich.text import Text

    return Text(text, style=style)


def run_interactive(
    args: argparse.Namespace, rt: Any, session: Any, is_new: bool, root: Path
) -> int:
    from ds4_agent.agent.controller import Controller

    console = make_console()
    status = Status(session=session.meta.name, mode=getattr(args, "permission_mode", None) or "ask")
    events = TerminalEvents(console, status)
    ctrl = Controller(args, rt, root, events, status)
    if not sys.stdin.isatty():
        return ctrl.run_piped(session, is_new, sys.stdin)
    ctrl.open(session, is_new)
    return InteractiveUI(ctrl).run()
