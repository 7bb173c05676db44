"""Split a shell command line into simple-command segments for permission checks.

`cd src && npm test | tee log` is three segments; each is checked on its own, so an allowed
`npm test` does not need a new prompt when it is chained, and an allowed prefix never smuggles
in a second command. Command substitutions (`$(...)`, backticks, `<(...)`) are parsed
recursively and their commands become segments too. Anything the splitter cannot parse
(an unclosed quote, a heredoc) comes back as `None`, and callers must treat it as unknown.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

OPERATORS = ("&&", "||", "|&", ";;", "&", "|", ";", "\n")

# Wrappers that run their argument as a command; stripped to find the real program.
WRAPPERS = {
    "sudo",
    "doas",
    "env",
    "nice",
    "nohup",
    "time",
    "command",
    "exec",
    "builtin",
    "xargs",
    "stdbuf",
    "ionice",
    "timeout",
    "watch",
}


@dataclass(frozen=True)
class Segment:
    text: str  # the segment as written (whitespace-normalized), redirections included
    words: tuple[str, ...]  # shell words, quotes removed, redirections removed
    writes_file: bool  # has an output redirection to something other than /dev/null or an fd

    @property
    def program(self) -> str:
        return self.words[0] if self.words else ""

    def core(self) -> tuple[str, ...]:
        """Words with leading VAR=value assignments and wrapper commands (sudo, env, …) removed."""
        words = list(self.words)
        changed = True
        while words and changed:
            changed = False
            while words and _is_assignment(words[0]):
                words.pop(0)
                changed = True
            if words and words[0].rsplit("/", 1)[-1] in WRAPPERS:
                prog = words.pop(0).rsplit("/", 1)[-1]
                changed = True
                # Skip the wrapper's options (and timeout's duration) to reach the command.
                while words and (
                    words[0].startswith("-") or (prog == "timeout" and words[0][:1].isdigit())
                ):
                    words.pop(0)
        return tuple(words)


def _is_assignment(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.replace("_", "a").isalnum() and not name[0].isdigit()


class _Unparseable(Exception):
    pass


def split_command(command: str) -> list[Segment] | None:
    try:
        return _split(command, depth=0)
    except _Unparseable:
        return None


def _split(command: str, depth: int) -> list[Segment]:
    if depth > 8:
        raise _Unparseable
    segments: list[Segment] = []
    raw_parts: list[str] = []
    inner: list[str] = []
    cur: list[str] = []
    i, n = 0, len(command)
    while i < n:
        ch = command[i]
        if ch == "\\":
            cur.append(command[i : i + 2])
            i += 2
            continue
        if ch == "'":
            j = command.find("'", i + 1)
            if j < 0:
                raise _Unparseable
            cur.append(command[i : j + 1])
            i = j + 1
            continue
        if ch == '"':
            j = i + 1
            buf = ['"']
            while j < n and command[j] != '"':
                if command[j] == "\\":
                    buf.append(command[j : j + 2])
                    j += 2
                    continue
                if command.startswith("$(", j) or command[j] == "`":
                    end, body = _substitution(command, j)
                    inner.append(body)
                    buf.append("$SUB")
                    j = end
                    continue
                buf.append(command[j])
                j += 1
            if j >= n:
                raise _Unparseable
            buf.append('"')
            cur.append("".join(buf))
            i = j + 1
            continue
        if command.startswith(("$(", "<(", ">("), i) or ch == "`":
            if command.startswith("$((", i):  # arithmetic, not a command
                j = command.find("))", i)
                if j < 0:
                    raise _Unparseable
                cur.append(command[i : j + 2])
                i = j + 2
                continue
            end, body = _substitution(command, i)
            inner.append(body)
            cur.append("$SUB")
            i = end
            continue
        if command.startswith("<<", i) and not command.startswith("<<<", i):
            raise _Unparseable  # heredoc bodies span lines; do not guess
        if ch == "#" and (i == 0 or command[i - 1] in " \t\n;&|("):
            j = command.find("\n", i)
            i = n if j < 0 else j
            continue
        op = next((o for o in OPERATORS if command.startswith(o, i)), None)
        if op is not None and not (op == "&" and i > 0 and command[i - 1] in "<>"):
            if op == "&" and command.startswith("&>", i):
                cur.append("&>")
                i += 2
                continue
            raw_parts.append("".join(cur))
            cur = []
            i += len(op)
            continue
        cur.append(ch)
        i += 1
    raw_parts.append("".join(cur))
    for part in raw_parts:
        seg = _segment(part)
        if seg is not None:
            segments.append(seg)
    for body in inner:
        segments.extend(_split(body, depth + 1))
    return segments


def _substitution(command: str, i: int) -> tuple[int, str]:
    """End offset and body of the substitution starting at i (`$(`, `<(`, `>(` or a backtick)."""
    if command[i] == "`":
        j = command.find("`", i + 1)
        if j < 0:
            raise _Unparseable
        return j + 1, command[i + 1 : j]
    depth = 0
    j = i + 1
    quote = ""
    while j < len(command):
        c = command[j]
        if quote:
            if c == "\\" and quote == '"':
                j += 2
                continue
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1, command[i + 2 : j]
        j += 1
    raise _Unparseable


def _segment(part: str) -> Segment | None:
    text = " ".join(part.split())
    # Grouping tokens: `( cmd )`, `{ cmd; }`, and shell keywords that introduce a command.
    while text[:1] in ("(", "{") or text.startswith(("!", "then ", "do ", "else ")):
        text = text.split(" ", 1)[1] if " " in text and text[:1] not in "({!" else text[1:].lstrip()
    while text.endswith((")", "}")) and text.count("(") < text.count(")") + (
        1 if text.endswith(")") else 0
    ):
        text = text[:-1].rstrip()
    if text.endswith("}"):
        text = text[:-1].rstrip()
    if text in ("", "fi", "done", "esac"):
        return None
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars="<>")
        lexer.whitespace_split = True
        lexer.commenters = ""
        tokens = list(lexer)
    except ValueError:
        raise _Unparseable from None
    words: list[str] = []
    writes = False
    k = 0
    while k < len(tokens):
        tok = tokens[k]
        if set(tok) <= set("<>") and tok:
            target = tokens[k + 1] if k + 1 < len(tokens) else ""
            # Strip a file-descriptor number glued in front ("2>") from the previous word.
            if words and words[-1].isdigit() and text.find(words[-1] + tok) >= 0:
                words.pop()
            if ">" in tok and not (target == "/dev/null" or target.startswith("&")):
                writes = True
            k += 2
            continue
        if tok == "&" and k + 1 < len(tokens) and tokens[k + 1].startswith(">"):
            k += 1  # "&>" / "&>>": redirect both streams
            continue
        words.append(tok)
        k += 1
    if not words:
        return None
    return Segment(text=text, words=tuple(words), writes_file=writes)
