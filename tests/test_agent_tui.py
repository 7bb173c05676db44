"""The real terminal UI in a pseudo-terminal (pexpect): prompt, streamed answer, status line,
/help, interrupt, Ctrl+D; NO_COLOR gives an answer without escape codes.

The test plays the terminal: it answers prompt_toolkit's cursor-position requests (CPR) the
way a real terminal does, which the bottom status line needs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from agent_harness import script, tokenizer

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
CPR = "\x1b\\[6n"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Term:
    def __init__(self, child) -> None:
        self.child = child
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120) -> str:
        while True:
            i = self.child.expect([pattern, CPR], timeout=timeout)
            self.seen += self.child.before + self.child.after
            if i == 0:
                return self.child.before + self.child.after
            self.child.send("\x1b[1;1R")  # cursor at row 1: the whole screen below is free

    def send(self, text: str) -> None:
        self.child.send(text)


def spawn(tmp_path: Path, tokenizer_json: Path, rounds: list[int], no_color: bool) -> Term:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    script_file = tmp_path / f"script-{no_color}.json"
    script_file.write_text(json.dumps(rounds))
    env = {
        **os.environ,
        "DS4_AGENT_HOME": str(tmp_path / "home"),
        "DS4_AGENT_SCRIPT": str(script_file),
        "DS4_AGENT_TOOLS": "none",
        "DS4_AGENT_NO_WATCH": "1",
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TERM": "xterm-256color",
    }
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    if no_color:
        env["NO_COLOR"] = "1"
    child = pexpect.spawn(
        sys.executable,
        [str(HERE / "agent_cli_child.py"), str(tokenizer_json), "-n", f"tui{int(no_color)}"],
        env=env,
        cwd=str(repo),
        dimensions=(40, 120),
        encoding="utf-8",
        timeout=120,
    )
    return Term(child)


def test_tui_prompt_stream_status_help_interrupt_quit(tmp_path, tokenizer_json):
    tok = tokenizer(tokenizer_json)
    rounds = script(tok, "Greet.</think>Hi **there**, `friend`!")
    rounds += script(tok, "</think>" + " word" * 300)[:-1]
    t = spawn(tmp_path, tokenizer_json, rounds, no_color=True)
    t.expect("ds4-agent · session tui1")
    t.send("hello\r")
    t.expect("Hi there, friend!")  # Markdown rendered, and not one escape code inside
    t.expect(r"tui1 \| ctx \d+/65\.5k \| [a-z]+")  # the bottom status line
    t.send("/help\r")
    t.expect("commands:")
    t.expect("/compact")
    t.send("talk\r")
    t.expect("word word word")  # a long answer streams before it ends
    t.send("\x03")  # Ctrl+C interrupts the turn, not the program
    t.expect("interrupted; the conversation is intact")
    t.expect(r"\| idle \|")
    t.send("\x04")  # Ctrl+D on the empty prompt exits
    t.child.expect(pexpect.EOF, timeout=60)
    t.child.close()
    assert t.child.exitstatus == 0
    # The answer line carries no escape codes at all under NO_COLOR.
    line = next(x for x in t.seen.splitlines() if "Hi there, friend!" in x)
    answer = line[line.index("Hi there") :].rstrip()
    assert "\x1b" not in answer
    # The session was saved with a well-formed interrupted ending.
    from ds4_agent.sessions.session import SessionStore

    homes = list((tmp_path / "home" / "data" / "sessions").iterdir())
    st = SessionStore(homes[0], "")
    s = st.resolve("tui1")
    assert [e.kind for e in s.transcript][-2:] == ["assistant", "notice"]


def test_colors_without_no_color(tmp_path, tokenizer_json):
    tok = tokenizer(tokenizer_json)
    t = spawn(
        tmp_path, tokenizer_json, script(tok, "</think>Hi **there**, `friend`!"), no_color=False
    )
    t.expect("ds4-agent · session tui0")
    t.send("hello\r")
    out = t.expect("friend")
    assert "\x1b[1m" in out  # bold for **there**: styling is on when NO_COLOR is unset
    assert ANSI.sub("", out).endswith("Hi there, friend")
    t.send("\x04")
    t.child.expect(pexpect.EOF, timeout=60)
