"""The default command: run the agent (interactive, or headless with -p/-f)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds4_agent.agent import wiring
from ds4_agent.agent.cmd_common import CommandError, fail
from ds4_agent.agent.cmd_sessions import store_for
from ds4_agent.agent.context import current_branch
from ds4_agent.agent.headless import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, StreamWriter
from ds4_agent.agent.kvstate import KVSnapshots
from ds4_agent.agent.loop import Agent, AgentEvents, Interrupted, LoopConfig
from ds4_agent.agent.paths import find_repo
from ds4_agent.sessions.session import Session, SessionError, SessionStore


class UsageProblem(Exception):
    """Bad flag combination: one line, exit 2."""


def read_task(args: argparse.Namespace, stdin: Any = None) -> str | None:
    """The headless task from -p TEXT, -p - (stdin) or -f FILE; None when interactive.

    With -p TEXT and data piped on stdin, the piped data is context for the task
    (`git diff | ds4-agent -p "review this"`).
    """
    stdin = stdin or sys.stdin
    prompt, task_file = getattr(args, "prompt", None), getattr(args, "task_file", None)
    if prompt is not None and task_file:
        raise UsageProblem("give the task either with -p or with -f, not both")
    if task_file:
        try:
            task = Path(task_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageProblem(f"cannot read the task file {task_file}: {e.strerror}") from None
    elif prompt == "-":
        task = stdin.read()
    elif prompt is not None:
        task = prompt
        if not stdin.isatty():
            piped = stdin.read()
            if piped.strip():
                task = f"{task}\n\n<stdin>\n{piped.rstrip()}\n</stdin>"
    else:
        return None
    if not task.strip():
        raise UsageProblem("the task is empty; pass a task with -p TEXT, -p - or -f FILE")
    return task


def pick_session(
    store: SessionStore, args: argparse.Namespace, branch: str | None, interactive: bool
) -> tuple[Session, bool]:
    """(session, is_new). Applies -n, -c, -r and --fork-session."""
    name, resume = getattr(args, "name", None), getattr(args, "resume", None)
    cont, fork = getattr(args, "continue_", False), getattr(args, "fork_session", False)
    if cont and resume is not None:
        raise UsageProblem("use either -c/--continue or -r/--resume, not both")
    if fork and not (cont or resume is not None):
        raise UsageProblem("--fork-session needs -c/--continue or -r/--resume NAME")
    if cont or resume is not None:
        if cont:
            s = store.latest()
            if s is None:
                raise SessionError(
                    "no session to continue in this repository; start one with `ds4-agent`"
                )
        elif resume == "":
            if not interactive:
                raise UsageProblem("headless --resume needs a NAME or ID (there is no picker)")
            s = _picker(store)
        else:
            s = store.resolve(resume)
        if fork:
            s = store.fork(s.meta.id, name)
        elif name:
            s = store.rename(s.meta.id, name)
        return s, False
    mode = getattr(args, "thinking_mode", None) or "thinking"
    return store.create(name, branch=branch, thinking_mode=mode), True


def _picker(store: SessionStore) -> Session:
    from ds4_agent.agent.ui_picker import pick

    chosen = pick(store.list())
    if chosen is None:
        raise UsageProblem("no session chosen")
    return store.open(chosen)


@dataclass
class Runtime:
    engine: Any
    tokenizer: Any
    tools: Any
    kv: KVSnapshots | None
    model_dir: Path


def load_runtime(args: argparse.Namespace, root: Path) -> Runtime:
    model_dir = wiring.resolve_model_dir(getattr(args, "model", None))
    engine = wiring.load_engine(model_dir)
    tokenizer = wiring.load_tokenizer(model_dir)
    tools = wiring.build_tools(
        root,
        mode=getattr(args, "permission_mode", None),
        allow=getattr(args, "allow", None) or [],
        deny=getattr(args, "deny", None) or [],
    )
    store = wiring.open_snapshot_store()
    kv = KVSnapshots(engine, store) if store is not None else None
    return Runtime(engine, tokenizer, tools, kv, model_dir)


def loop_config(args: argparse.Namespace, session: Session) -> LoopConfig:
    cfg = LoopConfig(thinking_mode=session.meta.thinking_mode)
    if getattr(args, "ctx", None):
        cfg.ctx_limit = int(args.ctx)
    if getattr(args, "max_turns", None):
        cfg.max_tool_rounds = int(args.max_turns)
    return cfg


def make_agent(
    rt: Runtime, session: Session, cfg: LoopConfig, events: AgentEvents, sampler: Any = None
) -> Agent:
    return Agent(
        rt.engine,
        rt.tokenizer,
        rt.tools,
        session,
        sampler=sampler if sampler is not None else wiring.default_sampler(),
        config=cfg,
        events=events,
    )


def system_prefix_tokens(agent: Agent, root: Path) -> tuple[list[int], str]:
    from ds4_agent.agent.runtime import system_text

    text = system_text(root, Path.cwd())
    schemas = agent.tools.schemas() if agent.tools is not None else []
    effort = "max" if agent.cfg.thinking_mode == "max" else None
    return agent.render.system_prefix(text, schemas, reasoning_effort=effort), text


def check_flags(args: argparse.Namespace) -> None:
    """Flag values that argparse cannot check: usage errors (exit 2), one line each."""
    from ds4_agent.tools.permissions import Rule, RuleError, parse_mode

    try:
        if getattr(args, "permission_mode", None):
            args.permission_mode = parse_mode(args.permission_mode)
        for rule in [*(getattr(args, "allow", None) or []), *(getattr(args, "deny", None) or [])]:
            Rule.parse(rule, "the command line")
    except RuleError as e:
        raise UsageProblem(str(e)) from None
    if getattr(args, "max_turns", None) is not None and args.max_turns < 1:
        raise UsageProblem("--max-turns must be at least 1")
    if getattr(args, "ctx", None) is not None and args.ctx < 1024:
        raise UsageProblem("--ctx must be at least 1024 tokens")


def run(
    args: argparse.Namespace,
    *,
    runtime: Runtime | None = None,
    sampler: Any = None,
    out: Any = None,
    stdin: Any = None,
) -> int:
    """The default command. `runtime`, `sampler`, `out` and `stdin` let an embedding program
    (or a test) supply an already loaded engine, a sampler, and the streams."""
    try:
        check_flags(args)
        task = read_task(args, stdin)
        repo = find_repo()
        store = store_for()
        branch = current_branch(repo.root) if repo.is_git else None
        if task is None:
            if getattr(args, "output_format", "text") != "text":
                raise UsageProblem("--output-format needs a headless run (-p TASK or -f FILE)")
            from ds4_agent.agent.ui import run_interactive

            session, is_new = pick_session(store, args, branch, interactive=True)
            rt = runtime or load_runtime(args, repo.root)
            return run_interactive(args, rt, session, is_new, repo.root)
        session, is_new = pick_session(store, args, branch, interactive=False)
        rt = runtime or load_runtime(args, repo.root)
        return run_headless(args, rt, session, is_new, repo.root, task, sampler=sampler, out=out)
    except UsageProblem as e:
        return fail(str(e), EXIT_USAGE)
    except (CommandError, SessionError) as e:
        return fail(str(e), EXIT_ERROR)


def run_headless(
    args: argparse.Namespace,
    rt: Runtime,
    session: Session,
    is_new: bool,
    root: Path,
    task: str,
    sampler: Any = None,
    out: Any = None,
) -> int:
    from ds4_agent.agent.headless_run import (
        HeadlessEvents,
        SignalInterrupt,
        build_result,
        init_event,
    )
    from ds4_agent.agent.runtime import StartInfo, attach_compaction, autosave, start

    out = out or sys.stdout
    fmt = getattr(args, "output_format", "text")
    started = time.monotonic()
    stream = StreamWriter(out) if fmt == "stream-json" else None
    events = HeadlessEvents(session_id=session.meta.id, stream=stream)
    agent = make_agent(rt, session, loop_config(args, session), events, sampler)
    attach_compaction(agent, rt.kv)
    info = StartInfo()
    turn = None
    error: str | None = None
    with SignalInterrupt(agent.interrupt.set) as sig:
        try:
            if is_new:
                tokens, text = system_prefix_tokens(agent, root)
                info = start(agent, rt.kv, tokens, text)
            else:
                info = start(agent, rt.kv)
            if stream is not None:
                names = [s["function"]["name"] for s in (rt.tools.schemas() if rt.tools else [])]
                stream.emit(
                    init_event(
                        session.meta.id,
                        session.meta.name,
                        str(root),
                        str(rt.model_dir),
                        names,
                        getattr(args, "permission_mode", None) or "ask",
                        info,
                    )
                )
            turn = agent.run_turn(task)
            events.finish()
            autosave(agent, rt.kv)
        except Interrupted:
            error = "interrupted by the user while restoring the session"
        except Exception as e:  # noqa: BLE001 - reported in the result, exit 1
            error = f"{e.__class__.__name__}: {e}"
    result = build_result(
        turn,
        session_id=session.meta.id,
        session_name=session.meta.name,
        start=info,
        started_at=started,
        engine_s=0.0,
        error=error,
        interrupted=sig.fired,
    )
    if fmt == "text":
        if result.result:
            out.write(result.result.rstrip() + "\n")
        if result.is_error:
            sys.stderr.write(f"ds4-agent: {result.error or result.subtype}\n")
    else:
        out.write(result.model_dump_json() + "\n")
    out.flush()
    if sig.fired and result.exit_code == 0:
        return EXIT_INTERRUPTED
    return result.exit_code
