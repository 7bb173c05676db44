"""`ds4-agent sessions …`: manage the named sessions of this repository."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ds4_agent.agent.cmd_common import fail
from ds4_agent.agent.paths import find_repo
from ds4_agent.sessions.session import SessionError, SessionStore
from ds4_agent.sessions.session_export import age, export_json, export_text, meta_summary


def store_for(cwd: Path | None = None) -> SessionStore:
    """The session store of the repository containing `cwd` (git top level, else cwd)."""
    repo = find_repo(cwd)
    return SessionStore(repo.sessions_dir(), str(repo.root))


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _list(args: argparse.Namespace) -> int:
    metas = store_for().list()
    if args.format == "json":
        _out(json.dumps([meta_summary(m) for m in metas], ensure_ascii=False, indent=1))
        return 0
    if not metas:
        _out("no sessions in this repository yet (start one with `ds4-agent -n NAME`)")
        return 0
    rows = [
        (m.name, m.id[:8], age(m.updated), f"{m.n_tokens}", f"{m.n_turns}", m.title[:60])
        for m in metas
    ]
    head = ("NAME", "ID", "UPDATED", "TOKENS", "TURNS", "TITLE")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    for r in [head, *rows]:
        _out("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    return 0


def _show(args: argparse.Namespace) -> int:
    s = store_for().resolve(args.session)
    if args.format == "json":
        _out(json.dumps(meta_summary(s.meta), ensure_ascii=False, indent=1))
        return 0
    m = s.meta
    for k, v in [
        ("name", m.name),
        ("id", m.id),
        ("title", m.title or "-"),
        ("repo", m.repo),
        ("branch", m.branch or "-"),
        ("updated", age(m.updated)),
        ("tokens", m.n_tokens),
        ("turns", m.n_turns),
        ("thinking", m.thinking_mode),
        ("model", m.model_fingerprint or "-"),
        ("snapshot", f"{m.snapshot.n_tokens} tokens" if m.snapshot else "none"),
        ("forked from", m.parent_id or "-"),
    ]:
        _out(f"{k:<12} {v}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    m = store_for().remove(args.session)
    _unpin_snapshots(m.id)
    if args.format == "json":
        _out(json.dumps({"removed": meta_summary(m)}, ensure_ascii=False))
    else:
        _out(f"removed session {m.name} ({m.id[:8]})")
    return 0


def _unpin_snapshots(session_id: str) -> None:
    """The removed session no longer keeps its KV snapshots from eviction."""
    try:
        from ds4_agent.agent.wiring import open_snapshot_store

        store = open_snapshot_store()
        if store is not None:
            store.unpin(None, session_id)
    except Exception:  # noqa: BLE001 - the session is gone either way; gc cleans up later
        pass


def _rename(args: argparse.Namespace) -> int:
    s = store_for().rename(args.session, args.new_name)
    if args.format == "json":
        _out(json.dumps(meta_summary(s.meta), ensure_ascii=False))
    else:
        _out(f"renamed to {s.meta.name} ({s.meta.id[:8]})")
    return 0


def _fork(args: argparse.Namespace) -> int:
    s = store_for().fork(args.session, args.new_name)
    if args.format == "json":
        _out(json.dumps(meta_summary(s.meta), ensure_ascii=False))
    else:
        _out(f"forked {args.session} as {s.meta.name} ({s.meta.id[:8]})")
    return 0


def _export(args: argparse.Namespace) -> int:
    s = store_for().resolve(args.session)
    text = export_json(s) if args.format == "json" else export_text(s, args.include_system)
    if args.output:
        Path(args.output).write_text(text if text.endswith("\n") else text + "\n")
    else:
        _out(text)
    return 0


def _guard(func):  # noqa: ANN001, ANN202 - a thin wrapper around handlers
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except SessionError as e:
            return fail(str(e))

    return run


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def cmd(name: str, help_: str, func, *session_args: str) -> argparse.ArgumentParser:  # noqa: ANN001
        s = sub.add_parser(name, help=help_, description=help_)
        for a in session_args:
            s.add_argument(a)
        s.add_argument("--format", choices=["text", "json"], default="text")
        s.set_defaults(func=_guard(func))
        return s

    cmd("list", "list the sessions of this repository, newest first", _list)
    cmd("show", "show one session's metadata", _show, "session")
    cmd("rm", "remove a session (its transcript and metadata)", _rm, "session")
    cmd("rename", "rename a session", _rename, "session", "new_name")
    f = cmd("fork", "copy a session under a new name; the original is unchanged", _fork, "session")
    f.add_argument("new_name", nargs="?", help="name of the copy (default: NAME-fork)")
    e = cmd("export", "print a session transcript as text or JSON", _export, "session")
    e.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    e.add_argument("--include-system", action="store_true", help="include the system prompt")
    _register_gc(sub)


def _register_gc(sub: argparse._SubParsersAction) -> None:
    """`sessions gc` comes from the snapshot store (sessions/store_cli.py)."""
    from ds4_agent.sessions.store_cli import register_gc

    register_gc(sub)
