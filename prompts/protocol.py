"""The fixed DeepSeek V4 protocol strings (special tokens, tools preamble, effort paragraph).

They live in `protocol.json` with their provenance (the official encoder file, wheel version,
licence) and SHA-256 values; loading verifies every text, so a corrupted or edited data file fails
loudly instead of silently changing what the model reads.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources


class ProtocolDataError(RuntimeError):
    """protocol.json is missing, malformed or does not match its recorded SHA-256 values."""


@dataclass(frozen=True)
class Protocol:
    bos: str
    eos: str
    user: str
    assistant: str
    latest_reminder: str
    think_start: str
    think_end: str
    dsml: str
    tasks: dict[str, str]
    tools_preamble: str
    tools_suffix: str
    reasoning_effort_max: str
    response_format_header: str
    provenance: dict[str, str]

    @property
    def special_strings(self) -> tuple[str, ...]:
        """Every added-token string the renderer itself writes."""
        return (
            self.bos,
            self.eos,
            self.user,
            self.assistant,
            self.latest_reminder,
            self.think_start,
            self.think_end,
            self.dsml,
            *self.tasks.values(),
        )


@functools.cache
def protocol() -> Protocol:
    try:
        raw = resources.files("ds4_agent.prompts").joinpath("protocol.json").read_text("utf-8")
        data = json.loads(raw)
        texts: dict[str, str] = {}
        for key, entry in data["texts"].items():
            text = entry["text"]
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if digest != entry["sha256"] or len(text.encode("utf-8")) != entry["bytes"]:
                raise ProtocolDataError(
                    f"protocol.json: text {key!r} does not match its sha256/bytes; "
                    "restore the file from the repository"
                )
            texts[key] = text
        tok = data["tokens"]
        return Protocol(
            bos=tok["bos"],
            eos=tok["eos"],
            user=tok["user"],
            assistant=tok["assistant"],
            latest_reminder=tok["latest_reminder"],
            think_start=tok["think_start"],
            think_end=tok["think_end"],
            dsml=tok["dsml"],
            tasks=dict(tok["tasks"]),
            tools_preamble=texts["tools_preamble"],
            tools_suffix=texts["tools_suffix"],
            reasoning_effort_max=texts["reasoning_effort_max"],
            response_format_header=texts["response_format_header"],
            provenance=dict(data["provenance"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProtocolDataError(
            f"prompts/protocol.json is unreadable ({e}); reinstall ds4-agent"
        ) from e
