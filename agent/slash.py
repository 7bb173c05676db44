"""Slash commands, `!cmd` and `@path` for the interactive agent.

Handlers take a `Shell` (the UI implements `say`, and `ask` where it can prompt) and the
argument string. They run on the UI thread while the model is idle; `/help`, `/ctx` and
`/sessions` are also allowed while it works.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds4_agent.sessions.session import SessionError

MAX_ATTACH_BYTES = 256 * 1024
MAX_BANG_OUTPUT = 30_000


class Shell:
    """What a command can do with the terminal: print, and (interactive only) ask."""

    def __init__(self, ctrl: Any) -> None:
        self.ctrl = ctrl
        self.quit_requested = False

    def say(self, text: str, style: str = "") -> None:
        self.ctrl.events._print(text)

    def ask(self, question: str) -> str:
        return ""  # non-interactive: every question is answered "no"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[Shell, str], None]
    usage: str = ""


COMMANDS: dict[str, Command] = {}
ALIASES = {"exit": "quit", "q": "quit", "clear": "new", "context": "ctx", "branch": "fork"}


def command(
    name: str, help_: str, usage: str = ""
) -> Callable[[Callable[[Shell, str], None]], Callable[[Shell, str], None]]:
    def deco(fn: Callable[[Shell, str], None]) -> Callable[[Shell, str], None]:
        COMMANDS[name] = Command(name, help_, fn, usage)
        return fn

    return deco


def run_slash(shell: Shell, text: str) -> None:
    text = text.strip()
    if text.startswith("!"):
        bang(shell, text[1:].strip())
        return
    name, _, arg = text[1:].partition(" ")
    name = ALIASES.get(name, name)
    cmd = COMMANDS.get(name)
    if cmd is None:
        import difflib

        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean /{near[0]}?" if near else "; /help lists the commands"
        shell.say(f"unknown command /{name}{hint}")
        return
    try:
        cmd.run(shell, arg.strip())
    except SessionError as e:
        shell.say(str(e))
    except (ValueError, OSError) as e:
        shell.say(f"/{name}: {e}")


KEYS = """keys: Enter send · Alt+Enter or Ctrl+J newline · Esc or Ctrl+C interrupt ·
      Ctrl+D exit (empty line) · Ctrl+O show/collapse reasoning · Tab complete /commands and @paths · text typed while the
      model works is queued and sent next · !cmd runs a shell command · @path attaches a file"""


@command("help", "list commands and keys")
def _help(sh: Shell, arg: str) -> None:
    lines = [f"  /{c.name:<12} {c.usage:<10} {c.help}" for c in COMMANDS.values()]
    sh.say("commands:\n" + "\n".join(lines) + "\n" + KEYS)


@command("quit", "save and exit")
def _quit(sh: Shell, arg: str) -> None:
    sh.quit_requested = True


@command("new", "start a new session (warm start from the shared system prefix)", "[NAME]")
def _new(sh: Shell, arg: str) -> None:
    s = sh.ctrl.new_session(arg or None)
    sh.say(f"new session {s.meta.name}")


@command("sessions", "list the sessions of this repository")
def _sessions(sh: Shell, arg: str) -> None:
    from ds4_agent.sessions.session_export import age as _age

    metas = sh.ctrl.store.list()
    cur = sh.ctrl.agent.session.meta.id if sh.ctrl.agent else None
    if not metas:
        sh.say("no sessions yet")
    for m in metas:
        mark = "*" if m.id == cur else " "
        sh.say(
            f"{mark} {m.name:<24} {m.id[:8]}  {_age(m.updated):>9}  {m.n_tokens:>7} tok  {m.title[:50]}"
        )


@command("resume", "switch to another session (restores its KV state)", "NAME|ID")
def _resume(sh: Shell, arg: str) -> None:
    if not arg:
        sh.say("usage: /resume NAME|ID (see /sessions)")
        return
    s = sh.ctrl.resume(arg)
    sh.say(f"now in session {s.meta.name}")


@command("rename", "rename this session", "NAME")
def _rename(sh: Shell, arg: str) -> None:
    if not arg:
        sh.say("usage: /rename NAME")
        return
    sh.ctrl.rename(arg)
    sh.say(f"renamed to {arg}")


@command("fork", "continue in a copy of this session; the original stays as it is", "[NAME]")
def _fork(sh: Shell, arg: str) -> None:
    parent = sh.ctrl.session.meta.name
    child = sh.ctrl.fork(arg or None)
    sh.say(f"forked {parent} → {child.meta.name}; you are now in {child.meta.name}")


@command("rewind", "go back before the last N turns: conversation and files (default 1)", "[N]")
def _rewind(sh: Shell, arg: str) -> None:
    if arg and not arg.isdigit():
        sh.say("usage: /rewind [N] (N = number of turns to go back)")
        return
    prefilled, files = sh.ctrl.rewind(int(arg) if arg else 1)
    how = "restored from a snapshot" if prefilled == 0 else f"{prefilled} tokens prefilled"
    sh.say(
        f"rewound to turn {sh.ctrl.agent.turn_no} ({how}); the previous transcript is kept "
        f"as epoch {sh.ctrl.session.meta.epoch - 1}" + (f"; files: {files}" if files else "")
    )


@command("undo", "undo the file changes of the last turn")
def _undo(sh: Shell, arg: str) -> None:
    journal = _journal(sh)
    if journal is None:
        return
    turns = journal.turns()
    if not turns:
        sh.say("no file changes to undo")
        return
    report = journal.undo_turn(turns[-1])
    sh.say(report.summary())
    sh.ctrl.agent.extra_notes.append(
        f"[ds4-agent] The user undid your last file changes: {report.summary()}"
    )


def _journal(sh: Shell) -> Any:
    tools = sh.ctrl.rt.tools
    if tools is None:
        sh.say("no tools in this session, so nothing to undo")
        return None
    return tools.journal


@command("diff", "show uncommitted changes (git diff, untracked files listed)")
def _diff(sh: Shell, arg: str) -> None:
    root = sh.ctrl.root
    env = {**os.environ, "GIT_PAGER": "cat", "PAGER": "cat", "GIT_TERMINAL_PROMPT": "0"}
    r = subprocess.run(
        ["git", "diff", "HEAD", "--stat", "--patch"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
    )
    u = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        sh.say(f"git diff failed: {r.stderr.strip() or 'not a git repository'}")
        return
    out = r.stdout.strip()
    if u.stdout.strip():
        out += "\n\nuntracked:\n" + "\n".join("  " + x for x in u.stdout.split())
    if not out.strip():
        sh.say("no changes")
        return
    from rich.syntax import Syntax

    sh.ctrl.events._print(Syntax(out, "diff", theme="ansi_dark", background_color="default"))


@command("compact", "summarize older turns to free context (reversible)", "[FOCUS]")
def _compact(sh: Shell, arg: str) -> None:
    sh.ctrl._compact(sh.ctrl.agent, focus=arg)


def _set_mode(sh: Shell, mode: str, label: str) -> None:
    sh.ctrl.agent.cfg.thinking_mode = mode
    sh.ctrl.session.meta.thinking_mode = mode
    sh.ctrl.session.save_meta()
    sh.say(f"{label} from the next turn")


@command("think", "reason before answering (default)")
def _think(sh: Shell, arg: str) -> None:
    _set_mode(sh, "thinking", "thinking on")


@command("nothink", "answer without reasoning")
def _nothink(sh: Shell, arg: str) -> None:
    _set_mode(sh, "chat", "thinking off")


@command("think-max", "maximum reasoning effort (takes full effect in new sessions)")
def _think_max(sh: Shell, arg: str) -> None:
    _set_mode(sh, "max", "maximum reasoning")


@command("ctx", "show how the context is used")
def _ctx(sh: Shell, arg: str) -> None:
    a = sh.ctrl.agent
    by: dict[str, int] = {}
    for e in a.session.transcript.entries:
        by[e.kind] = by.get(e.kind, 0) + len(e.tokens)
    used, limit = len(a.tokens), a.cfg.ctx_limit
    parts = ", ".join(f"{k} {v}" for k, v in by.items())
    sh.say(
        f"context {used}/{limit} tokens ({100 * used / max(limit, 1):.1f} %): {parts}; "
        f"in the KV state {a.state.n_tokens}; epoch {a.session.meta.epoch}"
    )


@command("permissions", "show or set the permission mode", "[MODE]")
def _permissions(sh: Shell, arg: str) -> None:
    tools = sh.ctrl.rt.tools
    if tools is None:
        sh.say("no tools in this session")
        return
    if arg:
        from ds4_agent.tools.permissions import parse_mode

        tools.policy.set_mode(parse_mode(arg))
        sh.ctrl.status.mode = tools.policy.mode
    p = tools.policy
    sh.say(
        f"mode {p.mode} (read-only | ask | auto-edit | full-auto); "
        f"allow {len(p.allow)}, ask {len(p.ask)}, deny {len(p.deny)} rules"
    )


@command("model", "show the model in use")
def _model(sh: Shell, arg: str) -> None:
    rt = sh.ctrl.rt
    sh.say(f"model {rt.model_dir} · fingerprint {rt.engine.fingerprint}")


def bang(sh: Shell, cmd: str) -> None:
    """`!cmd`: run it in the workspace, show the output, and tell the model next turn."""
    if not cmd:
        sh.say("usage: !COMMAND")
        return
    env = {**os.environ, "PAGER": "cat", "GIT_PAGER": "cat", "GIT_TERMINAL_PROMPT": "0"}
    try:
        r = subprocess.run(
            cmd,
            shell=True,
            cwd=sh.ctrl.root,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        out, code = (r.stdout + r.stderr), r.returncode
    except subprocess.TimeoutExpired:
        out, code = "(timed out after 600 s)", -1
    if len(out) > MAX_BANG_OUTPUT:
        half = MAX_BANG_OUTPUT // 2
        out = f"{out[:half]}\n[… {len(out) - MAX_BANG_OUTPUT} characters cut …]\n{out[-half:]}"
    sh.say(out.rstrip() + f"\n(exit {code})")
    if sh.ctrl.agent is not None:
        sh.ctrl.agent.extra_notes.append(
            f"[ds4-agent] The user ran `{cmd}` (exit {code}):\n{out.rstrip()}"
        )


_MENTION = re.compile(r"(?<![\w@])@((?:[\w.\-~/]|\\ )+)")


def expand_mentions(text: str, root: Path) -> str:
    """`@path` attaches the file: its content follows the message, clearly delimited."""
    blocks: list[str] = []
    for m in _MENTION.finditer(text):
        raw = m.group(1).replace("\\ ", " ").rstrip(".,;:")
        p = (root / os.path.expanduser(raw)).resolve()
        if not p.is_file():
            continue
        data = p.read_bytes()[:MAX_ATTACH_BYTES]
        body = data.decode("utf-8", errors="replace")
        cut = " (first 256 KiB)" if p.stat().st_size > MAX_ATTACH_BYTES else ""
        blocks.append(f'<attached_file path="{raw}"{cut}>\n{body.rstrip()}\n</attached_file>')
    if not blocks:
        return text
    return text + "\n\n" + "\n\n".join(blocks)
