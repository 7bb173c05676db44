"""Instruction files (AGENTS.md, CLAUDE.md fallback) and dynamic git facts."""

from __future__ import annotations

import subprocess

from ds4_agent.agent.context import (
    MAX_INSTRUCTION_BYTES,
    collect_facts,
    find_instruction_files,
    instructions_text,
)


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_instruction_order_global_root_then_nearer(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DS4_AGENT_HOME", str(home))
    (home / "config").mkdir(parents=True)
    (home / "config" / "AGENTS.md").write_text("global rules")
    root = tmp_path / "repo"
    (root / "pkg" / "deep").mkdir(parents=True)
    (root / "AGENTS.md").write_text("root rules")
    (root / "CLAUDE.md").write_text("ignored: AGENTS.md wins in the same directory")
    (root / "pkg" / "CLAUDE.md").write_text("pkg rules (fallback name)")
    files = find_instruction_files(root, root / "pkg" / "deep")
    assert [f.text for f in files] == ["global rules", "root rules", "pkg rules (fallback name)"]
    text = instructions_text(files, root)
    assert text.index("global rules") < text.index("root rules") < text.index("pkg rules")
    assert "## pkg/CLAUDE.md" in text and "ignored" not in text


def test_outside_the_repo_only_root_and_global(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "nohome"))
    root = tmp_path / "repo"
    root.mkdir()
    assert find_instruction_files(root, tmp_path) == []
    assert instructions_text([], root) == ""


def test_large_file_is_capped_with_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "nohome"))
    (tmp_path / "AGENTS.md").write_text("x" * (MAX_INSTRUCTION_BYTES + 10))
    [f] = find_instruction_files(tmp_path, tmp_path)
    assert f.truncated and f.text.endswith(f"of {MAX_INSTRUCTION_BYTES + 10}]")


def test_git_facts(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "feature-x")
    (repo / "a.py").write_text("print(1)\n")
    facts = collect_facts(repo, now=0)
    assert facts.branch is None  # no commit yet: HEAD is unborn
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    (repo / "a.py").write_text("print(2)\n")
    (repo / "b.py").write_text("new\n")
    facts = collect_facts(repo)
    assert facts.branch == "feature-x"
    assert sorted(facts.changed) == ["a.py", "b.py"]
    text = facts.render()
    assert "feature-x" in text and "a.py" in text and text.startswith("Today is ")
    assert collect_facts(tmp_path).branch is None  # not a repository: no branch, no error
