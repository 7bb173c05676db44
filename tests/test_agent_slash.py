"""Slash commands, `!cmd` and `@path` on a live session (real engine, tiny model, forced tokens)."""

from __future__ import annotations

import io
import subprocess

import pytest
from agent_harness import engine, model_dir, script, tokenizer
from ds4_agent.agent.cli import _agent_parser
from ds4_agent.agent.cmd_run import Runtime
from ds4_agent.agent.controller import Controller
from ds4_agent.agent.kvstate import KVSnapshots
from ds4_agent.agent.slash import Shell, expand_mentions, run_slash
from ds4_agent.agent.ui_render import Status, TerminalEvents, make_console
from ds4_agent.engine.sampling import ScriptedSampler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kv(tmp_path_factory):
    # Shared by the module's tests: the system prefix is prefilled once, then warm-started.
    from ds4_agent.sessions.store import SnapshotStore

    return KVSnapshots(engine(), SnapshotStore(tmp_path_factory.mktemp("kv")))


@pytest.fixture
def shell(tmp_path, monkeypatch, tokenizer_json, kv):
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "home"))
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    (root / "a.py").write_text("print('hello')\n")
    subprocess.run(["git", "-C", str(root), "add", "a.py"], check=True)
    subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i"],
        check=True,
    )
    monkeypatch.chdir(root)
    tok = tokenizer(tokenizer_json)
    out = io.StringIO()
    status = Status()
    events = TerminalEvents(make_console(out, width=100), status)
    rounds = script(
        tok, "</think>One.", "</think>Two.", "Three.", "</think>Four."
    )  # 3rd: chat mode
    rt = Runtime(engine(), tok, None, kv, model_dir())
    args = _agent_parser().parse_args(["-n", "work"])
    ctrl = Controller(args, rt, root, events, status, sampler=ScriptedSampler(rounds))
    ctrl.open(ctrl.store.create("work"), True)
    sh = Shell(ctrl)
    sh.out = out
    sh.tok = tok
    return sh


def said(sh: Shell) -> str:
    text = sh.out.getvalue()
    sh.out.seek(0)
    sh.out.truncate()
    return text


def test_session_commands(shell):
    sh, ctrl = shell, shell.ctrl
    run_slash(sh, "/help")
    out = said(sh)
    assert "/compact" in out and "/resume" in out and "Ctrl+D" in out
    run_slash(sh, "/hepl")
    assert "did you mean /help?" in said(sh)

    assert ctrl.turn("first").answer == "One."
    run_slash(sh, "/rename main-work")
    assert ctrl.store.resolve("main-work").meta.id == ctrl.session.meta.id
    parent_id = ctrl.session.meta.id
    parent_tokens = list(ctrl.agent.tokens)

    run_slash(sh, "/fork exp")
    assert "you are now in exp" in said(sh)
    assert ctrl.session.meta.name == "exp" and ctrl.session.meta.parent_id == parent_id
    assert ctrl.turn("on the fork").answer == "Two."
    assert ctrl.store.resolve("main-work").transcript.tokens() == parent_tokens

    run_slash(sh, "/sessions")
    out = said(sh)
    assert "* exp" in out and "  main-work" in out

    run_slash(sh, "/resume main-work")
    out = said(sh)
    assert f"resumed 'main-work': restored {len(parent_tokens)} tokens, prefilled 0" in out
    assert "❯ first" in out  # the last turns are shown again
    assert ctrl.agent.tokens == parent_tokens

    run_slash(sh, "/nothink")
    assert ctrl.turn("no reasoning").answer == "Three."
    user = [e for e in ctrl.session.transcript if e.kind == "user"][-1]
    assert user.tokens[-1] == ctrl.agent.sp.think_end  # the chat-mode assistant prefix
    assert ctrl.store.resolve("main-work").meta.thinking_mode == "chat"

    run_slash(sh, "/ctx")
    assert "context " in said(sh)

    # /rewind 1: back to the end of the first turn, from its snapshot, with zero prefill.
    run_slash(sh, "/rewind 1")
    assert "rewound to turn 1 (restored from a snapshot)" in said(sh)
    assert ctrl.agent.tokens == parent_tokens and ctrl.agent.state.n_tokens == len(parent_tokens)
    assert ctrl.session.meta.epoch == 1
    run_slash(sh, "/resume nope")
    assert "no session named 'nope'" in said(sh)
    run_slash(sh, "/quit")
    assert sh.quit_requested
    ctrl.close()


def test_bang_command_output_reaches_the_model_and_at_paths_attach(shell):
    sh, ctrl = shell, shell.ctrl
    run_slash(sh, "!echo from-the-shell")
    out = said(sh)
    assert "from-the-shell" in out and "(exit 0)" in out
    ctrl.turn("what did I run?")
    user = [e for e in ctrl.session.transcript if e.kind == "user"][-1]
    assert "The user ran `echo from-the-shell` (exit 0)" in user.data["notes"]
    assert "from-the-shell" in sh.tok.decode(user.tokens)
    assert user.text == "what did I run?"

    text = expand_mentions("look at @a.py please", ctrl.root)
    assert text.startswith('look at @a.py please\n\n<attached_file path="a.py">')
    assert "print('hello')" in text
    assert expand_mentions("mail me@example.com", ctrl.root) == "mail me@example.com"

    (ctrl.root / "a.py").write_text("print('bye')\n")
    run_slash(sh, "/diff")
    out = said(sh)
    assert "-print('hello')" in out and "+print('bye')" in out
    run_slash(sh, "/undo")
    assert "no tools" in said(sh)
    ctrl.close()
