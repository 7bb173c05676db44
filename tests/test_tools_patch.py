"""apply_patch (V4A): add/update/delete/move, fuzzy hunks, and all-or-nothing across files."""

from __future__ import annotations

import pytest
from ds4_agent.tools.context import ToolContext
from ds4_agent.tools.permissions import PermissionPolicy
from ds4_agent.tools.registry import ToolRegistry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tools_helpers import Harness


def make(root, mode="full-auto", **kw) -> Harness:
    h = Harness(root, mode=mode, **kw)
    h.reg.close()
    policy = PermissionPolicy.from_rules(mode, root=h.root, **kw)
    h.reg = ToolRegistry.from_data(h.root, policy=policy, enabled=["Read", "apply_patch"])
    return h


@pytest.fixture
def h(tmp_path):
    harness = make(tmp_path)
    yield harness
    harness.close()


def P(*body: str) -> str:
    return "\n".join(["*** Begin Patch", *body, "*** End Patch"])


def test_update_add_delete_move(h):
    h.write_file("a.py", "import os\n\ndef f():\n    return 1\n\ndef g():\n    return 2\n")
    h.write_file("old.txt", "bye\n")
    h.write_file("mv.txt", "x\ny\n")
    patch = P(
        "*** Update File: a.py",
        "@@ def g():",
        "-    return 2",
        "+    return 3",
        "*** Add File: pkg/new.py",
        "+print('new')",
        "+",
        "*** Delete File: old.txt",
        "*** Update File: mv.txt",
        "*** Move to: moved/mv.txt",
        " x",
        "-y",
        "+Y",
    )
    text = h.ok("apply_patch", patch=patch)
    assert text.split("\n") == [
        "Applied patch:",
        "M a.py",
        "A pkg/new.py",
        "D old.txt",
        "R mv.txt -> moved/mv.txt",
    ]
    assert (
        h.root / "a.py"
    ).read_text() == "import os\n\ndef f():\n    return 1\n\ndef g():\n    return 3\n"
    assert (h.root / "pkg/new.py").read_text() == "print('new')\n\n"
    assert not (h.root / "old.txt").exists() and not (h.root / "mv.txt").exists()
    assert (h.root / "moved/mv.txt").read_text() == "x\nY\n"
    # Undo puts everything back.
    h.reg.journal.undo_turn(0)
    assert (h.root / "old.txt").read_text() == "bye\n" and (
        h.root / "mv.txt"
    ).read_text() == "x\ny\n"
    assert not (h.root / "pkg/new.py").exists() and not (h.root / "moved/mv.txt").exists()


def test_anchor_disambiguates_and_multiple_hunks(h):
    h.write_file("c.py", "def a():\n    x = 1\n\ndef b():\n    x = 1\n")
    h.ok("apply_patch", patch=P("*** Update File: c.py", "@@ def b():", "-    x = 1", "+    x = 2"))
    assert (h.root / "c.py").read_text() == "def a():\n    x = 1\n\ndef b():\n    x = 2\n"
    h.ok(
        "apply_patch",
        patch=P(
            "*** Update File: c.py",
            "@@",
            "-def a():",
            "+def a2():",
            "@@",
            "-def b():",
            "+def b2():",
        ),
    )
    assert (h.root / "c.py").read_text() == "def a2():\n    x = 1\n\ndef b2():\n    x = 2\n"


def test_whitespace_fuzz_reported_and_crlf_kept(h):
    h.write_file("w.txt", b"one  \r\ntwo\r\nthree\r\n")
    text = h.ok("apply_patch", patch=P("*** Update File: w.txt", " one", "-two", "+TWO"))
    assert "trailing whitespace" in text
    assert (h.root / "w.txt").read_bytes() == b"one  \r\nTWO\r\nthree\r\n"


def test_end_of_file_marker(h):
    h.write_file("e.txt", "x\nend\nx\nend\n")
    h.ok("apply_patch", patch=P("*** Update File: e.txt", " x", "-end", "+END", "*** End of File"))
    assert (h.root / "e.txt").read_text() == "x\nend\nx\nEND\n"


def test_failure_anywhere_changes_nothing(h):
    h.write_file("a.txt", "a\n")
    h.write_file("b.txt", "b\n")
    patch = P(
        "*** Update File: a.txt",
        "-a",
        "+A",
        "*** Update File: b.txt",
        "-nope",
        "+B",
        "*** Add File: c.txt",
        "+c",
    )
    msg = h.err("apply_patch", patch=patch)
    assert "b.txt: hunk 1" in msg and "not found" in msg
    assert (h.root / "a.txt").read_text() == "a\n" and not (h.root / "c.txt").exists()


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ("no markers", "must start with"),
        ("*** Begin Patch\n*** Update File: a.txt\n-a\n+b", "must end with"),
        (P(), "no file sections"),
        (P("*** Frobnicate File: a.txt"), "expected '*** Add File:'"),
        (P("*** Add File: x.txt", "no plus"), "must start with '+'"),
        (P("*** Update File: a.txt"), "has no hunks"),
        (P("*** Update File: a.txt", "?bad"), "must start with ' ', '-' or '+'"),
        (P("*** Delete File: missing.txt"), "does not exist"),
        (P("*** Add File: a.txt", "+dup"), "already exists"),
        (P("*** Update File: ../x.txt", "-a", "+b"), "outside the workspace"),
    ],
)
def test_bad_patches_are_clear_errors(h, patch, needle):
    h.write_file("a.txt", "a\n")
    msg = h.err("apply_patch", patch=patch)
    assert needle in msg, msg
    assert (h.root / "a.txt").read_text() == "a\n"


def test_stale_file_guard(h):
    h.write_file("s.txt", "v1\n")
    h.ok("Read", file_path="s.txt")
    (h.root / "s.txt").write_text("v2\n")
    msg = h.err("apply_patch", patch=P("*** Update File: s.txt", "-v2", "+v3"))
    assert "changed on disk" in msg


def test_permissions_check_every_file(tmp_path):
    h = make(tmp_path, mode="auto-edit", deny=["Edit(secret/**)"])
    try:
        h.write_file("ok.txt", "a\n")
        h.write_file("secret/k.txt", "k\n")
        msg = h.err(
            "apply_patch",
            patch=P("*** Update File: ok.txt", "-a", "+b", "*** Delete File: secret/k.txt"),
        )
        assert "denied by rule Edit(secret/**)" in msg
        assert (h.root / "ok.txt").read_text() == "a\n"
        ctx = ToolContext()
        assert not h.reg.call(
            "apply_patch", {"patch": P("*** Update File: ok.txt", "-a", "+b")}, ctx
        ).is_error
    finally:
        h.close()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.text(alphabet="ab ", max_size=4), min_size=1, max_size=8),
    st.integers(0, 7),
    st.lists(st.text(alphabet="xy", max_size=3), max_size=3),
)
def test_patch_applies_exactly_or_not_at_all(tmp_path_factory, lines, at, replacement):
    root = tmp_path_factory.mktemp("p")
    h = make(root)
    try:
        at = at % len(lines)
        original = "\n".join(lines) + "\n"
        path = h.write_file("f.txt", original)
        patch = P("*** Update File: f.txt", f"-{lines[at]}", *(f"+{r}" for r in replacement))
        res = h("apply_patch", patch=patch)
        after = path.read_text()
        if res.is_error:
            assert after == original
        elif "matched" not in res.text:
            first = lines.index(lines[at])  # the first exact occurrence is the one replaced
            expect = lines[:first] + replacement + lines[first + 1 :]
            assert after == "\n".join(expect) + ("\n" if expect else "") or (
                not expect and after == ""
            )
    finally:
        h.close()
