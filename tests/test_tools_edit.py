"""Edit and MultiEdit on fixture files: exact and tolerant matching, guards, all-or-nothing."""

from __future__ import annotations

import os
import time

import pytest
from tools_helpers import Harness


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def read_then(h: Harness, rel: str, data: bytes | str) -> None:
    h.write_file(rel, data)
    h.ok("Read", file_path=rel)


def test_exact_edit_and_result_snippet(h):
    read_then(h, "a.py", "def f():\n    return 1\n\nprint(f())\n")
    text = h.ok("Edit", file_path="a.py", old_string="return 1", new_string="return 2")
    assert (h.root / "a.py").read_text() == "def f():\n    return 2\n\nprint(f())\n"
    assert "replaced 1 occurrence" in text and "(matched" not in text
    assert "     2\t    return 2" in text  # the new lines, numbered as Read shows them


def test_edit_requires_read_first(h):
    h.write_file("a.txt", "hello\n")
    msg = h.err("Edit", file_path="a.txt", old_string="hello", new_string="bye")
    assert "has not been read" in msg and "Read it first" in msg
    assert (h.root / "a.txt").read_text() == "hello\n"


def test_stale_file_refused(h):
    read_then(h, "a.txt", "one\ntwo\n")
    time.sleep(0.01)
    (h.root / "a.txt").write_text("one\ntwo\nthree\n")  # someone else edits it
    msg = h.err("Edit", file_path="a.txt", old_string="two", new_string="2")
    assert "changed on disk since you last read it" in msg
    assert (h.root / "a.txt").read_text() == "one\ntwo\nthree\n"
    h.ok("Read", file_path="a.txt")
    h.ok("Edit", file_path="a.txt", old_string="two", new_string="2")
    assert (h.root / "a.txt").read_text() == "one\n2\nthree\n"


def test_non_unique_match_refused_then_replace_all(h):
    read_then(h, "a.txt", "x = 1\ny = 2\nx = 1\n")
    msg = h.err("Edit", file_path="a.txt", old_string="x = 1", new_string="x = 3")
    assert "matches 2 places" in msg and "lines 1, 3" in msg and "replace_all" in msg
    assert (h.root / "a.txt").read_text() == "x = 1\ny = 2\nx = 1\n"
    text = h.ok("Edit", file_path="a.txt", old_string="x = 1", new_string="x = 3", replace_all=True)
    assert "replaced 2 occurrences" in text
    assert (h.root / "a.txt").read_text() == "x = 3\ny = 2\nx = 3\n"


def test_tabs_in_file_spaces_in_old_string(h):
    read_then(h, "m.go", "func f() {\n\tif x {\n\t\treturn 1\n\t}\n}\n")
    text = h.ok(
        "Edit",
        file_path="m.go",
        old_string="    if x {\n        return 1\n    }",
        new_string="    if x {\n        return 2\n    }\n    return 0",
    )
    assert "ignoring indentation" in text
    assert (
        h.root / "m.go"
    ).read_text() == "func f() {\n\tif x {\n\t\treturn 2\n\t}\n\treturn 0\n}\n"


def test_different_base_indent_is_shifted(h):
    read_then(h, "c.py", "class A:\n    def f(self):\n        return 1\n")
    h.ok(
        "Edit",
        file_path="c.py",
        old_string="def f(self):\n    return 1",
        new_string="def f(self):\n    x = 1\n    return x",
    )
    assert (
        h.root / "c.py"
    ).read_text() == "class A:\n    def f(self):\n        x = 1\n        return x\n"


def test_crlf_file_edit_keeps_crlf(h):
    read_then(h, "w.txt", b"alpha\r\nbeta\r\ngamma\r\n")
    text = h.ok(
        "Edit", file_path="w.txt", old_string="alpha\nbeta\n", new_string="ALPHA\nBETA\nextra\n"
    )
    assert "CRLF" in text
    assert (h.root / "w.txt").read_bytes() == b"ALPHA\r\nBETA\r\nextra\r\ngamma\r\n"


def test_crlf_mixed_file_only_touches_matched_lines(h):
    read_then(h, "m.txt", b"a\r\nb\r\nc\nd\r\n")
    h.ok("Edit", file_path="m.txt", old_string="a\nb", new_string="A\nB")
    # The LF-only line keeps its ending; the replaced lines get the file's CRLF.
    assert (h.root / "m.txt").read_bytes() == b"A\r\nB\r\nc\nd\r\n"
    # Text that matches byte for byte is replaced exactly as given.
    h.ok("Edit", file_path="m.txt", old_string="c\nd", new_string="C\nD")
    assert (h.root / "m.txt").read_bytes() == b"A\r\nB\r\nC\nD\r\n"


def test_trailing_whitespace_tolerated(h):
    read_then(h, "t.txt", "keep  \nfoo = 1   \nbar = 2\t\n")
    text = h.ok(
        "Edit",
        file_path="t.txt",
        old_string="foo = 1\nbar = 2\n",
        new_string="foo = 10\nbar = 20\n",
    )
    assert "trailing whitespace" in text
    assert (h.root / "t.txt").read_text() == "keep  \nfoo = 10\nbar = 20\n"


def test_missing_trailing_newline(h):
    read_then(h, "n.txt", "first\nlast")
    assert "[no newline at end of file]" in h.ok("Read", file_path="n.txt")
    h.err("Edit", file_path="n.txt", old_string="last\n", new_string="LAST\n")
    assert (h.root / "n.txt").read_text() == "first\nlast"
    h.ok("Edit", file_path="n.txt", old_string="last", new_string="LAST")
    assert (h.root / "n.txt").read_text() == "first\nLAST"


def test_not_found_shows_closest_match(h):
    read_then(h, "s.py", "import os\n\ndef compute(a, b):\n    total = a + b\n    return total\n")
    msg = h.err(
        "Edit",
        file_path="s.py",
        old_string="def compute(a, b):\n    total = a - b\n",
        new_string="x",
    )
    first, rest = msg.split("\n", 1)
    assert "not found" in first
    assert "Closest match: lines 3-4" in rest
    assert "-    total = a - b" in rest and "+    total = a + b" in rest


def test_unicode_path_and_content(h):
    read_then(h, "données/café ☕.txt", "naïve — ünïcödé\n")
    h.ok("Edit", file_path="données/café ☕.txt", old_string="ünïcödé", new_string="日本語")
    assert (h.root / "données" / "café ☕.txt").read_text(encoding="utf-8") == "naïve — 日本語\n"


def test_identical_and_empty_old_string(h):
    read_then(h, "a.txt", "x\n")
    assert "identical" in h.err("Edit", file_path="a.txt", old_string="x", new_string="x")
    assert "Write" in h.err("Edit", file_path="a.txt", old_string="", new_string="y")


def test_empty_old_string_creates_new_file(h):
    text = h.ok("Edit", file_path="new/dir/f.txt", old_string="", new_string="hello\n")
    assert text.startswith("Created new/dir/f.txt")
    assert (h.root / "new/dir/f.txt").read_text() == "hello\n"


def test_missing_file_suggests_similar(h):
    h.write_file("config.yaml", "a: 1\n")
    msg = h.err("Edit", file_path="config.yml", old_string="a", new_string="b")
    assert "file not found" in msg and "config.yaml" in msg


def test_binary_and_non_utf8_refused(h):
    read_bytes = b"\x89PNG\x00\x00data"
    h.write_file("b.dat", read_bytes)
    assert "binary" in h.err("Edit", file_path="b.dat", old_string="PNG", new_string="x")
    h.write_file("l1.txt", "caf\xe9\n".encode("latin-1"))
    h.ok("Read", file_path="l1.txt")
    assert "not valid UTF-8" in h.err("Edit", file_path="l1.txt", old_string="caf", new_string="x")
    assert (h.root / "b.dat").read_bytes() == read_bytes


def test_bom_preserved(h):
    read_then(h, "bom.txt", "\ufeffhello\n".encode())
    h.ok("Edit", file_path="bom.txt", old_string="hello", new_string="world")
    assert (h.root / "bom.txt").read_bytes() == "\ufeffworld\n".encode()


def test_file_mode_preserved(h):
    p = h.write_file("run.sh", "#!/bin/sh\necho 1\n")
    os.chmod(p, 0o755)
    h.ok("Read", file_path="run.sh")
    h.ok("Edit", file_path="run.sh", old_string="echo 1", new_string="echo 2")
    assert os.stat(p).st_mode & 0o777 == 0o755


def test_multiedit_sequential_and_atomic(h):
    read_then(h, "m.py", "a = 1\nb = 2\nc = 3\n")
    text = h.ok(
        "MultiEdit",
        file_path="m.py",
        edits=[
            {"old_string": "a = 1", "new_string": "a = 10"},
            {"old_string": "a = 10\nb = 2", "new_string": "a = 10\nb = 20"},
        ],
    )
    assert "edit 1 of 2" in text and "edit 2 of 2" in text
    assert (h.root / "m.py").read_text() == "a = 10\nb = 20\nc = 3\n"
    before = (h.root / "m.py").read_bytes()
    msg = h.err(
        "MultiEdit",
        file_path="m.py",
        edits=[
            {"old_string": "c = 3", "new_string": "c = 30"},
            {"old_string": "zzz", "new_string": "y"},
        ],
    )
    assert "edit 2 of 2" in msg and "no edits were written" in msg
    assert (h.root / "m.py").read_bytes() == before


def test_write_creates_parents_and_guards_existing(h):
    text = h.ok("Write", file_path="deep/er/new.txt", content="one\ntwo\n")
    assert text == "Created deep/er/new.txt (2 lines, 8 bytes)"
    h.write_file("exists.txt", "old\n")
    assert "Read it first" in h.err("Write", file_path="exists.txt", content="new\n")
    h.ok("Read", file_path="exists.txt")
    assert h.ok("Write", file_path="exists.txt", content="new\n").startswith("Overwrote")
    assert (h.root / "exists.txt").read_text() == "new\n"
    # Write counts as a read: an immediate Edit works.
    h.ok("Edit", file_path="exists.txt", old_string="new", new_string="newer")


def test_no_temp_files_left_behind(h):
    read_then(h, "a.txt", "x\n")
    h.ok("Edit", file_path="a.txt", old_string="x", new_string="y")
    h.ok("Write", file_path="b.txt", content="z")
    assert sorted(p.name for p in h.root.iterdir()) == ["a.txt", "b.txt"]


def test_display_diff_has_true_line_numbers(h):
    read_then(h, "long.txt", "".join(f"row {i}\n" for i in range(1, 101)))
    res = h("Edit", file_path="long.txt", old_string="row 50\n", new_string="ROW 50\nextra\n")
    diff = res.display["diff"]
    assert "@@ -47,7 +47,8 @@" in diff
    assert diff.count("\n-") == 1 and "+ROW 50\n+extra\n" in diff
