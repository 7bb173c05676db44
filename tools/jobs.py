"""Shell jobs: one process group per command, output spooled to a file with bounded memory.

Every command runs in its own session (no controlling terminal, so nothing can prompt), with
stdin closed and pagers disabled. Output from stdout and stderr goes through one pipe into a
file; memory holds only a head and a tail of it, whatever the command prints. A watchdog thread
enforces the timeout even for background jobs nobody polls, by killing the whole process group
(SIGTERM, a short grace, then SIGKILL, so children that ignore SIGTERM die too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NONINTERACTIVE_ENV = {
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "MANPAGER": "cat",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_EDITOR": "true",
    "EDITOR": "true",
    "VISUAL": "true",
    "TERM": "dumb",
    "NO_COLOR": "1",
    "CLICOLOR": "0",
    "PIP_NO_INPUT": "1",
    "DEBIAN_FRONTEND": "noninteractive",
    "PYTHONUNBUFFERED": "1",
}

FILE_CAP = 256 * 1024 * 1024  # bytes kept on disk per job; the rest is counted, not stored
KEEP_BYTES = 512 * 1024 * 1024  # all kept foreground output files together


def shell_argv(command: str) -> list[str]:
    shell = shutil.which("bash") or "/bin/sh"
    return [shell, "-c", command]


@dataclass
class Job:
    id: str
    command: str
    cwd: Path
    out_path: Path
    head_cap: int
    tail_cap: int
    timeout_s: float | None
    background: bool
    proc: subprocess.Popen[bytes] | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    head: bytearray = field(default_factory=bytearray)
    tail: bytearray = field(default_factory=bytearray)
    total_bytes: int = 0
    total_lines: int = 0
    head_lines: int = 0
    stored_bytes: int = 0
    seen_bytes: int = 0  # how far BashOutput has shown the output
    exit_code: int | None = None
    end_reason: str | None = None  # "timeout", "killed", "interrupted", "stragglers"
    finished: threading.Event = field(default_factory=threading.Event)
    reader_done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    @property
    def running(self) -> bool:
        return not self.finished.is_set()

    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def _append(self, chunk: bytes, fh) -> None:
        with self._lock:
            if self.stored_bytes < FILE_CAP:
                part = chunk[: FILE_CAP - self.stored_bytes]
                fh.write(part)
                self.stored_bytes += len(part)
            room = self.head_cap - len(self.head)
            if room > 0:
                self.head += chunk[:room]
                self.head_lines += chunk[:room].count(b"\n")
            self.tail += chunk
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]
            self.total_bytes += len(chunk)
            self.total_lines += chunk.count(b"\n")


class JobManager:
    """Starts, watches, stops and cleans up shell jobs for one workspace."""

    def __init__(
        self,
        scratch: Callable[[], Path],
        env_overrides: dict[str, str] | None = None,
        keep_files: int = 20,
        kill_grace_s: float = 1.0,
    ) -> None:
        self._scratch = scratch  # returns the directory for output files (created lazily)
        self.env_overrides = dict(env_overrides or {})
        self.keep_files = keep_files
        self.kill_grace_s = kill_grace_s
        self.jobs: dict[str, Job] = {}
        self._counter = 0
        self._kept: list[Path] = []
        self._lock = threading.Lock()

    # ---- starting -------------------------------------------------------------------------

    def start(
        self,
        command: str,
        cwd: Path,
        *,
        timeout_s: float | None,
        background: bool,
        head_cap: int,
        tail_cap: int,
    ) -> Job:
        if os.name != "posix":
            raise OSError("shell jobs need a POSIX system (macOS or Linux)")
        with self._lock:
            self._counter += 1
            job_id = f"bash_{self._counter}"
        out_path = Path(self._scratch()) / f"{job_id}.log"
        job = Job(job_id, command, cwd, out_path, head_cap, tail_cap, timeout_s, background)
        env = {**os.environ, **NONINTERACTIVE_ENV, **self.env_overrides}
        read_fd, write_fd = os.pipe()
        try:
            job.proc = subprocess.Popen(
                shell_argv(command),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                start_new_session=True,  # own process group, no controlling terminal
                close_fds=True,
            )
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        os.close(write_fd)
        self.jobs[job_id] = job
        threading.Thread(
            target=self._read, args=(job, read_fd), daemon=True, name=f"{job_id}-read"
        ).start()
        threading.Thread(
            target=self._watch, args=(job,), daemon=True, name=f"{job_id}-watch"
        ).start()
        return job

    def _read(self, job: Job, fd: int) -> None:
        try:
            with open(job.out_path, "wb", buffering=0) as fh:
                while True:
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    job._append(chunk, fh)
        finally:
            os.close(fd)
            job.reader_done.set()

    def _watch(self, job: Job) -> None:
        assert job.proc is not None
        deadline = None if job.timeout_s is None else job.started + job.timeout_s
        while True:
            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            try:
                job.exit_code = job.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                pass
            if job.finished.is_set():  # stopped by kill()
                return
            if deadline is not None and time.monotonic() >= deadline:
                self._kill_group(job, "timeout")
                return
        # The shell exited. Children it left behind may still hold the pipe open; a foreground
        # command's result must not wait on them forever.
        if (
            not job.reader_done.wait(self.kill_grace_s if not job.background else 0.5)
            and not job.background
        ):
            self._kill_group(job, "stragglers", keep_exit=True)
            return
        job.reader_done.wait()
        self._finish(job)

    def _finish(self, job: Job) -> None:
        if job.ended is None:
            job.ended = time.monotonic()
        job.finished.set()

    def _kill_group(
        self, job: Job, reason: str, keep_exit: bool = False, grace: float | None = None
    ) -> None:
        """SIGTERM the process group, give it a grace period, then SIGKILL what is left."""
        assert job.proc is not None
        if job.end_reason is None:
            job.end_reason = reason
        pgid = job.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            code = job.proc.wait(timeout=self.kill_grace_s if grace is None else grace)
        except subprocess.TimeoutExpired:
            code = None
        # Children may ignore SIGTERM even when the shell did not: always finish with SIGKILL.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if code is None:
            code = job.proc.wait()
        if not keep_exit or job.exit_code is None:
            job.exit_code = code
        job.reader_done.wait(5.0)
        self._finish(job)

    # ---- stopping and cleanup -------------------------------------------------------------

    def kill(self, job: Job, reason: str = "killed") -> None:
        if job.finished.is_set():
            return
        self._kill_group(job, reason)

    def release_output(self, job: Job, keep: bool) -> None:
        """Delete a job's output file, or keep it for the model (only the newest few are kept)."""
        if not keep:
            with contextlib.suppress(OSError):
                job.out_path.unlink()
            return
        self._kept.append(job.out_path)

        def kept_bytes() -> int:
            return sum(p.stat().st_size for p in self._kept if p.exists())

        # Newest files win: at most keep_files of them and KEEP_BYTES on disk together.
        while len(self._kept) > 1 and (
            len(self._kept) > self.keep_files or kept_bytes() > KEEP_BYTES
        ):
            old = self._kept.pop(0)
            with contextlib.suppress(OSError):
                old.unlink()

    def close(self) -> None:
        """Kill every running job and delete every output file."""
        running = [j for j in self.jobs.values() if j.running and j.proc is not None]
        # One shared grace period: SIGTERM everyone first, so closing with many jobs that
        # ignore SIGTERM takes one grace period, not one per job.
        for job in running:
            job.end_reason = job.end_reason or "killed"
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace_s
        for job in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for job in running:
            self._kill_group(job, "killed", grace=0.0)
        for job in self.jobs.values():
            with contextlib.suppress(OSError):
                job.out_path.unlink()
        self.jobs.clear()
        self._kept.clear()

    # ---- output -----------------------------------------------------------------------------

    def read_range(self, job: Job, start: int, end: int) -> bytes:
        with open(job.out_path, "rb") as fh:
            fh.seek(start)
            return fh.read(max(0, end - start))
