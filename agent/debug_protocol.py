"""Handlers of `ds4-agent debug tokenize|render|parse` (flags: cmd_debug.py, a stable contract).

- tokenize: JSON id list on stdout (plain text unless --trusted).
- render: the exact prompt bytes on stdout (no trailing newline) for a request holding
  `messages`, `thinking_mode`, `reasoning_effort`, `drop_thinking`, `context`, `tools`
  (and optionally `add_default_bos_token`), the way the official encoder takes them.
- parse: the parsed message as JSON (`content`, `reasoning_content`,
  `tool_calls[{name, arguments}]`); exit 1 with the error text on malformed input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from ds4_agent.agent.cmd_common import fail
from pydantic import BaseModel, ConfigDict, ValidationError


class RenderRequest(BaseModel):
    """`debug render` input; messages stay plain dicts (the official encoder's format)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]]
    thinking_mode: Literal["chat", "thinking"] = "thinking"
    reasoning_effort: str | None = None  # checked by the encoder (official message on error)
    drop_thinking: bool = True
    context: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_default_bos_token: bool = True

    def encoder_messages(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """Attach a separate `tools` list to the system message (the encoder reads it there)."""
        messages = [dict(m) for m in self.messages]
        context = [dict(m) for m in self.context] if self.context else None
        if self.tools:
            for m in [*(context or []), *messages]:
                if m.get("role") == "system":
                    m["tools"] = [*m.get("tools", []), *self.tools]
                    break
            else:
                if context:
                    raise ValueError("`tools` needs a system message when `context` is given")
                messages.insert(0, {"role": "system", "content": "", "tools": self.tools})
        return messages, context


def _read_text(path: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None


def cmd_tokenize(args: argparse.Namespace) -> int:
    from ds4_agent.engine.tokenizer import Tokenizer, TokenizerError

    try:
        text = args.text if args.text is not None else _read_text(args.file)
        tok = Tokenizer.from_file(args.tokenizer)
    except (ValueError, TokenizerError) as e:
        return fail(str(e))
    ids = tok.encode_trusted(text) if args.trusted else tok.encode_untrusted(text)
    print(json.dumps(ids))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from ds4_agent.prompts.encoding import EncodingError, encode_messages

    try:
        raw = json.loads(_read_text(args.request))
        req = RenderRequest.model_validate(raw)
        messages, context = req.encoder_messages()
        prompt = encode_messages(
            messages,
            thinking_mode=req.thinking_mode,
            context=context,
            drop_thinking=req.drop_thinking,
            add_default_bos_token=req.add_default_bos_token,
            reasoning_effort=req.reasoning_effort,
        )
    except json.JSONDecodeError as e:
        return fail(f"{args.request}: invalid JSON ({e.msg} at line {e.lineno})")
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "request"
        return fail(f"{args.request}: {where}: {first['msg']}")
    except (ValueError, EncodingError) as e:
        return fail(f"{args.request}: {e}")
    sys.stdout.buffer.write(prompt.encode("utf-8"))
    sys.stdout.buffer.flush()
    return 0


def cmd_parse(args: argparse.Namespace) -> int:
    from ds4_agent.prompts.dsml import parse_completion

    try:
        text = _read_text(args.file)
    except ValueError as e:
        return fail(str(e))
    turn = parse_completion(text, args.thinking_mode)
    if turn.error is not None:
        return fail(turn.error.feedback())
    out = {
        "content": turn.content,
        "reasoning_content": turn.reasoning_content,
        "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in turn.tool_calls],
    }
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0
