"""`ds4-agent -r` with no name: pick a session from a numbered list (normal screen)."""

from __future__ import annotations

from ds4_agent.sessions.session import SessionMeta
from ds4_agent.sessions.session_export import age


def pick(metas: list[SessionMeta]) -> str | None:
    """Print the sessions, read a number or name; returns the chosen session id."""
    if not metas:
        print("no sessions in this repository yet")
        return None
    for i, m in enumerate(metas[:30], 1):
        print(f"{i:>3}. {m.name:<24} {age(m.updated):>9}  {m.n_tokens:>7} tok  {m.title[:60]}")
    try:
        answer = input("resume which session (number or name, empty to cancel)? ").strip()
    except EOFError:
        return None
    if not answer:
        return None
    if answer.isdigit() and 1 <= int(answer) <= min(len(metas), 30):
        return metas[int(answer) - 1].id
    for m in metas:
        if answer in (m.name, m.id) or m.id.startswith(answer):
            return m.id
    print(f"no session '{answer}'")
    return None
