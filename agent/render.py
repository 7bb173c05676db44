"""Token-level rendering of the pieces the agent appends to its transcript.

The transcript only grows, so the agent never renders a whole conversation: it renders the
next piece (a user turn, a batch of tool results, a closing) straight to token ids, in the
shapes of the official DeepSeek V4 encoder (docs: engine-spec §5.2):

    system     BOS [effort paragraph] SYSTEM-TEXT "\n\n" TOOLS            (no role token)
    user       <｜User｜> TEXT <｜Assistant｜> (<think> | </think>)
    tools      <｜User｜> <tool_result>R1</tool_result> "\n\n" <tool_result>R2</tool_result>
               <｜Assistant｜> (<think> | </think>)
    assistant  sampled tokens …  "\n\n<｜DSML｜tool_calls>…</｜DSML｜tool_calls>" EOS

Special tokens come only from the structure here, never from text: user text, tool output
and project instructions are encoded with `encode_untrusted`, so a file that contains
`<｜User｜>` cannot forge a turn. The fixed protocol texts (tool preamble, effort paragraph)
come from the official encoder in `prompts/encoding.py` and are encoded as trusted text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
CALLS_OPEN = f"<{DSML}tool_calls>"
CALLS_CLOSE = f"</{DSML}tool_calls>"


class TokenizerLike(Protocol):
    def encode_trusted(self, text: str) -> list[int]: ...
    def encode_untrusted(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_id(self, special: str) -> int: ...


@dataclass(frozen=True)
class Specials:
    bos: int
    eos: int
    user: int
    assistant: int
    think: int
    think_end: int
    dsml: int

    @classmethod
    def of(cls, tok: TokenizerLike) -> Specials:
        return cls(
            bos=tok.token_id(BOS),
            eos=tok.token_id(EOS),
            user=tok.token_id(USER),
            assistant=tok.token_id(ASSISTANT),
            think=tok.token_id(THINK),
            think_end=tok.token_id(THINK_END),
            dsml=tok.token_id(DSML),
        )


class Renderer:
    def __init__(self, tok: TokenizerLike) -> None:
        self.tok = tok
        self.sp = Specials.of(tok)

    # -- pieces --------------------------------------------------------------------------

    def assistant_prefix(self, thinking: bool) -> list[int]:
        return [self.sp.assistant, self.sp.think if thinking else self.sp.think_end]

    def user_turn(self, text: str, thinking: bool) -> list[int]:
        return [self.sp.user, *self.tok.encode_untrusted(text), *self.assistant_prefix(thinking)]

    def tool_results(self, results: Sequence[str], thinking: bool, note: str = "") -> list[int]:
        # Official: results joined by "\n\n"; a user note in the same turn follows after "\n\n".
        # Raw, as the official encoder renders them (see prompts/encoding.py on escaping):
        # results are plain text, so they cannot contain control tokens anyway.
        body = "\n\n".join(f"<tool_result>{r}</tool_result>" for r in results)
        if note:
            body = f"{body}\n\n{note}" if body else note
        return [self.sp.user, *self.tok.encode_untrusted(body), *self.assistant_prefix(thinking)]

    def bare_text(self, text: str) -> list[int]:
        """Text with no role token (system-role text after the system prompt)."""
        return self.tok.encode_untrusted(text)

    def close_round(self, in_think: bool) -> list[int]:
        """Well-formed ending for a cut-short assistant round: close <think>, then EOS."""
        return [self.sp.think_end, self.sp.eos] if in_think else [self.sp.eos]

    def system_prefix(
        self, system_text: str, tools: list[dict[str, Any]], reasoning_effort: str | None = None
    ) -> list[int]:
        """BOS + [effort paragraph] + system text + tool preamble and schemas.

        Rendered by the project's official-equivalent encoder at token level: the protocol
        texts are scaffolding (their special strings become special ids), while the system
        text and the schemas are data (plain text, so AGENTS.md cannot forge a turn).
        """
        if not tools and reasoning_effort != "max":
            # Without tools or effort paragraph the official rendering is BOS + the text.
            return [self.sp.bos, *self.tok.encode_untrusted(system_text)]
        from ds4_agent.prompts.encoding import render_tokens

        msg: dict[str, Any] = {"role": "system", "content": system_text}
        if tools:
            msg["tools"] = tools
        return render_tokens(
            self.tok, [msg], thinking_mode="thinking", reasoning_effort=reasoning_effort
        )
