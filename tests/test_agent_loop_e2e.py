"""The agent loop end to end: the real engine on a tiny model with the real vocabulary, the
real tokenizer, the real tools, and forced tokens (ScriptedSampler) standing in for choices."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from agent_harness import call_block, engine, script, system_tokens, tokenizer
from ds4_agent.agent.loop import Agent, AgentEvents, LoopConfig
from ds4_agent.agent.runtime import start
from ds4_agent.agent.wiring import build_tools
from ds4_agent.engine.sampling import ScriptedSampler
from ds4_agent.sessions.session import SessionStore
from ds4_agent.sessions.transcript import Transcript

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return tokenizer(tokenizer_json)


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "home"))
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "a.py").write_text("print('hello')\n")
    return root


class Recorder(AgentEvents):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.results: list[tuple[str, str, bool]] = []
        self.notices: list[str] = []
        self.text_deltas = 0
        self.on_text = None
        self.on_call = None

    def text(self, delta: str) -> None:
        self.text_deltas += 1
        if self.on_text:
            self.on_text(self.text_deltas)

    def tool_call(self, call) -> None:
        self.calls.append(call.name)
        if self.on_call:
            self.on_call(call)

    def tool_result(self, call, text, is_error, display) -> None:
        self.results.append((call.name, text, is_error))

    def notice(self, message: str) -> None:
        self.notices.append(message)


def make_agent(tok, root, tokens, events=None, cfg=None, tools=True, **tool_kw):
    store = SessionStore(root.parent / "sessions", str(root))
    s = store.create("t")
    reg = build_tools(root, **({"mode": "full-auto"} | tool_kw)) if tools else None
    a = Agent(
        engine(),
        tok,
        reg,
        s,
        sampler=ScriptedSampler(tokens),
        config=cfg or LoopConfig(ctx_limit=8192, prefill_chunk=64),
        events=events or Recorder(),
    )
    start(a, None, system_tokens(tok))
    return a


def _check_invariants(a: Agent) -> None:
    # Token ids are the truth: memory, the transcript file and the engine state agree.
    on_disk = Transcript.load(a.session.transcript_path()).tokens()
    assert on_disk == a.tokens
    assert a.state.n_tokens == len(a.tokens)
    assert list(a.state.tokens) == a.tokens


def test_turn_with_reasoning_and_two_tool_calls(tok, ws):
    rounds = script(
        tok,
        "Read, run.</think>Look."
        + call_block(("Read", {"file_path": "a.py"}), ("Bash", {"command": "python3 a.py"})),
        "</think>The script prints `hello`.",
    )
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev)
    r = a.run_turn("What does a.py print?")
    assert r.status == "done" and r.rounds == 2
    assert r.answer == "The script prints `hello`."
    assert ev.calls == ["Read", "Bash"]
    assert "print('hello')" in ev.results[0][1] and not ev.results[0][2]
    assert "hello" in ev.results[1][1] and not ev.results[1][2]
    kinds = [e.kind for e in a.session.transcript]
    assert kinds == ["system", "user", "assistant", "tool_results", "assistant"]
    # The sampled tokens are stored as sampled (plus the EOS the agent adds after the block).
    first, second = a.session.transcript.entries[2], a.session.transcript.entries[4]
    n1 = len(first.tokens) - 1
    assert first.tokens[:n1] == rounds[:n1] and first.tokens[-1] == a.sp.eos
    assert second.tokens == rounds[n1:]
    assert [c["name"] for c in first.data["tool_calls"]] == ["Read", "Bash"]
    text = tok.decode(a.session.transcript.entries[3].tokens)
    assert text.startswith("<｜User｜><tool_result>") and text.endswith("<｜Assistant｜><think>")
    assert "</tool_result>\n\n<tool_result>" in text
    _check_invariants(a)


def test_malformed_call_then_retry(tok, ws):
    bad = call_block(("Read", {"file_path": "a.py"})).replace(
        'string="true">a.py', 'string="false">a.py'
    )
    rounds = script(
        tok,
        "</think>" + bad,
        "</think>" + call_block(("Read", {"file_path": "a.py"})),
        "</think>It prints hello.",
    )
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev)
    r = a.run_turn("read a.py")
    assert r.status == "done" and r.rounds == 3
    assert ev.calls == ["Read"]  # the malformed call never ran
    results = [e for e in a.session.transcript if e.kind == "tool_results"]
    assert results[0].text.startswith("Tool error: invalid DSML tool call: ")
    assert "is not JSON" in results[0].text and "file_path" in results[0].text
    assert "print('hello')" in results[1].text
    _check_invariants(a)


def test_interrupt_during_decode_leaves_a_well_formed_transcript(tok, ws):
    long_answer = "</think>" + " word" * 60
    follow = "</think>Second answer."
    rounds = script(tok, long_answer)[:-1] + script(tok, follow)
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev, tools=False)
    ev.on_text = lambda n: a.interrupt.set() if n == 5 else None
    r = a.run_turn("talk")
    assert r.status == "interrupted"
    last = a.session.transcript.entries[-1]
    assert last.kind == "notice" and last.tokens == [a.sp.eos]  # think was already closed
    _check_invariants(a)  # synced: the next turn needs no rebuild
    n_before = len(a.tokens)
    # The unused rest of the long answer is skipped in the script.
    a.sampler.pos = len(script(tok, long_answer)) - 1
    r2 = a.run_turn("again")
    assert r2.status == "done" and r2.answer == "Second answer."
    user_tokens = a.session.transcript.entries[-2].tokens
    assert r2.prefill_tokens == len(user_tokens)  # only the new user turn was prefilled
    assert a.tokens[:n_before] == Transcript.load(a.session.transcript_path()).tokens()[:n_before]
    _check_invariants(a)


def test_interrupt_inside_thinking_closes_think(tok, ws):
    rounds = script(tok, "hmm" * 40)
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev, tools=False)
    seen = []

    class Stop(Recorder):
        def reasoning(self, delta):
            seen.append(delta)
            if len(seen) == 3:
                a.interrupt.set()

    a.events = Stop()
    r = a.run_turn("think")
    assert r.status == "interrupted"
    assert a.session.transcript.entries[-1].tokens == [a.sp.think_end, a.sp.eos]
    _check_invariants(a)


def test_interrupt_stops_a_running_shell_command(tok, ws):
    rounds = script(tok, "Wait.</think>" + call_block(("Bash", {"command": "sleep 30"})))
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev)
    ev.on_call = lambda call: threading.Timer(1.0, a.interrupt.set).start()
    t0 = time.monotonic()
    r = a.run_turn("sleep")
    assert time.monotonic() - t0 < 20
    assert r.status == "interrupted"
    assert ev.results and ev.results[0][0] == "Bash"
    assert a.session.transcript.entries[-2].kind == "tool_results"
    assert a.session.transcript.entries[-1].tokens == [a.sp.think_end, a.sp.eos]
    _check_invariants(a)


def test_queued_prompt_goes_into_the_next_tool_results_turn(tok, ws):
    rounds = script(
        tok,
        "</think>" + call_block(("Read", {"file_path": "a.py"})),
        "</think>Also: it is one line.",
    )
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev)
    ev.on_call = lambda call: a.queue.append("and how many lines?")
    r = a.run_turn("read a.py")
    assert r.status == "done"
    tr = [e for e in a.session.transcript if e.kind == "tool_results"][0]
    assert tr.data["note"] == "and how many lines?"
    assert tok.decode(tr.tokens).endswith(
        "</tool_result>\n\nand how many lines?<｜Assistant｜><think>"
    )
    assert not a.queue
    _check_invariants(a)


def test_repeated_identical_call_is_refused(tok, ws):
    call = call_block(("Read", {"file_path": "a.py"}))
    rounds = script(tok, "</think>" + call, "</think>" + call, "</think>Giving up.")
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev, cfg=LoopConfig(ctx_limit=8192, max_repeats=1))
    r = a.run_turn("loop")
    assert r.status == "done" and r.answer == "Giving up."
    assert ev.results[1][2] and "already made 1 times" in ev.results[1][1]


def test_tool_round_limit(tok, ws):
    call = call_block(("LS", {"path": "."}))
    rounds = script(tok, "</think>" + call, "</think>" + call)
    a = make_agent(tok, ws, rounds, cfg=LoopConfig(ctx_limit=8192, max_tool_rounds=1))
    r = a.run_turn("list forever")
    assert r.status == "limit" and "1 tool rounds" in (r.error or "")
    assert a.session.transcript.entries[-1].kind == "notice"
    _check_invariants(a)


def test_external_file_change_is_told_before_the_next_turn(tok, ws):
    from ds4_agent.agent.watch import FileWatcher

    rounds = script(
        tok,
        "</think>" + call_block(("Read", {"file_path": "a.py"})),
        "</think>Read.",
        "</think>Noted.",
    )
    a = make_agent(tok, ws, rounds)
    w = FileWatcher(ws, a.tools.workspace.read_state)
    w.start()
    a.pre_turn_notes.append(w.note)
    try:
        assert a.run_turn("read a.py").status == "done"
        time.sleep(0.3)
        (ws / "b.txt").write_text("not read by the model: not reported\n")
        (ws / "a.py").write_text("print('changed')\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not w._changed:
            time.sleep(0.05)
        time.sleep(0.3)
        assert a.run_turn("anything new?").status == "done"
    finally:
        w.stop()
    user = [e for e in a.session.transcript if e.kind == "user"][-1]
    assert "Changed on disk outside your tools since you read them: a.py." in user.data["notes"]
    assert "b.txt" not in user.data["notes"]
    assert user.text == "anything new?"
    assert "a.py" in tok.decode(user.tokens)
    # The Edit guard refuses the stale file until it is read again.
    res = a.tools.call("Edit", {"file_path": "a.py", "old_string": "changed", "new_string": "x"})
    assert res.is_error and "changed on disk" in res.text


def test_compaction_keeps_system_prefix_and_recent_tail(tok, ws):
    from ds4_agent.agent.compaction import compact, tail_start

    rounds = script(tok, "</think>First answer.", "</think>Second answer.", "</think>After.")
    a = make_agent(tok, ws, rounds, tools=False, cfg=LoopConfig(ctx_limit=600, prefill_chunk=64))
    a.run_turn("first question " + "x " * 60)
    a.run_turn("second question")
    old = list(a.tokens)
    system = a.session.transcript.entries[0]
    summary = tok.encode_trusted("Goal: answer questions. Done: two answers.")
    r = compact(a, None, sampler=ScriptedSampler([*summary, a.sp.eos]))
    assert r.summary == "Goal: answer questions. Done: two answers."
    entries = a.session.transcript.entries
    assert [e.kind for e in entries[:2]] == ["system", "summary"]
    assert entries[0].tokens == system.tokens
    assert entries[2].kind == "user" and entries[2].text == "second question"
    assert a.session.meta.epoch == 1
    # Reversible: the previous epoch is still on disk, token for token.
    assert Transcript.load(a.session.transcript_path(0)).tokens() == old
    assert r.new_tokens < r.old_tokens
    _check_invariants(a)
    assert a.run_turn("continue").answer == "After."
    _check_invariants(a)
    assert tail_start(entries, 600) == 2


def test_denied_call_is_reported_with_its_id(tok, ws):
    rounds = script(
        tok, "</think>" + call_block(("Bash", {"command": "rm -rf build"})), "</think>Not allowed."
    )
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev, mode="auto-edit", deny=["Bash(rm:*)"])
    r = a.run_turn("clean up")
    assert r.status == "done" and r.answer == "Not allowed."
    assert ev.results[0][2] and "Permission denied" in ev.results[0][1]
    [d] = r.denials
    assert d["tool_name"] == "Bash" and d["tool_use_id"] == "call_0_0"
    assert d["tool_input"]["command"] == "rm -rf build"


def test_interrupt_during_prefill(tok, ws):
    class StopInPrefill(Recorder):
        def prefill_progress(self, done, total, elapsed_s):
            if done < total:
                a.interrupt.set()

    ev = StopInPrefill()
    a = make_agent(tok, ws, script(tok, "</think>Late."), ev, tools=False)
    r = a.run_turn("long question " * 40)  # several 64-token prefill chunks
    assert r.status == "interrupted" and r.rounds == 0
    assert a.session.transcript.entries[-1].tokens == [a.sp.think_end, a.sp.eos]
    _check_invariants(a)  # the rest was prefilled after the turn ended: no rebuild needed
    assert a.run_turn("short").answer == "Late."


def test_soft_compaction_triggers_before_a_turn(tok, ws):
    from ds4_agent.agent.runtime import attach_compaction

    rounds = script(tok, "</think>First.", "</think>After compaction.")
    cfg = LoopConfig(ctx_limit=1200, prefill_chunk=64, compact_at=0.3)
    a = make_agent(tok, ws, rounds, tools=False, cfg=cfg)
    summary = tok.encode_trusted("Summary: the user asked twice.")
    attach_compaction(a, None, sampler=ScriptedSampler([*summary, a.sp.eos]))
    a.run_turn("first " + "filler " * 380)  # over 30 % of the context afterwards
    assert len(a.tokens) > 0.3 * 1200
    assert a.session.meta.epoch == 0
    r = a.run_turn("second")
    assert r.answer == "After compaction."
    assert a.session.meta.epoch == 1
    kinds = [e.kind for e in a.session.transcript]
    assert kinds[:2] == ["system", "summary"] and kinds[-2:] == ["user", "assistant"]
    assert any("compacting the conversation" in n for n in a.events.notices)
    _check_invariants(a)


def test_tolerated_dsml_spelling_still_runs_the_call(tok, ws):
    # A variant seen from the model: the DSML marker without its leading bar.
    variant = call_block(("Read", {"file_path": "a.py"})).replace("<｜DSML｜", "<DSML｜")
    variant = variant.replace("</｜DSML｜", "</DSML｜")
    # No EOS after the block: the agent stops at its end and appends EOS itself.
    rounds = tok.encode_trusted("</think>" + variant) + script(tok, "</think>Read it.")
    ev = Recorder()
    a = make_agent(tok, ws, rounds, ev)
    r = a.run_turn("read a.py")
    assert r.status == "done" and r.answer == "Read it."
    assert ev.calls == ["Read"] and "print('hello')" in ev.results[0][1]
    first = a.session.transcript.entries[2]
    assert first.data["stop"] == "calls" and first.tokens[-1] == a.sp.eos
    _check_invariants(a)
