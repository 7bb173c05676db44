"""Session exports: a readable text transcript, or JSON with metadata and token ids."""

from __future__ import annotations

import json
import time

from ds4_agent.sessions.session import Session, SessionMeta

_LABELS = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool_results": "tool results",
    "fact": "context",
    "summary": "summary of earlier conversation",
    "notice": "notice",
}


def age(ts: float, now: float | None = None) -> str:
    d = max(0.0, (now or time.time()) - ts)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= secs:
            return f"{int(d // secs)}{unit} ago"
    return "just now"


def meta_summary(m: SessionMeta) -> dict[str, object]:
    return {
        "id": m.id,
        "name": m.name,
        "title": m.title,
        "created": m.created,
        "updated": m.updated,
        "repo": m.repo,
        "branch": m.branch,
        "n_tokens": m.n_tokens,
        "n_turns": m.n_turns,
        "thinking_mode": m.thinking_mode,
        "model_fingerprint": m.model_fingerprint,
        "parent_id": m.parent_id,
        "has_snapshot": m.snapshot is not None,
    }


def export_json(s: Session) -> str:
    doc = {
        "meta": s.meta.model_dump(mode="json"),
        "entries": [e.model_dump(mode="json") for e in s.transcript],
    }
    return json.dumps(doc, ensure_ascii=False, indent=1)


def export_text(s: Session, include_system: bool = False) -> str:
    m = s.meta
    lines = [
        f"# {m.name}",
        f"id {m.id} · repo {m.repo} · branch {m.branch or '-'} · {m.n_tokens} tokens",
        "",
    ]
    for e in s.transcript:
        if e.kind == "system" and not include_system:
            continue
        if e.kind == "notice" and not e.text:
            continue
        lines.append(f"## {_LABELS.get(e.kind, e.kind)}")
        reasoning = e.data.get("reasoning") if e.kind == "assistant" else None
        if reasoning:
            lines.append("> " + reasoning.strip().replace("\n", "\n> "))
            lines.append("")
        if e.text.strip():
            lines.append(e.text.rstrip())
        for call in e.data.get("tool_calls", []) if e.kind == "assistant" else []:
            args = json.dumps(call.get("arguments", {}), ensure_ascii=False)
            lines.append(f"→ {call.get('name')} {args}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
