"""Git tools on a fixture repository: status, diff (unstaged, staged, untracked, ref, paths), log,
show, commit."""

from __future__ import annotations

import pytest
from tools_helpers import Harness, git, init_repo


@pytest.fixture
def h(tmp_path):
    init_repo(tmp_path)
    harness = Harness(tmp_path)
    harness.write_file("a.txt", "one\ntwo\n")
    harness.write_file("src/b.py", "x = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first commit")
    yield harness
    harness.close()


def test_status(h):
    assert h.ok("GitStatus") == "## main\n(working tree clean)"
    h.write_file("a.txt", "one\n2\n")
    h.write_file("new file ü.txt", "n\n")
    text = h.ok("GitStatus")
    # Unicode stays readable (core.quotepath=off); git quotes names with spaces.
    assert " M a.txt" in text and '?? "new file ü.txt"' in text


def test_diff_unstaged_staged_untracked(h):
    assert h.ok("GitDiff").startswith("No unstaged changes")
    h.write_file("a.txt", "one\nTWO\n")
    h.write_file("src/c.py", "print('new')\n")
    h.write_file(".env", "TOKEN=abc\n")
    text = h.ok("GitDiff")
    assert "-two\n+TWO" in text
    assert "diff --git a/src/c.py b/src/c.py\nnew file mode" in text
    assert "+print('new')" in text
    assert "TOKEN" not in text and "untracked file .env may hold secrets" in text
    assert "c.py" not in h.ok("GitDiff", include_untracked=False)
    git(h.root, "add", "a.txt")
    assert h.ok("GitDiff", staged=True).count("diff --git") == 1
    assert "-two" in h.ok("GitDiff", staged=True)
    assert "-two" not in h.ok("GitDiff")


def test_diff_paths_ref_and_stat(h):
    h.write_file("a.txt", "changed\n")
    h.write_file("src/b.py", "x = 2\n")
    text = h.ok("GitDiff", paths=["src"])
    assert "b.py" in text and "a.txt" not in text
    git(h.root, "commit", "-qam", "second")
    assert h.ok("GitDiff").startswith("No unstaged changes")
    text = h.ok("GitDiff", ref="HEAD~1")
    assert "+x = 2" in text and "+changed" in text
    assert "2 files changed" in h.ok("GitDiff", ref="HEAD~1", stat=True)
    assert "invalid git ref" in h.err("GitDiff", ref="--output=/tmp/x")
    assert "git diff failed" in h.err("GitDiff", ref="no-such-branch")


def test_log_and_show(h):
    h.write_file("a.txt", "three\n")
    git(h.root, "commit", "-qam", "second commit")
    log = h.ok("GitLog").split("\n")
    assert len(log) == 2 and log[0].endswith("second commit") and log[1].endswith("first commit")
    assert h.ok("GitLog", path="src").split("\n")[0].endswith("first commit")
    assert len(h.ok("GitLog", max_count=1).split("\n")) == 1
    show = h.ok("GitShow")
    assert "second commit" in show and "+three" in show
    assert h.ok("GitShow", ref="HEAD~1", path="a.txt") == "one\ntwo"


def test_commit(h):
    h.write_file("a.txt", "committed\n")
    out = h.ok("GitCommit", message="update a", paths=["a.txt"])
    assert "update a" in out
    assert git(h.root, "log", "-1", "--format=%s").strip() == "update a"
    assert "git commit failed" in h.err("GitCommit", message="nothing")


def test_not_a_repo(tmp_path):
    h = Harness(tmp_path)
    try:
        # tmp_path may sit inside some repository on a developer machine; only check when not.
        res = h("GitStatus")
        if res.is_error:
            assert "not inside a git repository" in res.text
    finally:
        h.close()


def test_secrets_stay_out_of_git_output(h):
    h.write_file(".env", "TOKEN=first\n")
    git(h.root, "add", "-f", ".env")
    git(h.root, "commit", "-q", "-m", "add env")
    h.write_file(".env", "TOKEN=second\n")
    h.write_file("a.txt", "one\nchanged\n")
    diff = h.ok("GitDiff")
    assert "TOKEN" not in diff and "+changed" in diff
    assert "TOKEN" not in h.ok("GitShow")
    res = h("GitShow", path=".env")
    assert res.is_error and "secrets" in res.text
