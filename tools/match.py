"""Locating `old_string` in a file for Edit: exact first, then tolerant fallbacks, else a hint.

Fallbacks, in order, each used only when the previous ones find nothing:
  1. exact substring;
  2. line endings: the file uses CRLF but old/new were written with plain newlines;
  3. trailing whitespace ignored on every line;
  4. indentation ignored (tabs vs spaces, a different base indent); new_string is re-indented
     to the file's style.
A fallback must still find exactly one place (or replace_all). When nothing matches, the error
shows the most similar block of the file so the model can correct its old_string.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .result import ToolError

TAB = 4  # columns per tab when comparing indentation of mixed tab/space text


@dataclass
class EditPlan:
    spans: list[tuple[int, int]]  # [start, end) in the original text, ascending, disjoint
    replacements: list[str]
    strategy: str  # "exact" or a description of the fallback that matched

    def apply(self, text: str) -> str:
        out = []
        pos = 0
        for (s, e), rep in zip(self.spans, self.replacements, strict=True):
            out.append(text[pos:s])
            out.append(rep)
            pos = e
        out.append(text[pos:])
        return "".join(out)


def _find_all(text: str, needle: str) -> list[tuple[int, int]]:
    spans = []
    start = 0
    while True:
        i = text.find(needle, start)
        if i < 0:
            return spans
        spans.append((i, i + len(needle)))
        start = i + len(needle)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _lead(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _cols(lead: str) -> int:
    col = 0
    for ch in lead:
        col = (col // TAB + 1) * TAB if ch == "\t" else col + 1
    return col


def _split_lines(text: str) -> tuple[list[str], list[int]]:
    """Lines without their "\n", and the offset where each starts."""
    lines = text.split("\n")
    starts = []
    pos = 0
    for ln in lines:
        starts.append(pos)
        pos += len(ln) + 1
    return lines, starts


def _line_windows(
    text: str, old: str, norm: Callable[[str], str]
) -> list[tuple[int, int, list[str]]]:
    """Whole-line windows of `text` whose lines equal old's lines after `norm`."""
    old_lines = old.split("\n")
    trailing_nl = old.endswith("\n")
    if trailing_nl:
        old_lines.pop()
    if not old_lines or not any(ln.strip() for ln in old_lines):
        return []
    lines, starts = _split_lines(text)
    n = len(old_lines)
    want = [norm(x) for x in old_lines]
    have = [norm(x) for x in lines]
    found = []
    i = 0
    last = len(lines) - n
    while i <= last:
        try:
            i = have.index(want[0], i, last + 1)  # C-speed scan for the first line
        except ValueError:
            break
        if have[i : i + n] == want:
            start = starts[i]
            end = starts[i + n - 1] + len(lines[i + n - 1])
            if trailing_nl:
                if i + n >= len(lines):  # old ends with a newline the file does not have
                    i += 1
                    continue
                end += 1
            found.append((start, end, lines[i : i + n]))
            i += n
        else:
            i += 1
    return found


def _reindent(new: str, old: str, file_lines: list[str]) -> str:
    """Re-indent `new` the way the matched file lines relate to `old`'s lines."""
    old_lines = old.split("\n")
    pairs = [
        (_cols(_lead(o)), _cols(_lead(f)))
        for o, f in zip(old_lines, file_lines, strict=False)
        if o.strip() and f.strip()
    ]
    use_tabs = any(_lead(f).startswith("\t") for f in file_lines if f.strip())
    if not pairs:
        return new
    # Fit file_col = scale * old_col + shift (a base-indent shift, or 8-space → tab style change).
    scale, shift = 1.0, pairs[0][1] - pairs[0][0]
    if not all(f - o == shift for o, f in pairs):
        distinct = sorted(set(pairs))
        (o1, f1), (o2, f2) = distinct[0], distinct[-1]
        if o2 != o1:
            scale = (f2 - f1) / (o2 - o1)
            shift = f1 - scale * o1
        if not all(abs(scale * o + shift - f) < 0.5 for o, f in pairs):
            scale, shift = 1.0, pairs[0][1] - pairs[0][0]

    out = []
    for line in new.split("\n"):
        if not line.strip():
            out.append(line)
            continue
        col = max(0, round(scale * _cols(_lead(line)) + shift))
        lead = "\t" * (col // TAB) + " " * (col % TAB) if use_tabs else " " * col
        out.append(lead + line.lstrip(" \t"))
    return "\n".join(out)


def _crlf_view(text: str) -> tuple[str, list[int]]:
    """`text` with CRLF turned into LF, and a map from each normalized offset to the raw offset.

    A "\n" that came from "\r\n" maps to the "\r", so spans ending at a line end exclude the
    whole line ending and spans that include the newline include both bytes.
    """
    norm = []
    pos_map = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\r" and i + 1 < n and text[i + 1] == "\n":
            norm.append("\n")
            pos_map.append(i)
            i += 2
            continue
        norm.append(ch)
        pos_map.append(i)
        i += 1
    pos_map.append(n)
    return "".join(norm), pos_map


def _search(text: str, old: str, new: str) -> tuple[list[tuple[int, int, str]], str]:
    """Candidate (start, end, replacement) triples and the strategy that found them."""
    spans = _find_all(text, old)
    if spans:
        return [(s, e, new) for s, e in spans], "exact"
    windows = _line_windows(text, old, str.rstrip)
    if windows:
        return [(s, e, new) for s, e, _ in windows], "matched after ignoring trailing whitespace"
    windows = _line_windows(text, old, str.strip)
    if windows:
        return (
            [(s, e, _reindent(new, old, fl)) for s, e, fl in windows],
            "matched after ignoring indentation; new_string was re-indented to the file's style",
        )
    return [], ""


def plan_edit(text: str, old: str, new: str, replace_all: bool = False) -> EditPlan:
    """Where and how to replace `old` with `new` in `text`; raises ToolError if it is not clear."""
    if old == new:
        raise ToolError(
            "old_string and new_string are identical; there is nothing to change, pass the new text in new_string"
        )
    if old == "":
        raise ToolError(
            "old_string is empty; quote the exact text to replace, or use Write to replace the whole file"
        )
    view = text
    pos_map: list[int] | None = None
    exact = _find_all(text, old)
    if exact:
        cands, strategy = [(s, e, new) for s, e in exact], "exact"
    elif "\r\n" in text:
        # Work on an LF view so the whitespace fallbacks never see a stray "\r", then map the
        # spans back and write new lines with the file's CRLF endings.
        view, pos_map = _crlf_view(text)
        old_lf, new_lf = old.replace("\r\n", "\n"), new.replace("\r\n", "\n")
        cands, strategy = _search(view, old_lf, new_lf)
        if cands:
            strategy = "matched after converting line endings (file uses CRLF)" + (
                "" if strategy == "exact" else f"; {strategy}"
            )
            cands = [(s, e, r.replace("\n", "\r\n")) for s, e, r in cands]
    else:
        old_lf, new_lf = old.replace("\r\n", "\n"), new.replace("\r\n", "\n")
        cands, strategy = _search(text, old_lf, new_lf)
        if cands and old_lf != old:
            strategy = (
                "matched after converting old_string's CRLF line endings to the file's LF"
                + ("" if strategy == "exact" else f"; {strategy}")
            )
    if not cands:
        raise ToolError(
            "old_string was not found in the file; Read the file again and copy the exact text (see the closest match below)",
            detail=closest_match(text, old),
        )
    if (
        strategy == "exact"
        and len(cands) == 1
        and not replace_all
        and text.find(old, cands[0][0] + 1) >= 0
    ):
        # Overlapping occurrences ("aa" in "aaa") are just as ambiguous as separate ones.
        second = text.find(old, cands[0][0] + 1)
        raise ToolError(
            f"old_string matches 2 overlapping places (lines {_line_of(text, cands[0][0])}, {_line_of(text, second)}); include more surrounding text to make it unique"
        )
    if len(cands) > 1 and not replace_all:
        lines = ", ".join(str(_line_of(view, s)) for s, _, _ in cands[:10])
        more = "" if len(cands) <= 10 else ", …"
        how = "" if strategy == "exact" else f" ({strategy})"
        raise ToolError(
            f"old_string matches {len(cands)} places{how} (lines {lines}{more}); include more surrounding lines to make it unique, or set replace_all=true to change every one"
        )
    if pos_map is not None:
        cands = [(pos_map[s], pos_map[e], r) for s, e, r in cands]
    return EditPlan([(s, e) for s, e, _ in cands], [r for _, _, r in cands], strategy)


def closest_match(text: str, old: str, max_lines: int = 30, candidates: int = 40) -> str:
    """The block of `text` most similar to `old`, numbered, plus a diff of the two.

    Windows are first ranked cheaply by the lines they share with old and by old's words they
    hold, rare words counting more (a sliding sum over lines); only the best few are compared
    character by character, so a miss on a big file stays fast.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    old_lines = old.replace("\r\n", "\n").strip("\n").split("\n")
    n = max(1, min(len(old_lines), len(lines)))
    target = "\n".join(ln.strip() for ln in old_lines)
    stripped_old = {ln.strip() for ln in old_lines if ln.strip()}
    per_line = np.fromiter(
        (3.0 if ln.strip() in stripped_old else 0.0 for ln in lines),
        dtype=np.float64,
        count=len(lines),
    )
    words = set(_WORD.findall(old))
    if words:
        # Old's words on each line, rare words weighing more than words that are on every
        # line, so the distinctive part of old_string steers the ranking. Punctuation becomes
        # spaces (bytes.translate) and str.split tokenizes: far faster than a regex scan.
        plain = (
            "\n".join(lines)
            .encode("utf-8", "surrogatepass")
            .translate(_PUNCT)
            .decode("utf-8", "replace")
        )
        hits = [
            (k, tok) for k, ln in enumerate(plain.split("\n")) for tok in ln.split() if tok in words
        ]
        if hits:
            freq: dict[str, int] = {}
            for _, tok in hits:
                freq[tok] = freq.get(tok, 0) + 1
            line_of = np.fromiter((h[0] for h in hits), dtype=np.int64, count=len(hits))
            weight = np.fromiter(
                (1.0 / freq[h[1]] for h in hits), dtype=np.float64, count=len(hits)
            )
            per_line += np.bincount(line_of, weights=weight, minlength=len(lines))
    cum = np.concatenate(([0.0], np.cumsum(per_line)))
    window_scores = cum[n:] - cum[:-n]
    picked = np.argsort(-window_scores, kind="stable")[:candidates].tolist()
    best = (0.0, -1)
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(target)
    for i in sorted(picked):
        matcher.set_seq1("\n".join(ln.strip() for ln in lines[i : i + n]))
        if matcher.real_quick_ratio() <= best[0] or matcher.quick_ratio() <= best[0]:
            continue
        r = matcher.ratio()
        if r > best[0]:
            best = (r, i)
    ratio, i = best
    if i < 0 or ratio < 0.4:
        return "No similar block found in the file; Read it to see its current content."
    window_lines = lines[i : i + n]
    shown = window_lines[:max_lines]
    numbered = "\n".join(f"{k:>6}\t{ln}" for k, ln in enumerate(shown, i + 1))
    cut = (
        f"\n[... {len(window_lines) - max_lines} more lines]"
        if len(window_lines) > max_lines
        else ""
    )
    diff = "\n".join(
        difflib.unified_diff(
            [repr(x)[1:-1] for x in old_lines[:max_lines]],
            [repr(x)[1:-1] for x in shown],
            "old_string",
            "file",
            lineterm="",
            n=1,
        )
    )
    return (
        f"Closest match: lines {i + 1}-{i + n} ({ratio:.0%} similar):\n{numbered}{cut}\n"
        f"Differences (whitespace shown escaped):\n{diff}"
    )


_WORD = re.compile(r"\w+")
_PUNCT_CHARS = b"!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~\t\r"
_PUNCT = bytes.maketrans(_PUNCT_CHARS, b" " * len(_PUNCT_CHARS))  # bytes.translate is C-fast
