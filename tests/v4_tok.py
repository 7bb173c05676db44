"""Cached loaders for the tokenizer tests: our Tokenizer and the HF `tokenizers` references."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ds4_agent.engine.tokenizer import Tokenizer


@functools.cache
def ours(path: Path) -> Tokenizer:
    return Tokenizer.from_file(path)


@functools.cache
def hf_trusted(path: Path):
    """HF with its default added-token matching (the trusted entry point's reference)."""
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(path))


@functools.cache
def hf_plain(path: Path):
    """HF with the added-token list emptied (the untrusted entry point's reference)."""
    import tokenizers

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["added_tokens"] = []
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def hf_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids
