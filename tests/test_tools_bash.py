"""Bash, BashOutput and KillShell: environment, timeouts with process-group kill, bounded output,
background jobs, cancellation and cleanup."""

from __future__ import annotations

import re
import threading
import time
import tracemalloc

import pytest
from ds4_agent.tools.context import ToolContext
from tools_helpers import Harness, pid_alive


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_runs_in_workspace_with_noninteractive_env(h):
    text = h.ok(
        "Bash",
        command='pwd; echo "$PAGER $GIT_PAGER $GIT_TERMINAL_PROMPT"; read x && echo "got:$x" || echo stdin-closed',
    )
    lines = text.split("\n")
    assert lines[0] == str(h.root)
    assert lines[1] == "cat cat 0"
    assert lines[2] == "stdin-closed"
    assert re.fullmatch(r"\[exit code 0, [0-9.]+ s\]", lines[-1])


def test_no_controlling_terminal(h):
    text = h.ok("Bash", command="(exec 3</dev/tty && echo has-tty) 2>/dev/null || echo no-tty")
    assert text.startswith("no-tty")


def test_exit_code_and_stderr_merged(h):
    res = h("Bash", command="echo out; echo err >&2; exit 7")
    assert res.is_error
    assert res.text.split("\n")[:2] == ["out", "err"]
    assert "[exit code 7" in res.text


def test_no_output(h):
    assert h.ok("Bash", command="true").startswith("(no output)\n[exit code 0")


def test_ansi_colors_stripped(h):
    assert h.ok("Bash", command=r"printf '\033[31mred\033[0m\n'").startswith("red\n")


def test_timeout_kills_term_ignoring_process_and_children(h):
    h.reg.limits.bash_kill_grace_s = 0.3
    h.reg.jobs.kill_grace_s = 0.3
    cmd = "trap '' TERM; sleep 60 & echo child=$!; echo shell=$$; while true; do sleep 0.1; done"
    t0 = time.monotonic()
    res = h("Bash", command=cmd, timeout=1000)
    elapsed = time.monotonic() - t0
    assert res.is_error
    assert "timed out after 1 s" in res.text and "child processes were killed" in res.text
    assert elapsed < 5, elapsed
    child = int(re.search(r"child=(\d+)", res.text).group(1))
    shell = int(re.search(r"shell=(\d+)", res.text).group(1))
    deadline = time.monotonic() + 3
    while (pid_alive(child) or pid_alive(shell)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child) and not pid_alive(shell)


def test_leftover_background_children_do_not_hang_foreground(h):
    t0 = time.monotonic()
    res = h("Bash", command="sleep 60 & echo started")
    assert time.monotonic() - t0 < 5
    assert res.text.startswith("started")
    assert "background processes it left running were killed" in res.text


def test_timeout_over_maximum_refused(h):
    msg = h.err("Bash", command="true", timeout=10_000_000)
    assert "maximum" in msg and "run_in_background" in msg


@pytest.mark.slow
def test_50mb_output_memory_bounded_and_truncation_reported(h):
    tracemalloc.start()
    try:
        res = h(
            "Bash",
            command="yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c 52428800",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak Python memory {peak} bytes"
    assert len(res.text) < 40_000
    m = re.search(
        r"\[\.\.\. output truncated: (\d+) lines \(([\d.]+) MiB\) omitted of (\d+) lines \(50\.0 MiB\); full output saved to (\S+),",
        res.text,
    )
    assert m, res.text[14900:15500]
    saved = m.group(4)
    assert int(m.group(3)) == 52428800 // 63
    # The saved file holds everything and the model can read it.
    page = h.ok("Read", file_path=saved, offset=800_000, limit=2)
    assert page.startswith("800000\t0123456789abc")


def test_background_job_lifecycle(h):
    marker = h.root / "go"
    text = h.ok(
        "Bash",
        command=f"echo first; while [ ! -e {marker} ]; do sleep 0.05; done; echo second; sleep 60",
        run_in_background=True,
    )
    job = re.search(r"job (bash_\d+)", text).group(1)
    assert f"bash_id={job}" in text
    j = h.reg.jobs.jobs[job]
    wait_until(lambda: j.total_lines >= 1)
    out1 = h.ok("BashOutput", bash_id=job)
    assert out1.startswith("first\n") and "still running" in out1 and "KillShell" in out1
    marker.write_text("")
    wait_until(lambda: j.total_lines >= 2)
    out2 = h.ok("BashOutput", bash_id=job)
    assert out2.startswith("second\n") and "first" not in out2  # only what is new
    out3 = h.ok("BashOutput", bash_id=job)
    assert out3.startswith("(no new output)")
    pid = h.reg.jobs.jobs[job].pid
    killed = h.ok("KillShell", shell_id=job)
    assert f"Stopped {job}" in killed
    assert not pid_alive(pid)
    after = h.ok("BashOutput", bash_id=job)
    assert "was stopped" in after
    assert "already finished" in h.ok("KillShell", shell_id=job)
    msg = h.err("BashOutput", bash_id="bash_99")
    assert "known jobs" in msg and job in msg


def test_background_job_finishes_and_timeout_watchdog(h):
    text = h.ok("Bash", command="echo done-bg", run_in_background=True)
    job = re.search(r"job (bash_\d+)", text).group(1)
    h.reg.jobs.jobs[job].finished.wait(5)
    assert "[exit code 0" in h.ok("BashOutput", bash_id=job)
    # A background job's timeout is enforced even if nobody polls it.
    text = h.ok("Bash", command="sleep 60", run_in_background=True, timeout=300)
    job = re.search(r"job (bash_\d+)", text).group(1)
    assert h.reg.jobs.jobs[job].finished.wait(5)
    assert "timed out" in h.ok("BashOutput", bash_id=job)


def test_cancel_stops_running_command(h):
    ctx = ToolContext()
    timer = threading.Timer(0.3, ctx.cancel.set)
    timer.start()
    t0 = time.monotonic()
    res = h.reg.call("Bash", {"command": "sleep 30"}, ctx)
    assert time.monotonic() - t0 < 5
    assert res.is_error and "interrupted by the user" in res.text


def test_output_filter(h):
    text = h.ok("Bash", command="printf 'a1\\nb2\\na3\\n'", run_in_background=True)
    job = re.search(r"job (bash_\d+)", text).group(1)
    h.reg.jobs.jobs[job].finished.wait(5)
    assert h.ok("BashOutput", bash_id=job, filter="^a").startswith("a1\na3\n")


def test_job_files_cleaned_up(h):
    h.ok("Bash", command="echo small")
    scratch = h.reg.workspace.scratch_dir()
    assert list(scratch.iterdir()) == []  # output that fit was not kept
    h.reg.limits.output_max_chars = 100
    res = h("Bash", command="seq 1 1000")
    assert "output truncated" in res.text and "saved to" in res.text
    assert len(list(scratch.iterdir())) == 1
    h.ok("Bash", command="sleep 60", run_in_background=True)
    h.reg.close()
    assert not scratch.exists()


def test_carriage_return_progress_lines_collapsed(h):
    text = h.ok("Bash", command=r"printf 'progress 10%%\rprogress 50%%\rprogress 100%%\ndone\n'")
    assert text.startswith("progress 100%\ndone\n")


def test_background_job_cap(h, monkeypatch):
    from ds4_agent.tools import bash

    monkeypatch.setattr(bash, "MAX_BACKGROUND_JOBS", 2)
    h.ok("Bash", command="sleep 30", run_in_background=True)
    h.ok("Bash", command="sleep 30", run_in_background=True)
    assert "already running" in h.err("Bash", command="sleep 30", run_in_background=True)


def test_output_tools_refuse_foreground_jobs(h):
    h.ok("Bash", command="echo fg")
    msg = h.err("BashOutput", bash_id="bash_1")
    assert "foreground" in msg and "run_in_background" in msg


def test_close_kills_all_jobs_within_one_grace_period(h):
    h.reg.jobs.kill_grace_s = 1.0  # one job at a time would need 4 s
    pids = []
    for _ in range(4):
        text = h.ok("Bash", command="trap '' TERM; sleep 60", run_in_background=True)
        job = re.search(r"job (bash_\d+)", text).group(1)
        pids.append(h.reg.jobs.jobs[job].pid)
    time.sleep(0.2)  # let the shells install their trap
    t0 = time.monotonic()
    h.reg.close()
    assert time.monotonic() - t0 < 3.0
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=3)
