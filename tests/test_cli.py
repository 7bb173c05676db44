"""The CLI skeleton: help, version, usage errors, and the install layout."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ds4_agent.agent.cli import GROUPS, main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ds4_agent.agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_group():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in GROUPS:
        assert name in r.stdout


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("ds4-agent ")


def test_unknown_flag_is_a_one_line_usage_error():
    r = run_cli("--bogus")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--bogus" in lines[0]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_help(group, capsys):
    with pytest.raises(SystemExit) as e:
        main([group, "--help"])
    assert e.value.code == 0
    assert group in capsys.readouterr().out


def test_unknown_flag_in_a_group_exits_2(capsys):
    assert main(["doctor", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err


def test_generic_names_are_not_importable_from_the_install():
    # Run from a neutral directory so the source tree is not on sys.path.
    r = subprocess.run(
        [sys.executable, "-c", "import ds4_agent.agent, ds4_agent.engine; import agent"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert r.returncode != 0
    assert "No module named 'agent'" in r.stderr
