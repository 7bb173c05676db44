"""Permission modes and allow/ask/deny rules, decided per tool call.

Modes (Claude Code's names are accepted as aliases):
  read-only  (plan)              reads, searches, read-only shell commands and shell commands an
                                 allow rule names; never file edits or commits
  ask        (default)           reads are free; edits, other shell commands and commits ask
  auto-edit  (acceptEdits)       edits inside the workspace are free; shell and commits ask
  full-auto  (bypassPermissions) everything is allowed except what a deny rule forbids

Rules look like `Bash(git diff:*)`, `Bash(npm test)`, `Edit(src/**)`, `Read(.env)`, `GitCommit`.
`Read` rules cover Read/Grep/Glob/LS, `Edit` rules cover Edit/MultiEdit/Write/apply_patch, `Bash` rules
cover Bash. A shell command is split into its segments (`a && b | c`, substitutions included)
and every segment must be allowed; one denied segment denies the call. Deny beats ask beats
allow, whichever file the rule came from. Files that usually hold secrets (.env*, keys) ask
before being read in every mode, unless an allow rule names them.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pathspec

from .shellsplit import Segment, split_command

Mode = Literal["read-only", "ask", "auto-edit", "full-auto"]
Behavior = Literal["allow", "ask", "deny"]
MODES: tuple[Mode, ...] = ("read-only", "ask", "auto-edit", "full-auto")
MODE_ALIASES: dict[str, Mode] = {
    "read-only": "read-only",
    "readonly": "read-only",
    "plan": "read-only",
    "ask": "ask",
    "default": "ask",
    "auto-edit": "auto-edit",
    "acceptEdits": "auto-edit",
    "full-auto": "full-auto",
    "bypassPermissions": "full-auto",
    "yolo": "full-auto",
}

# Tool kinds (from the data file) and the rule name that covers each kind.
KIND_RULE = {"read": "Read", "edit": "Edit", "shell": "Bash"}

# Programs that only read (when they do not redirect output into a file).
SAFE_PROGRAMS = {
    "ls",
    "cat",
    "head",
    "tail",
    "wc",
    "grep",
    "rg",
    "egrep",
    "fgrep",
    "pwd",
    "echo",
    "printf",
    "true",
    "false",
    "which",
    "type",
    "file",
    "stat",
    "du",
    "df",
    "tree",
    "basename",
    "dirname",
    "realpath",
    "readlink",
    "sort",
    "cut",
    "tr",
    "diff",
    "cmp",
    "comm",
    "nl",
    "less",
    "more",
    "whoami",
    "uname",
    "id",
    "test",
    "[",
    "jq",
    "md5sum",
    "sha256sum",
    "shasum",
    "column",
}
SAFE_GIT = {
    "status",
    "diff",
    "log",
    "show",
    "blame",
    "rev-parse",
    "ls-files",
    "ls-tree",
    "describe",
    "shortlog",
    "grep",
    "cat-file",
    "merge-base",
}
FIND_UNSAFE = {"-exec", "-execdir", "-ok", "-okdir", "-delete", "-fprint", "-fprintf", "-fls"}
# Programs whose first argument is a subcommand: remembered rules keep it (`Bash(npm test:*)`).
SUBCOMMAND_PROGRAMS = {
    "git",
    "npm",
    "pnpm",
    "yarn",
    "bun",
    "cargo",
    "go",
    "uv",
    "pip",
    "pip3",
    "poetry",
    "docker",
    "kubectl",
    "make",
    "just",
    "gradle",
    "mvn",
    "dotnet",
    "swift",
    "brew",
    "apt",
    "conda",
}
RISKY_PROGRAMS = {
    "rm",
    "rmdir",
    "mv",
    "dd",
    "chmod",
    "chown",
    "sudo",
    "doas",
    "kill",
    "pkill",
    "killall",
    "shutdown",
    "reboot",
    "mkfs",
    "curl",
    "wget",
    "ssh",
    "scp",
    "bash",
    "sh",
    "zsh",
    "eval",
    "python",
    "python3",
    "node",
    "perl",
    "ruby",
}


class RuleError(ValueError):
    pass


_RULE_RX = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


@dataclass(frozen=True)
class Rule:
    tool: str
    spec: str | None  # None = every call of the tool
    source: str = ""  # where it came from (a settings file, "session", "cli")

    @classmethod
    def parse(cls, text: str, source: str = "") -> Rule:
        m = _RULE_RX.match(text)
        if not m or (m.group(2) is not None and not m.group(2).strip()):
            where = f" in {source}" if source else ""
            raise RuleError(
                f"invalid permission rule {text!r}{where}; write Tool or Tool(specifier), e.g. Bash(git diff:*) or Edit(src/**)"
            )
        spec = m.group(2)
        return cls(m.group(1), spec.strip() if spec is not None else None, source)

    def __str__(self) -> str:
        return self.tool if self.spec is None else f"{self.tool}({self.spec})"

    # ---- matching ---------------------------------------------------------------------------

    def matches_command(self, words: tuple[str, ...], text: str) -> bool:
        if self.spec is None:
            return True
        command = " ".join(words) if words else text
        spec = self.spec
        if spec.endswith(":*"):
            prefix = spec[:-2].strip()
            return any(c == prefix or c.startswith(prefix + " ") for c in (command, text))
        if "*" in spec:
            return any(fnmatch.fnmatchcase(c, spec) for c in (command, text))
        return spec in (command, text)

    def matches_path(self, path: Path, root: Path) -> bool:
        if self.spec is None:
            return True
        spec = self.spec
        if spec.startswith(("/", "~")):
            # Absolute rule: anchor the pattern at the filesystem root.
            rel = path.as_posix().lstrip("/")
            pattern = "/" + os.path.expanduser(spec).lstrip("/")
        else:
            try:
                rel = path.relative_to(root).as_posix()
            except ValueError:
                return False
            pattern = spec
        spec_obj = pathspec.GitIgnoreSpec.from_lines([pattern])
        return spec_obj.match_file(rel) or spec_obj.match_file(rel + "/")


@dataclass(frozen=True)
class ToolCall:
    """A call as the policy sees it: tool name, its kind from the data file, and arguments."""

    name: str
    arguments: dict[str, Any]
    kind: str = "other"
    path_param: str | None = None
    paths: tuple[str, ...] = ()  # for tools that touch several files (apply_patch)

    def all_paths(self) -> list[str]:
        out = list(self.paths)
        raw = self.arguments.get(self.path_param) if self.path_param else None
        if isinstance(raw, str) and raw.strip():
            out.append(raw)
        return out


@dataclass
class PermissionDecision:
    behavior: Behavior
    reason: str
    rule: str | None = None
    suggestions: list[str] = field(default_factory=list)  # rules the UI may offer to remember


@dataclass
class PermissionPolicy:
    mode: Mode = "ask"
    allow: list[Rule] = field(default_factory=list)
    ask: list[Rule] = field(default_factory=list)
    deny: list[Rule] = field(default_factory=list)
    root: Path = field(default_factory=Path.cwd)
    is_secret: Any = None  # callable(Path) -> bool, from the Workspace

    @classmethod
    def from_rules(
        cls,
        mode: str = "ask",
        allow: list[str] = (),
        ask: list[str] = (),
        deny: list[str] = (),
        root: Path | None = None,
        is_secret: Any = None,
        source: str = "",
    ) -> PermissionPolicy:
        return cls(
            mode=parse_mode(mode),
            allow=[Rule.parse(r, source) for r in allow],
            ask=[Rule.parse(r, source) for r in ask],
            deny=[Rule.parse(r, source) for r in deny],
            root=Path(os.path.realpath(root or Path.cwd())),
            is_secret=is_secret,
        )

    def set_mode(self, mode: str) -> None:
        self.mode = parse_mode(mode)

    def remember(self, rule_text: str, behavior: Behavior = "allow") -> Rule:
        """Add a session rule the user approved ("always allow"); broad shell wildcards are refused."""
        rule = Rule.parse(rule_text, "session")
        if (
            behavior == "allow"
            and rule.tool == "Bash"
            and (rule.spec is None or rule.spec.strip(" :*") == "")
        ):
            raise RuleError(
                f"refusing to remember {rule_text!r}: it would allow every shell command; approve a specific command prefix instead"
            )
        {"allow": self.allow, "ask": self.ask, "deny": self.deny}[behavior].append(rule)
        return rule

    # ---- the decision -----------------------------------------------------------------------

    def check(self, call: ToolCall) -> PermissionDecision:
        if call.kind == "shell":
            return self._check_shell(call)
        if call.kind in ("read", "edit"):
            return self._check_path_tool(call)
        return self._check_other(call)

    def _names(self, call: ToolCall) -> set[str]:
        names = {call.name}
        if call.kind in KIND_RULE:
            names.add(KIND_RULE[call.kind])
        return names

    def _first(self, rules: list[Rule], call: ToolCall, pred) -> Rule | None:
        names = self._names(call)
        return next((r for r in rules if r.tool in names and pred(r)), None)

    def _check_other(self, call: ToolCall) -> PermissionDecision:
        if call.kind == "git_read" and self.is_secret is not None:
            for raw in call.all_paths():
                path = self._resolve(raw)
                read_rule = next(
                    (
                        r
                        for r in self.allow
                        if r.tool == "Read" and r.spec and r.matches_path(path, self.root)
                    ),
                    None,
                )
                if self.is_secret(path) and read_rule is None:
                    shown = _display(path, self.root)
                    return PermissionDecision(
                        "ask",
                        f"{shown} may contain secrets; showing it needs the user's permission",
                        suggestions=[f"Read({shown})"],
                    )
        if r := self._first(self.deny, call, lambda r: r.spec is None):
            return PermissionDecision("deny", f"{call.name} is denied by rule {r}", str(r))
        if call.kind == "git_write" and self.mode == "read-only":
            return PermissionDecision(
                "deny", f"{call.name} changes the repository and the session is in read-only mode"
            )
        if r := self._first(self.ask, call, lambda r: r.spec is None):
            return PermissionDecision("ask", f"rule {r} asks before {call.name}", str(r))
        if r := self._first(self.allow, call, lambda r: r.spec is None):
            return PermissionDecision("allow", f"allowed by rule {r}", str(r))
        kind = call.kind
        if kind in ("git_read", "shell_control", "info"):
            return PermissionDecision("allow", f"{call.name} only reads")
        if self.mode == "full-auto":
            return PermissionDecision("allow", "full-auto mode")
        if self.mode == "read-only":
            return PermissionDecision(
                "deny", f"{call.name} changes things and the session is in read-only mode"
            )
        return PermissionDecision(
            "ask", f"{call.name} needs approval in {self.mode} mode", suggestions=[call.name]
        )

    def _resolve(self, raw: str) -> Path:
        p = os.path.expanduser(raw)
        return Path(os.path.realpath(p if os.path.isabs(p) else os.path.join(self.root, p)))

    def _check_path_tool(self, call: ToolCall) -> PermissionDecision:
        raws = call.all_paths() or ["."]
        decisions = [self._check_one_path(call, self._resolve(r)) for r in raws]
        # Every file must pass: a deny anywhere denies, an ask anywhere asks.
        for behavior in ("deny", "ask"):
            hit = [d for d in decisions if d.behavior == behavior]
            if hit:
                suggestions = [s for d in hit for s in d.suggestions]
                return PermissionDecision(
                    behavior, hit[0].reason, hit[0].rule, list(dict.fromkeys(suggestions))
                )
        return decisions[0]

    def _check_one_path(self, call: ToolCall, path: Path) -> PermissionDecision:
        shown = _display(path, self.root)
        on_path = lambda r: r.matches_path(path, self.root)  # noqa: E731
        if r := self._first(self.deny, call, on_path):
            return PermissionDecision(
                "deny", f"{call.name} on {shown} is denied by rule {r}", str(r)
            )
        allow_rule = self._first(self.allow, call, on_path)
        explicit_allow = allow_rule is not None and allow_rule.spec is not None
        if (
            call.kind == "read"
            and self.is_secret is not None
            and self.is_secret(path)
            and not explicit_allow
        ):
            return PermissionDecision(
                "ask",
                f"{shown} may contain secrets; reading it needs the user's permission",
                suggestions=[f"Read({shown})"],
            )
        if call.kind == "edit" and self.mode == "read-only":
            # Read-only means no file changes, whatever allow rules say.
            return PermissionDecision(
                "deny", f"{call.name} would change {shown} and the session is in read-only mode"
            )
        if r := self._first(self.ask, call, on_path):
            return PermissionDecision("ask", f"rule {r} asks before {call.name} on {shown}", str(r))
        if allow_rule is not None:
            return PermissionDecision("allow", f"allowed by rule {allow_rule}", str(allow_rule))
        if call.kind == "read":
            return PermissionDecision("allow", "reading is allowed in every mode")
        if self.mode in ("auto-edit", "full-auto"):
            return PermissionDecision("allow", f"{self.mode} mode allows edits")
        if self.mode == "read-only":
            return PermissionDecision(
                "deny", f"{call.name} would change {shown} and the session is in read-only mode"
            )
        parent = _display(path.parent, self.root)
        suggestion = "Edit(**)" if parent == "." else f"Edit({parent}/**)"
        return PermissionDecision(
            "ask", f"{call.name} on {shown} needs approval", suggestions=[suggestion]
        )

    def _check_shell(self, call: ToolCall) -> PermissionDecision:
        command = str(call.arguments.get("command", ""))
        segments = split_command(command)
        if segments is None:
            # Not parseable (heredoc, unclosed quote): only an exact rule or full-auto can allow it.
            whole = Segment(
                text=" ".join(command.split()), words=tuple(command.split()), writes_file=True
            )
            segments = [whole]
            parsed = False
        else:
            parsed = True
        names = self._names(call)
        rules = lambda lst: [r for r in lst if r.tool in names]  # noqa: E731
        deny, ask, allow = rules(self.deny), rules(self.ask), rules(self.allow)

        for seg in segments:
            for variant in _variants(seg):
                for r in deny:
                    if r.matches_command(variant, " ".join(variant)) or (
                        not parsed and r.spec and _mentions(command, r.spec)
                    ):
                        return PermissionDecision(
                            "deny", f"`{seg.text}` is denied by rule {r}", str(r)
                        )
        if (
            parsed
            and self.is_secret is not None
            and not any(r.spec == command.strip() for r in allow)
        ):
            for seg in segments:
                secret = next(
                    (w for w in seg.words[1:] if not w.startswith("-") and self._names_secret(w)),
                    None,
                )
                if secret is not None:
                    return PermissionDecision(
                        "ask",
                        f"`{seg.text}` touches {secret}, which may contain secrets; that needs the user's permission",
                    )
        pending: list[Segment] = []
        asked: Rule | None = None
        for seg in segments:
            if r := next((r for r in ask if r.matches_command(seg.words, seg.text)), None):
                asked = r
                pending.append(seg)
                continue
            if any(r.matches_command(seg.words, seg.text) for r in allow) and (
                parsed or any(r.spec == command.strip() for r in allow)
            ):
                continue
            if parsed and self._safe(seg):
                continue
            if self.mode == "full-auto":
                continue
            pending.append(seg)
        if not pending:
            return PermissionDecision("allow", "every part of the command is allowed")
        shown = "; ".join(f"`{s.text}`" for s in pending[:3])
        if asked is not None:
            return PermissionDecision(
                "ask", f"rule {asked} asks before {shown}", str(asked), _suggest(pending)
            )
        if self.mode == "read-only":
            return PermissionDecision(
                "deny",
                f"read-only mode allows only read-only commands, and {shown} may change things",
            )
        what = (
            "this command"
            if parsed
            else "this command (it could not be split into simple commands)"
        )
        return PermissionDecision(
            "ask",
            f"{what} needs approval: {shown}",
            suggestions=_suggest(pending) if parsed else [],
        )

    def _names_secret(self, word: str) -> bool:
        p = os.path.expanduser(word)
        full = p if os.path.isabs(p) else os.path.join(self.root, p)
        return bool(self.is_secret(Path(os.path.normpath(full))))

    def _safe(self, seg: Segment) -> bool:
        if seg.writes_file:
            return False
        words = seg.words
        prog = words[0].rsplit("/", 1)[-1] if words else ""
        if prog == "cd":
            target = words[1] if len(words) > 1 else ""
            if not target or target.startswith(("~", "-", "$")):
                return False
            real = os.path.realpath(os.path.join(self.root, target))
            return _within(Path(real), self.root)
        if prog in ("sort", "tree") and any(w.startswith(("-o", "--output")) for w in words[1:]):
            return False  # these two write their output into a file with -o
        if prog in SAFE_PROGRAMS:
            return True
        if prog == "find":
            return not any(w in FIND_UNSAFE for w in words[1:])
        if prog == "sed":
            return any(w == "-n" for w in words[1:]) and not any(
                w.startswith(("-i", "--in-place")) for w in words[1:]
            )
        if prog == "git":
            sub = next((w for w in words[1:] if not w.startswith("-")), "")
            if sub == "branch":
                return all(
                    w in ("branch", "-a", "-r", "-v", "-vv", "--list", "--show-current")
                    for w in words[1:]
                )
            return sub in SAFE_GIT and not any(w.startswith("--output") for w in words[1:])
        return False


def _mentions(command: str, spec: str) -> bool:
    """For commands that cannot be split: does the rule's command appear as whole words?"""
    prefix = spec[:-2] if spec.endswith(":*") else spec
    words = [re.escape(w) for w in prefix.replace("*", " ").split()]
    if not words:
        return False
    return re.search(r"(?<![\w.-])" + r"\s+".join(words) + r"(?![\w-])", command) is not None


def _variants(seg: Segment) -> list[tuple[str, ...]]:
    """The words of a segment as written and with assignments/wrappers stripped (for deny rules)."""
    out = [seg.words]
    core = seg.core()
    if core and core != seg.words:
        out.append(core)
    if core and "/" in core[0]:  # /bin/rm is rm
        out.append((core[0].rsplit("/", 1)[-1], *core[1:]))
    # `bash -c "..."`, `sh -c '...'`, `eval ...`: check the inner command too.
    if core and core[0].rsplit("/", 1)[-1] in ("bash", "sh", "zsh", "dash") and "-c" in core:
        idx = core.index("-c")
        if idx + 1 < len(core):
            inner = split_command(core[idx + 1]) or []
            for s in inner:
                out.extend(_variants(s))
    if core and core[0] == "eval":
        for s in split_command(" ".join(core[1:])) or []:
            out.extend(_variants(s))
    return out


def _suggest(segments: list[Segment]) -> list[str]:
    """Per-segment rules to offer for "always allow" (never a wildcard over everything)."""
    out: list[str] = []
    for seg in segments:
        words = seg.words
        if not words:
            continue
        prog = words[0].rsplit("/", 1)[-1]
        if prog in RISKY_PROGRAMS or seg.writes_file or "$SUB" in words:
            rule = f"Bash({seg.text})"
        elif len(words) > 1 and prog in SUBCOMMAND_PROGRAMS and not words[1].startswith("-"):
            rule = f"Bash({words[0]} {words[1]}:*)"
        else:
            rule = f"Bash({words[0]}:*)"
        if rule not in out:
            out.append(rule)
    return out


def parse_mode(mode: str) -> Mode:
    m = MODE_ALIASES.get(mode.strip()) if isinstance(mode, str) else None
    if m is None:
        raise RuleError(f"unknown permission mode {mode!r}; use one of {', '.join(MODES)}")
    return m


def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)
