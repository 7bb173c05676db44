"""Opening a session for the loop: warm start, resume, rebuild, autosave.

- New session: the system prefix (system prompt + tool schemas + project instructions) is
  looked up in the snapshot store by its tokens; a hit restores it with no prefill (warm
  start, shared by every session and headless run of this repository and model). A miss
  prefills it once and saves it pinned, so the next session starts warm.
- Resume: restore the session's latest snapshot (zero prefill; the stored next-token logits
  are used as they are). If it is missing, corrupt, from another model build, or does not
  match the transcript, rebuild the state by prefill from the transcript's token ids, with a
  visible notice. A session whose last turn was cut off by a crash gets a well-formed ending
  appended first.
- Autosave: after each turn the transcript is already on disk (one fsynced line per entry);
  the metadata and a snapshot of the synced state are written too.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ds4_agent.agent.context import find_instruction_files, instructions_text
from ds4_agent.agent.kvstate import KVSnapshots
from ds4_agent.agent.loop import Agent, Interrupted
from ds4_agent.sessions.transcript import Entry

SYSTEM_PIN = "system-prefix"  # warm-start prefixes are kept through eviction


def base_system_prompt() -> str:
    return (resources.files("ds4_agent.prompts") / "system.md").read_text(encoding="utf-8").strip()


def system_text(repo_root: Path, cwd: Path | None = None) -> str:
    parts = [base_system_prompt()]
    inst = instructions_text(find_instruction_files(repo_root, cwd), repo_root)
    if inst:
        parts.append(inst)
    return "\n\n".join(parts)


@dataclass
class StartInfo:
    kv_restored: bool = False
    restored_tokens: int = 0
    prefill_tokens: int = 0
    notice: str | None = None


def start(
    agent: Agent,
    kv: KVSnapshots | None,
    system_tokens: list[int] | None = None,
    system_display: str = "",
) -> StartInfo:
    """Bring `agent.state` level with the session transcript (or create its system prefix).

    `system_tokens` is only needed for a new, empty session. Raises Interrupted if the user
    stops the prefill (the transcript stays valid; the next start continues it).
    """
    info = StartInfo()
    s = agent.session
    if len(s.transcript) == 0:
        if system_tokens is None:
            raise ValueError("a new session needs its system prefix tokens")
        state = kv.restore_prefix(system_tokens) if kv is not None else None
        if state is not None:
            agent.state = state
            info.kv_restored = True
            info.restored_tokens = state.n_tokens
        agent.append(Entry(kind="system", tokens=list(system_tokens), text=system_display))
        before = agent.total_prefill
        agent.sync()
        info.prefill_tokens = agent.total_prefill - before
        if kv is not None and info.restored_tokens < len(system_tokens):
            s.meta.system_snapshot = kv.save(agent.state, pin=SYSTEM_PIN, replace_pin=False)
        if kv is not None:
            s.meta.model_fingerprint = kv.fingerprint
        s.save_meta()
        return info

    _close_dangling_turn(agent)
    tokens = agent.tokens
    state, logits, reason = (
        kv.restore(s.meta.snapshot, tokens) if kv is not None else (None, None, "")
    )
    if state is not None and (logits is not None or state.n_tokens < len(tokens)):
        agent.state = state
        agent.logits = logits
        info.kv_restored = True
        info.restored_tokens = state.n_tokens
    else:
        if state is not None:
            reason = "its snapshot has no next-token logits"
        # Reuse the shared system prefix if it is there: only the conversation is prefilled.
        prefix = kv.restore_prefix(tokens) if kv is not None else None
        agent.state = prefix if prefix is not None else agent.engine.new_state()
        agent.logits = None
        info.restored_tokens = agent.state.n_tokens
        info.kv_restored = False
        why = f": {reason}" if reason else ""
        info.notice = (
            f"rebuilding session '{s.meta.name}' by prefill of "
            f"{len(tokens) - agent.state.n_tokens} tokens{why}"
        )
        agent.events.notice(info.notice)
    before = agent.total_prefill
    agent.sync()
    info.prefill_tokens = agent.total_prefill - before
    return info


def _close_dangling_turn(agent: Agent) -> None:
    """A crash between a user/tool turn and the model's answer leaves an open assistant
    prefix; end it (`</think>` + EOS) so the transcript is well-formed again."""
    entries = agent.session.transcript.entries
    if entries and entries[-1].kind in ("user", "tool_results"):
        agent.append(
            Entry(
                kind="notice",
                tokens=agent.render.close_round(agent.cfg.thinking),
                data={"reason": "the previous run ended before the answer"},
            )
        )


def attach_compaction(agent: Agent, kv: KVSnapshots | None, sampler: Any = None) -> None:
    """Let the loop compact by itself when the context nears its limit. `sampler` writes the
    summary (default: greedy)."""
    from ds4_agent.agent.compaction import compact

    def run(a: Agent, focus: str = "") -> Any:
        r = compact(a, kv, focus=focus, sampler=sampler)
        a.events.notice(
            f"compacted {r.old_tokens} → {r.new_tokens} tokens (summary {r.summary_tokens}, "
            f"recent turns {r.tail_tokens}); the previous transcript is kept as epoch {r.old_epoch}"
        )
        return r

    agent.compactor = run


def autosave(agent: Agent, kv: KVSnapshots | None) -> None:
    """End of turn: metadata always; a snapshot when the state is level with the transcript."""
    s = agent.session
    if kv is not None and agent.n_pending == 0 and agent.logits is not None:
        try:
            s.meta.snapshot = kv.save(agent.state, pin=s.meta.id)
            s.meta.model_fingerprint = kv.fingerprint
        except Exception as e:  # noqa: BLE001 - a failed snapshot costs a rebuild later, not data
            agent.events.notice(f"could not save the KV snapshot ({e}); resume will rebuild it")
    s.save_meta()


__all__ = ["Interrupted", "StartInfo", "attach_compaction", "autosave", "start", "system_text"]
