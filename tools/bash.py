"""Bash, BashOutput and KillShell: the model's view of shell jobs."""

from __future__ import annotations

from pydantic import Field

from .context import ToolContext, ToolEnv
from .files import Args
from .jobs import Job
from .result import ToolError, ToolResult
from .textutil import strip_ansi

MAX_BACKGROUND_JOBS = 16


class BashArgs(Args):
    command: str = Field(min_length=1)
    timeout: int | None = Field(default=None, ge=1)  # milliseconds, as in Claude Code's Bash
    description: str | None = None
    run_in_background: bool = False


class BashOutputArgs(Args):
    bash_id: str
    filter: str | None = None


class KillShellArgs(Args):
    shell_id: str


def _decode(data: bytes) -> str:
    text = strip_ansi(data.decode("utf-8", errors="replace")).replace("\r\n", "\n")
    if "\r" in text:
        # Progress bars redraw a line with "\r"; show each line as a terminal would end up.
        text = "\n".join(ln.rstrip("\r").rsplit("\r", 1)[-1] for ln in text.split("\n"))
    return text


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def render_output(env: ToolEnv, job: Job) -> tuple[str, bool]:
    """The job's whole output, or its head and tail with an explicit truncation line."""
    rest = job.total_bytes - len(job.head)
    if rest <= len(job.tail):
        data = bytes(job.head) + (bytes(job.tail[len(job.tail) - rest :]) if rest > 0 else b"")
        return _decode(data), False
    head = bytes(job.head)
    tail = bytes(job.tail)
    # Cut at line boundaries so no partial line reads as a whole one.
    if b"\n" in head:
        head = head[: head.rfind(b"\n") + 1]
    if b"\n" in tail and len(tail) < job.total_bytes - len(head):
        tail = tail[tail.find(b"\n") + 1 :]
    omitted_bytes = job.total_bytes - len(head) - len(tail)
    omitted_lines = max(0, job.total_lines - head.count(b"\n") - tail.count(b"\n"))
    saved = env.workspace.display(job.out_path)
    stored = ""
    if job.stored_bytes < job.total_bytes:
        stored = f" (the file keeps only the first {_fmt_bytes(job.stored_bytes)})"
    marker = (
        f"\n[... output truncated: {omitted_lines} lines ({_fmt_bytes(omitted_bytes)}) omitted of "
        f"{job.total_lines} lines ({_fmt_bytes(job.total_bytes)}); full output saved to {saved}{stored}, "
        f"Read it with offset/limit or Grep it ...]\n"
    )
    return _decode(head) + marker + _decode(tail), True


def status_line(job: Job) -> str:
    secs = f"{job.elapsed():.1f} s"
    if job.running:
        return f"[{job.id} still running after {secs}]"
    reason = job.end_reason
    if reason == "timeout":
        return f"[timed out after {job.timeout_s:g} s: the command and its child processes were killed; raise timeout or use run_in_background]"
    if reason == "interrupted":
        return f"[interrupted by the user after {secs}; the command and its child processes were killed]"
    if reason == "killed":
        return f"[{job.id} was stopped after {secs}; exit code {job.exit_code}]"
    note = ""
    if reason == "stragglers":
        note = (
            "; background processes it left running were killed (use run_in_background for servers)"
        )
    return f"[exit code {job.exit_code}, {secs}{note}]"


def tool_bash(args: BashArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    lim = env.limits
    timeout_ms = (
        args.timeout
        if args.timeout is not None
        else (None if args.run_in_background else lim.bash_default_timeout_ms)
    )
    if (
        timeout_ms is not None
        and timeout_ms > lim.bash_max_timeout_ms
        and not args.run_in_background
    ):
        raise ToolError(
            f"Bash: timeout {timeout_ms} ms is over the {lim.bash_max_timeout_ms} ms maximum; pass a smaller timeout or set run_in_background=true"
        )
    running = sum(1 for j in env.jobs.jobs.values() if j.running)
    if args.run_in_background and running >= MAX_BACKGROUND_JOBS:
        raise ToolError(
            f"Bash: {running} background jobs are already running; stop one with KillShell before starting another"
        )
    cap = lim.output_max_chars
    try:
        job = env.jobs.start(
            args.command,
            env.workspace.root,
            timeout_s=None if timeout_ms is None else timeout_ms / 1000,
            background=args.run_in_background,
            head_cap=cap // 2 if cap > 1 else cap,
            tail_cap=cap - cap // 2,
        )
    except OSError as e:
        raise ToolError(
            f"Bash: could not start the shell ({e}); check that bash or /bin/sh exists"
        ) from None
    if args.run_in_background:
        return ToolResult(
            f"Started background job {job.id} (pid {job.pid}). Use BashOutput with bash_id={job.id} to see its output "
            f"and status, and KillShell with shell_id={job.id} to stop it.",
            display={"kind": "job", "job": job.id, "pid": job.pid, "command": args.command},
        )
    # Foreground: wait, but let the agent's Ctrl+C stop it.
    while not job.finished.wait(0.05):
        if ctx.cancel.is_set():
            env.jobs.kill(job, "interrupted")
            break
    job.finished.wait()
    text, truncated = render_output(env, job)
    env.jobs.release_output(job, keep=truncated)
    job.head, job.tail = bytearray(), bytearray()  # returned; do not hold it for the session
    body = text if text.strip() else "(no output)"
    if not body.endswith("\n"):
        body += "\n"
    failed = job.end_reason in ("timeout", "interrupted") or (job.exit_code not in (0, None))
    return ToolResult(
        body + status_line(job),
        is_error=failed,
        display={
            "kind": "shell",
            "job": job.id,
            "description": args.description,
            "exit_code": job.exit_code,
            "end_reason": job.end_reason,
            "truncated": truncated,
        },
    )


def _get_job(env: ToolEnv, job_id: str, tool: str) -> Job:
    job = env.jobs.jobs.get(job_id.strip())
    if job is not None and not job.background:
        raise ToolError(
            f"{tool}: {job.id} ran in the foreground and its output was already returned; {tool} is for jobs started with run_in_background"
        )
    if job is None:
        known = ", ".join(j.id for j in env.jobs.jobs.values() if j.background) or "none"
        raise ToolError(
            f"{tool}: no job with id '{job_id}' (known jobs: {known}); pass an id that Bash returned"
        )
    return job


def _new_output(env: ToolEnv, job: Job, flt: str | None) -> tuple[str, bool]:
    """Output added since the last look, capped with head and tail."""
    end = job.total_bytes
    start = job.seen_bytes
    cap = env.limits.output_max_chars
    stored_end = min(end, job.stored_bytes)
    truncated = False
    if stored_end - start <= cap:
        data = env.jobs.read_range(job, start, stored_end)
        text = _decode(data)
    else:
        half = cap // 2
        head = env.jobs.read_range(job, start, start + half)
        tail = env.jobs.read_range(job, stored_end - half, stored_end)
        omitted = stored_end - start - 2 * half
        text = (
            _decode(head)
            + f"\n[... output truncated: {_fmt_bytes(omitted)} omitted; full output saved to "
            + f"{env.workspace.display(job.out_path)}, Read it with offset/limit or Grep it ...]\n"
            + _decode(tail)
        )
        truncated = True
    job.seen_bytes = end
    if flt:
        import re

        try:
            rx = re.compile(flt)
        except re.error as e:
            raise ToolError(
                f"BashOutput: filter is not a valid regular expression ({e}); fix or omit it"
            ) from None
        text = "\n".join(ln for ln in text.split("\n") if rx.search(ln))
    return text, truncated


def tool_bash_output(args: BashOutputArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    job = _get_job(env, args.bash_id, "BashOutput")
    running = job.running
    text, _ = _new_output(env, job, args.filter)
    body = text if text.strip() else "(no new output)"
    if not body.endswith("\n"):
        body += "\n"
    hint = (
        f"\nUse BashOutput again later, or KillShell with shell_id={job.id} to stop it."
        if running
        else ""
    )
    return ToolResult(
        f"{body}{status_line(job)}{hint}",
        display={"kind": "job", "job": job.id, "running": running, "exit_code": job.exit_code},
    )


def tool_kill_shell(args: KillShellArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    job = _get_job(env, args.shell_id, "KillShell")
    if not job.running:
        return ToolResult(f"{job.id} had already finished. {status_line(job)}")
    env.jobs.kill(job, "killed")
    text, _ = _new_output(env, job, None)
    tail = text[-2000:] if text.strip() else "(no new output)"
    return ToolResult(
        f"Stopped {job.id} (process group killed).\nLast output:\n{tail}\n{status_line(job)}"
    )
