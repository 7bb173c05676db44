"""Named sessions: transcripts and on-disk KV snapshots (store, budget, integrity)."""
