"""The DeepSeek V4 pre-tokenizer, as one regex that tiktoken can run.

`tokenizer.json` pre-tokenizes with three successive HF `Split` steps (behaviour *Isolated*: matches
and the gaps between them both become pieces, and every step re-splits the pieces of the previous
step):

1. `\\p{N}{1,3}` (digit runs, cut every three);
2. `[一-龥぀-ゟ゠-ヿ]+` (U+4E00–U+9FA5 and U+3040–U+30FF: "CJK" below);
3. the word / punctuation / whitespace regex `STEP3`.

tiktoken runs a single regex with `find_iter` and silently drops text that no match covers, so the
three steps are folded into `COMBINED`, built so that its matches are exactly the final pieces:

- Step 1 and 2 pieces never mix classes: a digit run, a CJK run, or a gap containing neither.
  Step 3 then runs inside each piece, so none of its matches may cross such a boundary. Every
  class of step 3 is therefore intersected with its piece's domain: `G` (neither digit nor CJK)
  or `C` (CJK; step 3 does re-split CJK runs, e.g. at `・` U+30FB, which is punctuation).
- Inside a piece, end-of-piece is end-of-string for the lookahead of `\\s+(?!\\S)`. In the whole
  text, a whitespace run ends its piece exactly when the next character is a digit or CJK, so
  the lookahead becomes `(?![^\\s<digits><CJK>])`.
- Isolated splitting keeps unmatched gaps as pieces; `COMBINED` matches them explicitly: a run of
  characters at which no step-3 alternative can start (neither whitespace, letter, mark,
  punctuation nor symbol, and not followed by a letter or mark, which would make it the optional
  prefix of a word).

`split_reference` is the literal three-step algorithm, for tests: the property tests check
`COMBINED` against it and, through tiktoken, the ids against HF `tokenizers`.
Both pattern strings use syntax understood by Rust `fancy_regex` (tiktoken) and by Python
`regex` in V1 mode (set operations `--` and `&&`).
"""

from __future__ import annotations

import functools

import regex

# The three steps exactly as written in the V4 tokenizer.json (checked by the tokenizer tests).
STEP1 = r"\p{N}{1,3}"
STEP2 = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# tokenizer.json holds real CR and LF characters inside these classes (not `\r` escapes).
STEP3 = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
STEPS = (STEP1, STEP2, STEP3)

_CJK = "\u4e00-\u9fa5\u3040-\u30ff"  # step 2's class (U+3040–309F and U+30A0–30FF adjoin)
_NOT_G = r"\p{N}" + _CJK  # characters that belong to a digit or CJK piece
_LM_G = rf"[[\p{{L}}\p{{M}}]--[{_NOT_G}]]"
_PS_G = rf"[[\p{{P}}\p{{S}}]--[{_CJK}]]"
_LM_C = rf"[[\p{{L}}\p{{M}}]&&[{_CJK}]]"
_PS_C = rf"[[\p{{P}}\p{{S}}]&&[{_CJK}]]"

COMBINED = "|".join(
    [
        STEP1,
        # step 3 inside a gap piece (domain G)
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+""",
        rf"[^\r\n\p{{L}}\p{{P}}\p{{S}}{_NOT_G}]?{_LM_G}+",
        rf" ?{_PS_G}+[\r\n]*",
        r"\s*[\r\n]+",
        rf"\s+(?![^\s{_NOT_G}])",
        r"\s+",
        rf"(?:[^\s\p{{L}}\p{{M}}\p{{P}}\p{{S}}{_NOT_G}](?!{_LM_G}))+",
        # step 3 inside a CJK piece (domain C: no whitespace, no ASCII)
        rf"[[^\p{{L}}\p{{P}}\p{{S}}]&&[{_CJK}]]?{_LM_C}+",
        rf"{_PS_C}+",
        rf"(?:[[^\p{{L}}\p{{M}}\p{{P}}\p{{S}}]&&[{_CJK}]](?!{_LM_C}))+",
    ]
)


@functools.cache
def _compiled_steps() -> tuple[regex.Pattern[str], ...]:
    return tuple(regex.compile(p) for p in STEPS)


@functools.cache
def _compiled_combined() -> regex.Pattern[str]:
    return regex.compile(COMBINED, flags=regex.V1)


def split_reference(text: str) -> list[str]:
    """The three Isolated splits applied one after another (HF semantics); slow, for tests."""
    pieces = [text] if text else []
    for rx in _compiled_steps():
        out: list[str] = []
        for piece in pieces:
            pos = 0
            for m in rx.finditer(piece):
                if m.start() > pos:
                    out.append(piece[pos : m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def split_combined(text: str) -> list[str]:
    """`COMBINED` run with Python `regex` (what tiktoken does with it in Rust)."""
    return _compiled_combined().findall(text)
