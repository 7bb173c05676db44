"""Named sessions on disk: metadata, transcripts, look-up, fork, crash safety, the CLI."""

from __future__ import annotations

import json
import subprocess

import pytest
from ds4_agent.agent.cli import main
from ds4_agent.agent.cmd_sessions import store_for
from ds4_agent.agent.paths import cache_dir, data_dir, find_repo, state_dir
from ds4_agent.sessions.session import SessionError, SessionStore
from ds4_agent.sessions.transcript import Entry, Transcript


@pytest.fixture
def repo(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DS4_AGENT_HOME", str(home))
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    monkeypatch.chdir(work / "sub")
    return work


def test_paths_follow_override_and_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "h"))
    assert data_dir() == tmp_path / "h" / "data"
    assert state_dir() == tmp_path / "h" / "state"
    monkeypatch.delenv("DS4_AGENT_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "u"))
    assert cache_dir() == tmp_path / "c" / "ds4-agent"
    assert data_dir() == tmp_path / "u" / ".local/share" / "ds4-agent"


def test_sessions_are_keyed_by_git_top_level(repo, tmp_path):
    r = find_repo()
    assert r.root == repo.resolve() and r.is_git
    other = tmp_path / "other" / "work"
    other.mkdir(parents=True)
    assert find_repo(other).key != r.key  # same basename elsewhere: a different key
    assert store_for().root == store_for(repo).root


def _user(text: str, tokens: list[int]) -> Entry:
    return Entry(kind="user", text=text, tokens=tokens)


def test_create_resolve_and_closest_match(repo):
    st = store_for()
    a = st.create("fix-login-bug", branch="main")
    b = st.create()
    assert b.meta.name.startswith("session-")
    assert st.resolve("fix-login-bug").meta.id == a.meta.id
    assert st.resolve(a.meta.id[:6]).meta.id == a.meta.id
    assert st.resolve(b.meta.id).meta.name == b.meta.name
    with pytest.raises(SessionError, match="did you mean 'fix-login-bug'"):
        st.resolve("fix-logn-bug")
    with pytest.raises(SessionError, match="already exists"):
        st.create("fix-login-bug")
    with pytest.raises(SessionError, match="invalid session name"):
        st.create("a/b")


def test_unknown_name_in_empty_repo_says_how_to_start(repo):
    with pytest.raises(SessionError, match="has no sessions yet"):
        store_for().resolve("x")


def test_transcript_round_trip_and_meta(repo):
    st = store_for()
    s = st.create("t")
    s.transcript.append(Entry(kind="system", tokens=[0, 1, 2], text="sys"))
    s.transcript.append(_user("hello   there\nworld", [3, 4]))
    s.save_meta()
    again = st.resolve("t")
    assert again.transcript.tokens() == [0, 1, 2, 3, 4]
    assert again.meta.n_tokens == 5 and again.meta.n_turns == 1
    assert again.meta.title == "hello there world"


def test_torn_last_line_is_dropped_and_overwritten(tmp_path):
    p = tmp_path / "t.jsonl"
    t = Transcript.create(p)
    t.append(_user("a", [1]))
    t.append(_user("b", [2]))
    with open(p, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"kind": "user", "tok')
    t2 = Transcript.load(p)
    assert [e.text for e in t2] == ["a", "b"] and t2.dropped_tail
    t2.append(_user("c", [3]))
    t3 = Transcript.load(p)
    assert t3.tokens() == [1, 2, 3] and not t3.dropped_tail


def test_fork_leaves_parent_unchanged(repo):
    st = store_for()
    p = st.create("parent")
    p.transcript.append(_user("one", [1, 2]))
    p.save_meta()
    before = (p.dir / "meta.json").read_bytes(), p.transcript_path().read_bytes()
    c = st.fork("parent")
    assert c.meta.name == "parent-fork" and c.meta.parent_id == p.meta.id
    c.transcript.append(_user("two", [3]))
    c.save_meta()
    assert st.resolve("parent-fork").transcript.tokens() == [1, 2, 3]
    assert ((p.dir / "meta.json").read_bytes(), p.transcript_path().read_bytes()) == before
    assert st.resolve("parent").transcript.tokens() == [1, 2]


def test_rename_and_remove(repo):
    st = store_for()
    st.create("a")
    st.create("b")
    with pytest.raises(SessionError, match="already exists"):
        st.rename("a", "b")
    st.rename("a", "c")
    assert [m.name for m in st.list()] == ["c", "b"]
    st.remove("c")
    assert [m.name for m in st.list()] == ["b"]
    assert not any(p.name.startswith(".deleted") for p in st.root.iterdir())


def test_cli_list_show_rename_fork_export_rm(repo, capsys):
    st = store_for()
    s = st.create("work")
    s.transcript.append(Entry(kind="system", tokens=[9], text="SYSTEM TEXT"))
    s.transcript.append(_user("do the thing", [1]))
    s.transcript.append(
        Entry(
            kind="assistant",
            tokens=[2, 3],
            text="done",
            data={"reasoning": "think", "tool_calls": [{"name": "Read", "arguments": {"p": 1}}]},
        )
    )
    s.save_meta()

    assert main(["sessions", "list", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["work"] and rows[0]["n_tokens"] == 4

    assert main(["sessions", "list"]) == 0
    out = capsys.readouterr().out
    assert "work" in out and "do the thing" in out

    assert main(["sessions", "show", "work", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_turns"] == 1

    assert main(["sessions", "export", "work"]) == 0
    text = capsys.readouterr().out
    assert "do the thing" in text and "→ Read" in text and "SYSTEM TEXT" not in text

    assert main(["sessions", "export", "work", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [t for e in doc["entries"] for t in e["tokens"]] == [9, 1, 2, 3]

    assert main(["sessions", "fork", "work", "exp"]) == 0
    assert main(["sessions", "rename", "exp", "experiment"]) == 0
    capsys.readouterr()
    assert main(["sessions", "rm", "wrok"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'work'" in err[0]
    assert main(["sessions", "rm", "work"]) == 0
    assert [m.name for m in SessionStore(st.root, st.repo).list()] == ["experiment"]


def test_resume_picker(repo, monkeypatch, capsys):
    from ds4_agent.agent.ui_picker import pick

    st = store_for()
    a = st.create("alpha")
    b = st.create("beta")
    metas = st.list()  # newest first: beta, alpha
    answers = iter(["2", "beta", "", "nope"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert pick(metas) == a.meta.id
    assert pick(metas) == b.meta.id
    assert pick(metas) is None
    assert pick(metas) is None
    out = capsys.readouterr().out
    assert "1. beta" in out and "2. alpha" in out and "no session 'nope'" in out
