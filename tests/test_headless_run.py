"""Headless runs end to end on the real engine (tiny model, real vocabulary, forced tokens):
json and stream-json validate against the schema, every exit code, resume with zero prefill,
warm start, fork, and rebuild after a deleted or corrupt snapshot."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading

import pytest
from agent_harness import call_block, engine, model_dir, script, tokenizer
from ds4_agent.agent.cli import _agent_parser
from ds4_agent.agent.cmd_run import Runtime, run
from ds4_agent.agent.cmd_sessions import store_for
from ds4_agent.agent.headless import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_LIMIT,
    EXIT_OK,
    EXIT_USAGE,
    AssistantEvent,
    InitEvent,
    ResultMessage,
    UserEvent,
)
from ds4_agent.agent.kvstate import KVSnapshots
from ds4_agent.agent.paths import snapshots_dir
from ds4_agent.agent.wiring import build_tools, open_snapshot_store
from ds4_agent.engine.sampling import ScriptedSampler
from pydantic import TypeAdapter

pytestmark = pytest.mark.slow


SHARED_KV: list = []  # one store per test module and worker: warm starts after the first test


def _kv(shared: bool):
    if shared and SHARED_KV:
        return SHARED_KV[0]
    if shared:
        import tempfile

        from ds4_agent.sessions.store import SnapshotStore

        kv = KVSnapshots(engine(), SnapshotStore(tempfile.mkdtemp(prefix="ds4-agent-kv-")))
        SHARED_KV.append(kv)
        return kv
    store = open_snapshot_store()  # the store under this test's DS4_AGENT_HOME
    assert store is not None, "the snapshot store failed to import or open"
    return KVSnapshots(engine(), store)


def _needs_encoder():
    # The tool preamble in the system prompt comes from the official encoder.
    pytest.importorskip(
        "ds4_agent.prompts.encoding", reason="prompts/encoding.py not in this build"
    )


EVENT = TypeAdapter(InitEvent | AssistantEvent | UserEvent | ResultMessage)


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return tokenizer(tokenizer_json)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DS4_AGENT_NO_WATCH", "1")
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "AGENTS.md").write_text("Answer briefly.\n")
    (root / "a.py").write_text("print('hello')\n")
    monkeypatch.chdir(root)
    return root


def headless(tok, argv, rounds, tools=False, stdin="", own_store=False):
    args = _agent_parser().parse_args(argv)
    rt = Runtime(
        engine=engine(),
        tokenizer=tok,
        tools=build_tools(os.getcwd(), mode=args.permission_mode, enabled=["LS"])
        if tools
        else None,
        kv=_kv(shared=not own_store),
        model_dir=model_dir(),
    )
    out = io.StringIO()
    code = run(args, runtime=rt, sampler=ScriptedSampler(rounds), out=out, stdin=io.StringIO(stdin))
    return code, out.getvalue()


def headless_own(*args, **kw):
    """A run with the snapshot store of this test alone (cold first start)."""
    return headless(*args, own_store=True, **kw)


def result_of(stdout: str) -> ResultMessage:
    return ResultMessage.model_validate_json(stdout.strip().splitlines()[-1])


def test_json_result_resume_with_zero_prefill_warm_start_and_fork(tok, repo):
    code, out = headless_own(
        tok, ["-p", "hi", "-n", "s1", "--output-format", "json"], script(tok, "</think>Hello.")
    )
    assert code == EXIT_OK
    r1 = result_of(out)
    assert (r1.subtype, r1.is_error, r1.result, r1.num_turns) == ("success", False, "Hello.", 1)
    assert not r1.kv_restored and r1.restored_tokens == 0
    s1 = store_for().resolve("s1")
    history = s1.meta.n_tokens
    assert r1.prefill_tokens == history - len(script(tok, "</think>Hello."))
    assert s1.meta.snapshot is not None and s1.meta.snapshot.n_tokens == history

    # Resume: the whole history comes from the snapshot; only the new turn is prefilled.
    code, out = headless_own(
        tok, ["-p", "again", "-r", "s1", "--output-format", "json"], script(tok, "</think>Again.")
    )
    r2 = result_of(out)
    assert code == EXIT_OK and r2.result == "Again."
    assert r2.kv_restored and r2.restored_tokens == history
    user_turn = store_for().resolve("s1").transcript.entries[-2]
    assert user_turn.kind == "user" and r2.prefill_tokens == len(user_turn.tokens)

    # Warm start: a new session restores the shared system prefix instead of prefilling it.
    code, out = headless_own(
        tok, ["-p", "new", "-n", "s2", "--output-format", "json"], script(tok, "</think>New.")
    )
    r3 = result_of(out)
    system = store_for().resolve("s2").transcript.entries[0]
    assert r3.kv_restored and r3.restored_tokens == len(system.tokens)
    assert r3.prefill_tokens == r1.prefill_tokens - len(system.tokens)

    # Fork: the child continues; the parent's files stay byte for byte.
    parent = store_for().resolve("s1")
    before = parent.transcript_path().read_bytes(), (parent.dir / "meta.json").read_bytes()
    code, out = headless_own(
        tok,
        ["-p", "branch", "-r", "s1", "--fork-session", "-n", "s1-b", "--output-format", "json"],
        script(tok, "</think>Forked."),
    )
    r4 = result_of(out)
    assert code == EXIT_OK and r4.kv_restored and r4.session_name == "s1-b"
    assert (
        parent.transcript_path().read_bytes(),
        (parent.dir / "meta.json").read_bytes(),
    ) == before
    child = store_for().resolve("s1-b")
    assert child.meta.parent_id == parent.meta.id
    assert child.transcript.tokens()[: parent.meta.n_tokens] == parent.transcript.tokens()


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_missing_or_corrupt_snapshot_rebuilds_with_notice(tok, repo, capfd, damage):
    code, _ = headless_own(
        tok, ["-p", "hi", "-n", "s", "--output-format", "json"], script(tok, "</think>One.")
    )
    assert code == EXIT_OK
    history = store_for().resolve("s").meta.n_tokens
    files = [p for p in snapshots_dir().rglob("*") if p.is_file() and p.suffix in (".snap", ".seg")]
    assert files
    for p in files:
        if damage == "delete":
            p.unlink()
        else:
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
    capfd.readouterr()
    code, out = headless_own(
        tok, ["-p", "two", "-r", "s", "--output-format", "json"], script(tok, "</think>Two.")
    )
    r = result_of(out)
    assert code == EXIT_OK and r.result == "Two."
    assert not r.kv_restored and r.restored_tokens == 0
    assert r.prefill_tokens >= history  # the whole history was prefilled again
    err = capfd.readouterr().err
    assert "rebuilding session 's' by prefill" in err
    s = store_for().resolve("s")
    assert [e.kind for e in s.transcript][-2:] == ["user", "assistant"]
    # And the rebuilt session was snapshotted again: the next resume is instant.
    code, out = headless_own(
        tok, ["-p", "three", "-r", "s", "--output-format", "json"], script(tok, "</think>Three.")
    )
    assert code == EXIT_OK and result_of(out).kv_restored


def test_stream_json_events_validate(tok, repo):
    _needs_encoder()
    rounds = script(
        tok,
        "</think>Listing." + call_block(("LS", {"path": "."})),
        "</think>There is a.py.",
    )
    code, out = headless(
        tok,
        ["-p", "list", "--output-format", "stream-json", "--permission-mode", "read-only"],
        rounds,
        tools=True,
    )
    assert code == EXIT_OK
    events = [EVENT.validate_json(line) for line in out.strip().splitlines()]
    assert [e.type for e in events] == ["system", "assistant", "user", "assistant", "result"]
    assert events[0].subtype == "init" and events[0].tools == ["LS"]
    use = events[1].message.content[-1]
    assert use.type == "tool_use" and use.name == "LS" and use.input == {"path": "."}
    res = events[2].message.content[0]
    assert res.tool_use_id == use.id and "a.py" in res.content and not res.is_error
    assert events[-1].result == "There is a.py." and events[-1].num_turns == 2


def test_text_output_is_only_the_answer(tok, repo, capfd):
    code, out = headless(tok, ["-p", "hi"], script(tok, "Think.</think>Just this."))
    assert code == EXIT_OK and out == "Just this.\n"


def test_task_from_stdin_and_file(tok, repo, tmp_path):
    code, out = headless(
        tok,
        ["-p", "-", "--output-format", "json"],
        script(tok, "</think>A."),
        stdin="task on stdin",
    )
    assert code == EXIT_OK
    s = store_for().latest()
    assert [e.text for e in s.transcript if e.kind == "user"] == ["task on stdin"]
    f = tmp_path / "task.md"
    f.write_text("task in a file")
    code, out = headless(tok, ["-f", str(f), "--output-format", "json"], script(tok, "</think>B."))
    assert code == EXIT_OK and result_of(out).result == "B."


def test_exit_3_when_the_turn_limit_is_reached(tok, repo):
    _needs_encoder()
    call = call_block(("LS", {"path": "."}))
    rounds = script(tok, "</think>" + call, "</think>" + call)
    code, out = headless(
        tok,
        [
            "-p",
            "list",
            "--max-turns",
            "1",
            "--output-format",
            "json",
            "--permission-mode",
            "read-only",
        ],
        rounds,
        tools=True,
    )
    r = result_of(out)
    assert code == EXIT_LIMIT and r.subtype == "error_max_turns" and r.is_error


def test_exit_1_on_a_runtime_error(tok, repo):
    # The script runs out in the middle of the answer: a failure inside the run.
    code, out = headless(
        tok, ["-p", "hi", "--output-format", "json"], script(tok, "</think>cut")[:-2]
    )
    r = result_of(out)
    assert code == EXIT_ERROR and r.subtype == "error_during_execution" and r.is_error
    assert "exhausted" in (r.error or "")


def test_exit_1_for_unknown_session_with_suggestion(tok, repo, capfd):
    headless(tok, ["-p", "hi", "-n", "fix-login"], script(tok, "</think>x"))
    capfd.readouterr()
    code, _ = headless(tok, ["-p", "hi", "-r", "fix-logn"], [])
    assert code == EXIT_ERROR
    assert "did you mean 'fix-login'" in capfd.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["-p", "x", "-f", "y"],
        ["-p", "x", "-r"],
        ["-p", "x", "--fork-session"],
        ["-p", "x", "-c", "-r", "a"],
        ["-p", "x", "--permission-mode", "sideways"],
        ["-p", "x", "--allow", "Bash("],
        ["-p", "   "],
        ["--output-format", "json"],
    ],
)
def test_exit_2_on_usage_errors(tok, repo, capfd, argv):
    code, out = headless(tok, argv, [])
    assert code == EXIT_USAGE and out == ""
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ds4-agent: ")


def test_exit_130_on_interrupt_and_the_transcript_stays_well_formed(tok, repo, tmp_path):
    rounds = script(tok, "</think>" + " word" * 300)
    done = threading.Event()

    def interrupt_once_decoding() -> None:
        # Wait until the user turn is on disk (decoding starts right after), then Ctrl+C.
        while not done.wait(0.05):
            files = list((tmp_path / "home").rglob("transcript-*.jsonl"))
            if any(b'"kind": "user"' in f.read_bytes() for f in files):
                done.wait(1.0)
                os.kill(os.getpid(), signal.SIGINT)
                return

    t = threading.Thread(target=interrupt_once_decoding)
    t.start()
    try:
        code, out = headless(tok, ["-p", "talk", "-n", "int", "--output-format", "json"], rounds)
    finally:
        done.set()
        t.join()
    r = result_of(out)
    assert code == EXIT_INTERRUPTED and r.subtype == "error_interrupted" and r.is_error
    assert 0 < r.usage.output_tokens < 300
    s = store_for().resolve("int")
    assert s.transcript.entries[-1].kind == "notice"
    assert s.transcript.entries[-1].tokens[-1] == tok.token_id("<｜end▁of▁sentence｜>")
    assert s.meta.snapshot is not None and s.meta.snapshot.n_tokens == s.meta.n_tokens
