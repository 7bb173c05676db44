"""Git tools (gitpython): status, diff (incl. untracked files), log, show; commit when permitted."""

from __future__ import annotations

import os
from pathlib import Path

import git
from pydantic import Field

from .context import ToolContext, ToolEnv
from .files import Args
from .result import ToolError, ToolResult
from .textutil import head_tail

GIT_ENV = {"GIT_PAGER": "cat", "PAGER": "cat", "GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true"}


class GitStatusArgs(Args):
    pass


class GitDiffArgs(Args):
    staged: bool = False
    ref: str | None = None
    paths: list[str] | None = None
    include_untracked: bool = True
    stat: bool = False


class GitLogArgs(Args):
    max_count: int = Field(default=20, ge=1, le=500)
    ref: str | None = None
    path: str | None = None


class GitShowArgs(Args):
    ref: str = "HEAD"
    path: str | None = None
    stat: bool = False


class GitCommitArgs(Args):
    message: str = Field(min_length=1)
    paths: list[str] | None = None
    all: bool = False


def _repo(env: ToolEnv) -> git.Repo:
    try:
        return git.Repo(env.workspace.root, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise ToolError(
            f"the workspace {env.workspace.root} is not inside a git repository; git tools need one (the user can run `git init`)"
        ) from None


def _run(repo: git.Repo, *argv: str, ok: tuple[int, ...] = (0,)) -> str:
    cmd = ["git", "-c", "core.quotepath=off", "-c", "color.ui=never", *argv]
    status, out, err = repo.git.execute(
        cmd,
        with_extended_output=True,
        with_exceptions=False,
        env=GIT_ENV,
        strip_newline_in_stdout=False,
    )
    if status not in ok:
        first = next((ln for ln in (err or "").splitlines() if ln.strip()), f"exit status {status}")
        raise ToolError(f"git {argv[0]} failed: {first.strip()}; check the ref/paths and retry")
    return out


def _check_ref(ref: str | None) -> None:
    if ref is not None and (
        ref.startswith("-") or not ref.strip() or any(c.isspace() for c in ref)
    ):
        raise ToolError(
            f"invalid git ref {ref!r}; pass a branch, tag, commit hash or expression like HEAD~1"
        )


def _repo_paths(env: ToolEnv, repo: git.Repo, paths: list[str] | None) -> list[str]:
    top = Path(os.path.realpath(repo.working_tree_dir or env.workspace.root))
    out = []
    for p in paths or []:
        real = env.workspace.resolve(p)
        try:
            out.append(real.relative_to(top).as_posix() or ".")
        except ValueError:
            raise ToolError(
                f"path {p!r} is outside the git repository at {top}; pass a path inside it"
            ) from None
    return out


def _cap(env: ToolEnv, text: str, what: str) -> str:
    shown, _ = head_tail(text, env.limits.output_max_chars, what=what)
    return shown


def tool_git_status(args: GitStatusArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    repo = _repo(env)
    out = _run(repo, "status", "--short", "--branch", "--untracked-files=all")
    lines = out.rstrip("\n").split("\n")
    if len(lines) == 1:
        out += "(working tree clean)\n"
    return ToolResult(_cap(env, out.rstrip("\n"), "status"))


def _secret_excludes(env: ToolEnv) -> list[str]:
    """Pathspecs that keep files which usually hold credentials out of diffs."""
    return [f":(exclude,glob)**/{g}" for g in env.workspace.secret_globs]


def untracked_diff(env: ToolEnv, repo: git.Repo, paths: list[str]) -> str:
    """`git diff` style patches that add each untracked (not ignored) file; secrets are named only."""
    listing = _run(repo, "ls-files", "--others", "--exclude-standard", "-z", "--", *paths)
    parts = []
    for rel in filter(None, listing.split("\0")):
        if env.workspace.is_secret(Path(rel)):
            parts.append(f"(untracked file {rel} may hold secrets; its content is not shown)\n")
            continue
        # --no-index exits 1 when the files differ, which is always the case here.
        parts.append(
            _run(repo, "diff", "--no-index", "--no-color", "--", os.devnull, rel, ok=(0, 1))
        )
    return "".join(parts)


def tool_git_diff(args: GitDiffArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    repo = _repo(env)
    _check_ref(args.ref)
    paths = _repo_paths(env, repo, args.paths)
    argv = ["diff", "--no-color", "--no-ext-diff"]
    if args.stat:
        argv.append("--stat")
    if args.staged:
        argv.append("--cached")
    if args.ref:
        argv.append(args.ref)
    out = _run(repo, *argv, "--", *(paths or ["."]), *_secret_excludes(env))
    if args.include_untracked and not args.staged:
        if args.stat:
            listing = _run(repo, "ls-files", "--others", "--exclude-standard", "--", *paths)
            if listing.strip():
                out += "Untracked files:\n" + "".join(f"  {ln}\n" for ln in listing.splitlines())
        else:
            out += untracked_diff(env, repo, paths)
    if not out.strip():
        what = (
            "staged changes"
            if args.staged
            else f"changes against {args.ref}"
            if args.ref
            else "unstaged changes"
        )
        return ToolResult(f"No {what}" + (f" in {', '.join(args.paths)}" if args.paths else ""))
    return ToolResult(_cap(env, out.rstrip("\n"), "diff"), display={"kind": "diff", "diff": out})


def tool_git_log(args: GitLogArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    repo = _repo(env)
    _check_ref(args.ref)
    argv = ["log", f"--max-count={args.max_count}", "--date=short", "--format=%h %ad %an%d: %s"]
    if args.ref:
        argv.append(args.ref)
    argv.append("--")
    if args.path:
        argv += _repo_paths(env, repo, [args.path])
    try:
        out = _run(repo, *argv)
    except ToolError:
        if not repo.head.is_valid():
            return ToolResult("No commits yet")
        raise
    return ToolResult(_cap(env, out.rstrip("\n") or "No commits match", "log"))


def tool_git_show(args: GitShowArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    repo = _repo(env)
    _check_ref(args.ref)
    if args.path:
        rel = _repo_paths(env, repo, [args.path])[0]
        out = _run(repo, "show", f"{args.ref}:{rel}")
    else:
        argv = [
            "show",
            "--no-color",
            "--no-ext-diff",
            "--format=commit %H%nAuthor: %an <%ae>%nDate:   %ad%n%n%B",
        ]
        if args.stat:
            argv.append("--stat")
        out = _run(repo, *argv, args.ref, "--", ".", *_secret_excludes(env))
    return ToolResult(_cap(env, out.rstrip("\n"), "output"))


def tool_git_commit(args: GitCommitArgs, env: ToolEnv, ctx: ToolContext) -> ToolResult:
    repo = _repo(env)
    paths = _repo_paths(env, repo, args.paths)
    if paths:
        _run(repo, "add", "--", *paths)
    argv = ["commit", "-m", args.message]
    if args.all:
        argv.append("--all")
    if paths:
        argv += ["--", *paths]
    status, out, err = repo.git.execute(
        ["git", "-c", "core.quotepath=off", *argv],
        with_extended_output=True,
        with_exceptions=False,
        env=GIT_ENV,
        kill_after_timeout=300,  # commit hooks can hang; never block the agent forever
    )
    if status != 0:
        msg = next(
            (ln for ln in (out + "\n" + err).splitlines() if ln.strip()), f"exit status {status}"
        )
        raise ToolError(
            f"git commit failed: {msg.strip()}; stage changes (paths or all=true) and check GitStatus"
        )
    return ToolResult(out.strip())
