"""Read, Write, LS and the workspace sandbox (symlink and `..` escapes, secrets)."""

from __future__ import annotations

import os

import pytest
from ds4_agent.tools.context import ToolContext
from tools_helpers import Harness


@pytest.fixture
def h(tmp_path):
    (tmp_path / "ws").mkdir()
    harness = Harness(tmp_path / "ws")
    yield harness
    harness.close()


def test_read_numbers_lines_and_pages(h):
    h.write_file("big.txt", "".join(f"line {i}\n" for i in range(1, 2501)))
    text = h.ok("Read", file_path="big.txt")
    lines = text.split("\n")
    assert lines[0] == "     1\tline 1"
    assert lines[1999] == "  2000\tline 2000"
    assert lines[-1] == "[showing lines 1-2000 of 2500; Read with offset=2001 to continue]"
    text = h.ok("Read", file_path="big.txt", offset=2400, limit=5)
    assert text.split("\n")[0] == "  2400\tline 2400"
    assert "showing lines 2400-2404 of 2500; Read with offset=2405" in text
    msg = h.err("Read", file_path="big.txt", offset=3000)
    assert "past the end" in msg and "2500 lines" in msg


def test_read_long_line_cut_with_marker(h):
    h.write_file("wide.txt", "x" * 5000 + "\n")
    text = h.ok("Read", file_path="wide.txt")
    assert "[line cut: 3000 more chars]" in text


def test_read_empty_binary_image_dir_missing(h):
    h.write_file("empty.txt", "")
    assert "empty" in h.ok("Read", file_path="empty.txt")
    h.write_file("blob.bin", b"\x00\x01\x02" * 10)
    assert "binary file" in h.err("Read", file_path="blob.bin")
    h.write_file("pic.png", b"\x89PNG\r\n\x1a\n")
    assert "image" in h.err("Read", file_path="pic.png")
    (h.root / "sub").mkdir()
    assert "is a directory" in h.err("Read", file_path="sub")
    assert "file not found" in h.err("Read", file_path="nope.txt")


def test_read_size_cap(h):
    h.reg.limits.read_max_bytes = 1000
    h.write_file("large.txt", "y" * 2000)
    msg = h.err("Read", file_path="large.txt")
    assert "over the 1000-byte limit" in msg


def test_read_non_utf8_and_utf16(h):
    h.write_file("latin.txt", "caf\xe9\n".encode("latin-1"))
    text = h.ok("Read", file_path="latin.txt")
    assert "caf\ufffd" in text and "not valid UTF-8" in text
    h.write_file("u16.txt", "hello\n".encode("utf-16"))
    text = h.ok("Read", file_path="u16.txt")
    assert "hello" in text and "UTF-16" in text


def test_dotdot_escape_refused(h, tmp_path):
    (tmp_path / "outside.txt").write_text("secret\n")
    msg = h.err("Read", file_path="../outside.txt")
    assert "outside the workspace" in msg
    assert "outside the workspace" in h.err("Write", file_path="../evil.txt", content="x")
    assert not (tmp_path / "evil.txt").exists()
    assert "outside the workspace" in h.err("Read", file_path=str(tmp_path / "outside.txt"))


def test_symlink_escape_refused(h, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "data.txt").write_text("outside\n")
    os.symlink(tmp_path / "outside", h.root / "link")
    os.symlink(tmp_path / "outside" / "data.txt", h.root / "filelink.txt")
    for call in (
        ("Read", {"file_path": "link/data.txt"}),
        ("Read", {"file_path": "filelink.txt"}),
        ("Write", {"file_path": "link/new.txt", "content": "x"}),
        ("Edit", {"file_path": "filelink.txt", "old_string": "outside", "new_string": "pwned"}),
        ("LS", {"path": "link"}),
        ("Grep", {"pattern": "outside", "path": "link"}),
    ):
        res = h(call[0], **call[1])
        assert res.is_error and "through a symlink" in res.text, res.text
    assert not (tmp_path / "outside" / "new.txt").exists()
    assert (tmp_path / "outside" / "data.txt").read_text() == "outside\n"


def test_symlink_inside_workspace_is_fine(h):
    h.write_file("real.txt", "ok\n")
    os.symlink(h.root / "real.txt", h.root / "alias.txt")
    assert "ok" in h.ok("Read", file_path="alias.txt")


def test_secret_files_need_permission(tmp_path):
    h = Harness(tmp_path, mode="full-auto")
    try:
        h.write_file(".env", "API_KEY=123\n")
        h.write_file(".env.local", "API_KEY=456\n")
        h.write_file("id_rsa", "KEY\n")
        for name in (".env", ".env.local", "id_rsa"):
            res = h("Read", file_path=name)
            assert res.is_error and "secrets" in res.text
        assert h.ctx.denials and h.ctx.denials[0]["tool_name"] == "Read"
        # Interactive approval lets it through.
        ctx = ToolContext(approve=lambda call, decision: True)
        assert "API_KEY=123" in h.reg.call("Read", {"file_path": ".env"}, ctx).text
    finally:
        h.close()
    # An explicit allow rule also does.
    h = Harness(tmp_path, mode="ask", allow=["Read(.env)"])
    try:
        assert "API_KEY=123" in h.ok("Read", file_path=".env")
    finally:
        h.close()


def test_ls(h):
    h.write_file("b.txt", "12345")
    h.write_file("a/x.txt", "")
    h.write_file("run.sh", "")
    os.chmod(h.root / "run.sh", 0o755)
    os.symlink("b.txt", h.root / "l")
    text = h.ok("LS")
    assert text.split("\n") == [
        "./ (4 entries)",
        "a/",
        "b.txt  (5 bytes)",
        "l@ -> b.txt",
        "run.sh*  (0 bytes)",
    ]
    assert "b.txt  (" not in h.ok("LS", ignore=["*.txt"])
    assert "is a file" in h.err("LS", path="b.txt")


def test_extra_dirs_are_allowed(tmp_path):
    from ds4_agent.tools.registry import ToolRegistry
    from ds4_agent.tools.workspace import Workspace

    (tmp_path / "ws").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "x.txt").write_text("shared\n")
    reg = ToolRegistry.from_data(Workspace(tmp_path / "ws", extra_dirs=[tmp_path / "lib"]))
    try:
        res = reg.call("Read", {"file_path": str(tmp_path / "lib" / "x.txt")}, ToolContext())
        assert not res.is_error and "shared" in res.text
    finally:
        reg.close()


def test_read_output_capped_by_size_with_continue_hint(h):
    h.reg.limits.read_max_chars = 1000
    h.write_file("w.txt", "".join(f"{i:04d} " + "z" * 90 + "\n" for i in range(1, 101)))
    text = h.ok("Read", file_path="w.txt")
    assert len(text) < 1300
    last = text.split("\n")[-1]
    m = __import__("re").fullmatch(
        r"\[showing lines 1-(\d+) of 100 \(output size cap\); Read with offset=(\d+) to continue\]",
        last,
    )
    assert m and int(m.group(2)) == int(m.group(1)) + 1


def test_large_file_paged_read_streams(h):
    h.reg.limits.read_max_bytes = 1000
    h.write_file("huge.txt", "".join(f"row {i}\n" for i in range(1, 5001)))
    assert "over the 1000-byte limit" in h.err("Read", file_path="huge.txt")
    text = h.ok("Read", file_path="huge.txt", offset=4999, limit=10)
    assert text.split("\n")[:2] == ["  4999\trow 4999", "  5000\trow 5000"]
    assert "showing lines 4999-5000 of 5000" in text and "too large to edit" in text


def test_sandbox_refuses_before_asking(tmp_path):
    (tmp_path / "ws").mkdir()
    h = Harness(tmp_path / "ws", mode="ask")
    try:
        asked = []
        ctx = ToolContext(approve=lambda call, decision: asked.append(call) or True)
        res = h.reg.call("Write", {"file_path": "../x.txt", "content": "x"}, ctx)
        assert res.is_error and "outside the workspace" in res.text
        assert asked == []
    finally:
        h.close()


def test_read_state_export_import(h):
    from ds4_agent.tools.workspace import Workspace

    h.write_file("a.txt", "x\n")
    h.ok("Read", file_path="a.txt")
    state = h.reg.workspace.export_read_state()
    ws2 = Workspace(h.root)
    ws2.import_read_state(__import__("json").loads(__import__("json").dumps(state)))
    ws2.check_fresh(h.root / "a.txt", b"x\n", "Edit")  # no error: the stamp came across


def test_writes_inside_dot_git_refused(h):
    (h.root / ".git" / "hooks").mkdir(parents=True)
    msg = h.err("Write", file_path=".git/hooks/pre-commit", content="#!/bin/sh\nrm -rf /\n")
    assert "inside .git" in msg
    assert not (h.root / ".git" / "hooks" / "pre-commit").exists()


def test_new_files_get_umask_permissions(h):
    old = os.umask(0o027)
    try:
        h.ok("Write", file_path="perm.txt", content="x")
    finally:
        os.umask(old)
    assert os.stat(h.root / "perm.txt").st_mode & 0o777 == 0o640


def test_write_keeps_crlf_of_existing_file(h):
    h.write_file("win.txt", b"a\r\nb\r\n")
    h.ok("Read", file_path="win.txt")
    text = h.ok("Write", file_path="win.txt", content="x\ny\nz\n")
    assert "kept the file's CRLF line endings" in text
    assert (h.root / "win.txt").read_bytes() == b"x\r\ny\r\nz\r\n"
    h.write_file("unix.txt", b"a\nb\n")
    h.ok("Read", file_path="unix.txt")
    h.ok("Write", file_path="unix.txt", content="x\n")
    assert (h.root / "unix.txt").read_bytes() == b"x\n"
