"""Undo journal: writes and edits record before/after; undo a turn, rewind to an earlier one."""

from __future__ import annotations

from ds4_agent.tools.context import ToolContext
from ds4_agent.tools.journal import UndoJournal
from tools_helpers import Harness


def test_undo_turn_and_rewind(tmp_path):
    h = Harness(tmp_path)
    try:
        h.write_file("a.txt", "v0\n")
        h.reg.call("Read", {"file_path": "a.txt"}, ToolContext(turn=1))
        h.reg.call(
            "Edit",
            {"file_path": "a.txt", "old_string": "v0", "new_string": "v1"},
            ToolContext(turn=1),
        )
        h.reg.call("Write", {"file_path": "new.txt", "content": "created\n"}, ToolContext(turn=1))
        h.reg.call(
            "Edit",
            {"file_path": "a.txt", "old_string": "v1", "new_string": "v2"},
            ToolContext(turn=2),
        )
        h.reg.call(
            "Edit",
            {"file_path": "a.txt", "old_string": "v2", "new_string": "v3"},
            ToolContext(turn=3),
        )
        j = h.reg.journal
        assert j.turns() == [1, 2, 3]
        report = j.undo_turn(3)
        assert report.restored == [str(h.root / "a.txt")]
        assert (h.root / "a.txt").read_text() == "v2\n"
        report = j.rewind_to(1)
        assert (h.root / "a.txt").read_text() == "v0\n"
        assert not (h.root / "new.txt").exists()
        assert "removed 1 created file" in report.summary()
        assert j.turns() == []
    finally:
        h.close()


def test_conflicting_change_is_not_overwritten(tmp_path):
    h = Harness(tmp_path)
    try:
        h.write_file("a.txt", "mine\n")
        h.ok("Read", file_path="a.txt")
        h.ok("Edit", file_path="a.txt", old_string="mine", new_string="agent")
        (tmp_path / "a.txt").write_text("user edited after the agent\n")
        report = h.reg.journal.undo_turn(0)
        assert report.conflicts == [str(tmp_path / "a.txt")]
        assert (tmp_path / "a.txt").read_text() == "user edited after the agent\n"
        assert "skipped 1 file" in report.summary()
        h.reg.journal.undo_turn(0, force=True)
        assert (tmp_path / "a.txt").read_text() == "mine\n"
    finally:
        h.close()


def test_persistent_journal_survives_restart(tmp_path):
    store = tmp_path / "journal"
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f.txt").write_text("before\n")
    j = UndoJournal(store)
    j.record(5, ws / "f.txt", b"before\n", b"after\n", "Edit")
    (ws / "f.txt").write_text("after\n")
    j2 = UndoJournal(store)
    assert j2.turns() == [5]
    j2.undo_turn(5)
    assert (ws / "f.txt").read_text() == "before\n"
    assert UndoJournal(store).turns() == []
