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


def tokenizer(path: Path) -> Any:
    from ds4_agent.engine.tokenizer import Tokenizer

    return Tokenizer.from_file(path)


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
