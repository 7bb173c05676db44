"""Grep and Glob, with ripgrep and with the pure-Python fallback: same results, .gitignore respected."""

from __future__ import annotations

import pytest
from ds4_agent.tools import search
from tools_helpers import Harness, init_repo


@pytest.fixture(params=["rg", "python"])
def h(request, tmp_path, monkeypatch):
    if request.param == "rg":
        monkeypatch.delenv("DS4_AGENT_RG", raising=False)
        search.find_rg.cache_clear()
        if search.find_rg() is None:
            pytest.skip("rg binary not installed (pip install ripgrep)")
    else:
        monkeypatch.setenv("DS4_AGENT_RG", "")
        search.find_rg.cache_clear()
        assert search.find_rg() is None
    init_repo(tmp_path)
    harness = Harness(tmp_path)
    harness.write_file(".gitignore", "build/\n*.log\n!keep.log\n")
    harness.write_file("src/app.py", "import os\n\ndef main():\n    print('Hello')\n    return 0\n")
    harness.write_file("src/util/helpers.py", "def helper():\n    return 'hello'\n")
    harness.write_file("src/web/ui.ts", "export const hello = 1;\n")
    harness.write_file("src/web/ui.tsx", "export const Hello = () => null;\n")
    harness.write_file("build/out.py", "print('Hello from build')\n")
    harness.write_file("debug.log", "Hello log\n")
    harness.write_file("keep.log", "Hello kept\n")
    harness.write_file("docs/.hidden.md", "hello hidden\n")
    harness.write_file("docs/sub/.gitignore", "gen.md\n")
    harness.write_file("docs/sub/gen.md", "hello generated\n")
    harness.write_file(".env", "HELLO_TOKEN=1\n")
    harness.write_file("data.bin", b"hello\x00\x01")
    harness.write_file("données/é.txt", "bonjour hello\n")
    yield harness
    harness.close()
    search.find_rg.cache_clear()


def test_files_with_matches_respects_gitignore(h):
    text = h.ok("Grep", pattern="(?i)hello")
    files = text.split("\n")[1:]
    assert files == sorted(
        [
            "docs/.hidden.md",
            "données/é.txt",
            "keep.log",
            "src/app.py",
            "src/util/helpers.py",
            "src/web/ui.ts",
            "src/web/ui.tsx",
        ]
    )
    assert text.split("\n")[0] == "7 files match:"


def test_content_mode_line_numbers_and_context(h):
    text = h.ok("Grep", pattern="print", output_mode="content", path="src")
    assert text == "src/app.py:4:    print('Hello')"
    text = h.ok("Grep", pattern="print", output_mode="content", path="src", **{"-B": 1, "-A": 1})
    assert text.split("\n") == [
        "src/app.py-3-def main():",
        "src/app.py:4:    print('Hello')",
        "src/app.py-5-    return 0",
    ]


def test_case_insensitive_glob_type_count(h):
    assert h.ok("Grep", pattern="hello", glob="*.py").split("\n")[1:] == ["src/util/helpers.py"]
    assert h.ok("Grep", pattern="hello", **{"-i": True}, glob="*.py").split("\n")[1:] == [
        "src/app.py",
        "src/util/helpers.py",
    ]
    assert h.ok("Grep", pattern="(?i)hello", glob="*.{ts,tsx}").split("\n")[1:] == [
        "src/web/ui.ts",
        "src/web/ui.tsx",
    ]
    assert h.ok("Grep", pattern="(?i)hello", type="py").split("\n")[1:] == [
        "src/app.py",
        "src/util/helpers.py",
    ]
    assert (
        h.ok("Grep", pattern="return", output_mode="count") == "src/app.py:1\nsrc/util/helpers.py:1"
    )


def test_head_limit_says_what_was_left_out(h):
    h.write_file("many.txt", "".join(f"match {i}\n" for i in range(30)))
    text = h.ok("Grep", pattern="match", output_mode="content", path="many.txt", head_limit=10)
    lines = text.split("\n")
    assert len(lines) == 11
    assert lines[-1].startswith("[... 20 more lines not shown")


def test_no_match_and_bad_regex(h):
    assert h.ok("Grep", pattern="zzzz_nothing").startswith("No matches")
    msg = h.err("Grep", pattern="foo(")
    assert "invalid regular expression" in msg


def test_multiline(h):
    text = h.ok(
        "Grep",
        pattern=r"def main\(\):\n    print",
        multiline=True,
        output_mode="files_with_matches",
    )
    assert text.split("\n")[1:] == ["src/app.py"]


def test_glob(h):
    assert sorted(h.ok("Glob", pattern="*.py").split("\n")) == ["src/app.py", "src/util/helpers.py"]
    assert sorted(h.ok("Glob", pattern="src/**/*.ts*").split("\n")) == [
        "src/web/ui.ts",
        "src/web/ui.tsx",
    ]
    assert sorted(h.ok("Glob", pattern="web/*.ts", path="src").split("\n")) == ["src/web/ui.ts"]
    assert h.ok("Glob", pattern="*.md").split("\n") == ["docs/.hidden.md"]
    assert h.ok("Glob", pattern="*.nothing").startswith("No files match")
    assert h.ok("Glob", pattern=".env*").startswith("No files match")
    assert h.ok("Grep", pattern="HELLO_TOKEN").startswith("No matches")
    assert "debug.log" not in h.ok("Grep", pattern="Hello", glob="*.log")


def test_glob_newest_first(h):
    import os
    import time

    now = time.time()
    os.utime(h.root / "src/app.py", (now - 100, now - 100))
    os.utime(h.root / "src/util/helpers.py", (now, now))
    assert h.ok("Glob", pattern="*.py").split("\n") == ["src/util/helpers.py", "src/app.py"]


def test_explicit_ignored_directory_is_searched(h):
    assert h.ok("Grep", pattern="Hello", path="build").split("\n")[1:] == ["build/out.py"]
    assert h.ok("Glob", pattern="*.py", path="build") == "build/out.py"


def test_interrupt_stops_search(h, request):
    from ds4_agent.tools.context import ToolContext

    ctx = ToolContext()
    ctx.cancel.set()
    res = h.reg.call("Grep", {"pattern": "(?i)hello"}, ctx)
    assert not res.is_error
    if "python" in request.node.name:
        assert "search interrupted by the user" in res.text
    else:  # rg may finish before the watchdog looks; either way the answer is honest
        assert "search interrupted" in res.text or res.text.startswith("7 files match")
