"""Shared pieces for agent tests: the real engine on a tiny model with the real vocabulary,
the real tokenizer, and scripts of forced tokens (teacher forcing through ScriptedSampler).

Nothing here replaces our own code: the engine, the loop, the tools and the snapshot store
are the real ones; only the sampler's choices are scripted.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_model

DSML = "｜DSML｜"


@functools.lru_cache(maxsize=1)
def model_dir() -> Path:
    # The smallest preset (4 layers, 16-token window: also exercises window wrap-around),
    # with the real 129,280-row vocabulary so the real tokenizer's ids are valid.
    return tiny_model.build_tiny_model("window", vocab=tiny_model.REAL_VOCAB)


@functools.lru_cache(maxsize=1)
def engine() -> Any:
    from ds4_agent.engine.generate import Engine

    return Engine.load(model_dir())


class HFTokenizer:
    """The reference tokenizer (HF `tokenizers` on the real tokenizer.json), exposing the
    project's Tokenizer API; used only until `engine/tokenizer.py` is part of the build."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.hf = Tokenizer.from_file(str(path))
        self._specials = {t.content for t in self.hf.get_added_tokens_decoder().values()}

    def encode_trusted(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_untrusted(self, text: str) -> list[int]:
        # Split around special strings so they are encoded as text, never as control tokens.
        import re

        if not any(s in text for s in self._specials):
            return self.hf.encode(text, add_special_tokens=False).ids
        pat = (
            "("
            + "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True))
            + ")"
        )
        out: list[int] = []
        for part in re.split(pat, text):
            if not part:
                continue
            if part in self._specials:
                # Encode the special string's characters one by one as plain text.
                for ch in part:
                    out += self.hf.encode(ch, add_special_tokens=False).ids
            else:
                out += self.hf.encode(part, add_special_tokens=False).ids
        return out

    def decode(self, ids: Any) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, special: str) -> int:
        i = self.hf.token_to_id(special)
        if i is None:
            raise KeyError(special)
        return i


def tokenizer(path: Path) -> Any:
    """The project's tokenizer when it is part of the build (its own tests check it against
    the reference), else the reference itself."""
    try:
        from ds4_agent.engine.tokenizer import Tokenizer

        return Tokenizer.from_file(path)
    except Exception:  # noqa: BLE001 - not in this build yet, or not loadable: use the reference
        return HFTokenizer(path)


def call_block(*invokes: tuple[str, dict[str, Any]]) -> str:
    """A DSML tool-call block exactly as the official encoder writes one."""
    import json

    parts = []
    for name, args in invokes:
        params = []
        for k, v in args.items():
            if isinstance(v, str):
                params.append(f'<{DSML}parameter name="{k}" string="true">{v}</{DSML}parameter>')
            else:
                params.append(
                    f'<{DSML}parameter name="{k}" string="false">'
                    f"{json.dumps(v, ensure_ascii=False)}</{DSML}parameter>"
                )
        parts.append(f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(parts) + f"\n</{DSML}tool_calls>"


def script(tok: Any, *rounds: str) -> list[int]:
    """Token ids for the model's rounds. Each round is the text after `<think>` (thinking
    mode): 'reasoning</think>answer' or 'reasoning</think>text' + call_block(...). Plain
    answers get EOS appended; rounds ending in a call block get none (the agent adds it)."""
    out: list[int] = []
    for r in rounds:
        out += tok.encode_trusted(r)
        if not r.endswith(f"</{DSML}tool_calls>"):
            out.append(tok.token_id("<｜end▁of▁sentence｜>"))
    return out


def system_tokens(tok: Any, text: str = "You are a test agent.") -> list[int]:
    return [tok.token_id("<｜begin▁of▁sentence｜>"), *tok.encode_untrusted(text)]
