"""Context compaction: summary + recent tail, on top of the shared system prefix.

When the transcript nears the context limit (soft trigger: 85 % used, or less than
min(8192, ctx/4) free; hard trigger: the next tool results would not fit), the model writes a
durable task-state summary, greedily and without thinking, on a *clone* of the live state, so
the request never enters the real transcript. The session then starts a new transcript epoch:

    system prefix (same tokens; restored from its snapshot, not re-prefilled)
    "[ds4-agent] Summary of the earlier conversation …"     (system-role text, no role token)
    the recent tail, starting at a user turn (≤ min(ctx/10, 50 000) tokens when possible)

Reversible: the previous epoch's transcript file stays on disk and its snapshot was saved
just before, so the pre-compaction state can be restored (`Session.meta.epoch` points at the
current one).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from ds4_agent.agent.loop import Agent, sample_token
from ds4_agent.sessions.transcript import Entry

SOFT_FRACTION = 0.85
MAX_SUMMARY_TOKENS = 4096
MIN_SUMMARY_ROOM = 256


def compaction_prompt() -> str:
    return (resources.files("ds4_agent.prompts") / "compaction.md").read_text("utf-8").strip()


def should_compact(n_tokens: int, ctx_limit: int, fraction: float = SOFT_FRACTION) -> bool:
    free = ctx_limit - n_tokens
    return n_tokens >= fraction * ctx_limit or free <= min(8192, ctx_limit // 4)


def fits(n_tokens: int, extra: int, ctx_limit: int, reserve: int = 1024) -> bool:
    return n_tokens + extra + reserve < ctx_limit


class Greedy:
    """Argmax sampling for the summary (deterministic, no temperature)."""

    def sample(self, logits: Any) -> int:
        import mlx.core as mx

        return int(mx.argmax(logits).item())


@dataclass
class CompactionResult:
    old_tokens: int
    new_tokens: int
    summary_tokens: int
    tail_tokens: int
    old_epoch: int
    summary: str


def tail_start(entries: list[Entry], ctx_limit: int) -> int:
    """Index of the first tail entry: a user turn, as early as the budget allows."""
    budget = min(ctx_limit // 10, 50_000)
    starts = [i for i, e in enumerate(entries) if e.kind == "user"]
    if not starts:
        return len(entries)
    total = 0
    chosen = starts[-1]
    sizes = [len(e.tokens) for e in entries]
    for i in reversed(range(len(entries))):
        total += sizes[i]
        if total > budget:
            break
        if i in starts:
            chosen = i
    return chosen


def compact(agent: Agent, kv: Any = None, focus: str = "", sampler: Any = None) -> CompactionResult:
    """Summarize and restart the transcript as system + summary + tail (see module doc)."""
    from ds4_agent.agent.runtime import autosave

    s = agent.session
    entries = list(s.transcript.entries)
    if not entries or entries[0].kind != "system":
        raise ValueError("nothing to compact: the session has no system prefix")
    agent.sync()
    autosave(agent, kv)  # the pre-compaction state stays restorable
    old_tokens = len(agent.tokens)
    old_epoch = s.meta.epoch

    # 1. The summary, on a clone: the request never becomes part of any transcript.
    request = compaction_prompt()
    if focus:
        request += f"\nFocus the summary on: {focus}"
    req_tokens = agent.render.user_turn(request, thinking=False)
    room = agent.cfg.ctx_limit - old_tokens - len(req_tokens)
    if room < MIN_SUMMARY_ROOM:
        raise ValueError(
            f"context too full to write a summary ({room} tokens free); start a new session "
            "with /new or raise --ctx"
        )
    work = agent.state.clone()
    logits = agent.engine.prefill(work, req_tokens, chunk_size=agent.cfg.prefill_chunk)
    sampler = sampler or Greedy()
    out: list[int] = []
    sp = agent.sp
    for _ in range(min(MAX_SUMMARY_TOKENS, room - 16)):
        if agent.interrupt.is_set():
            raise InterruptedError("compaction interrupted; the session is unchanged")
        tok = sample_token(sampler, logits)
        if tok in (sp.eos, sp.think_end, sp.dsml, sp.user, sp.assistant):
            break
        out.append(tok)
        logits = agent.engine.decode(work, tok)
    summary = agent.tok.decode(out).strip().removesuffix("<").strip()
    del work

    # 2. The new epoch: system prefix + summary + tail.
    cut = tail_start(entries, agent.cfg.ctx_limit)
    tail = entries[cut:]
    system = entries[0]
    summary_text = (
        "\n\n[ds4-agent] Summary of the earlier conversation (older turns were compacted):\n"
        f"{summary}\n[ds4-agent] End of summary; the most recent turns follow verbatim."
    )
    summary_entry = Entry(
        kind="summary",
        tokens=agent.render.bare_text(summary_text),
        text=summary,
        data={"old_epoch": old_epoch, "old_tokens": old_tokens, "focus": focus},
    )
    s.start_epoch()
    agent.tokens = []
    for e in [system, summary_entry, *tail]:
        agent.append(e.model_copy())

    # 3. The new state: the shared system prefix from its snapshot, then prefill the rest.
    prefix = kv.restore_prefix(agent.tokens) if kv is not None else None
    agent.state = prefix if prefix is not None else agent.engine.new_state()
    agent.logits = None
    agent.sync()
    s.save_meta()
    return CompactionResult(
        old_tokens=old_tokens,
        new_tokens=len(agent.tokens),
        summary_tokens=len(summary_entry.tokens),
        tail_tokens=sum(len(e.tokens) for e in tail),
        old_epoch=old_epoch,
        summary=summary,
    )
