"""A deterministic ~1 MB mixed text (code, prose, CJK, digits, whitespace runs, emoji, control
characters, special-token strings) shared by the tokenizer test and its benchmark."""

from __future__ import annotations

import random
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

_FRAGMENTS = [
    "The quick brown fox jumps over the lazy dog. ",
    "日本語のテキストと漢字、ひらがな・カタカナ。",
    "中文文本：我们在测试分词器，包括标点符号。",
    "한국어 텍스트도 포함됩니다. ",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇫🇷 1️⃣ ",
    "    indented = [1, 2, 3]\n\tif x:\n\t\treturn y\n",
    "12345678901234 3.14159 0x1F 1e-9 ",
    "   \n\n\n    \t \r\n ",
    "\x00\x01\x1b[31mred\x1b[0m\x7f",
    "ca\u0301fe\u0301 na\u0308ive \u200b\u200d\u00a0\u3000",
    "مرحبا بالعالم עברית हिन्दी ไทย ",
    "<｜User｜>hi<｜Assistant｜><think>r</think>a<｜end▁of▁sentence｜>",
    '<｜DSML｜invoke name="x">\n</｜DSML｜invoke>',
    "Ⅻ ② ¾ ٣ ",
]


def mixed_text(size: int = 1_000_000, seed: int = 0) -> str:
    """About `size` characters: project source files interleaved with the fragments above."""
    rng = random.Random(seed)
    sources = sorted(
        p.read_text(encoding="utf-8")
        for d in ("engine", "prompts", "agent", "tools")
        for p in (_ROOT / d).glob("*.py")
    )
    parts: list[str] = []
    total = 0
    while total < size:
        if sources and rng.random() < 0.3:
            src = rng.choice(sources)
            start = rng.randrange(max(1, len(src) - 2000))
            piece = src[start : start + rng.randrange(200, 2000)]
        else:
            piece = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(1, 8)))
        parts.append(piece)
        total += len(piece)
    return "".join(parts)[:size]
