"""`ds4-agent debug logits`: float32 logits [T, vocab] for every input position.

Works on a bare checkpoint directory (config.json + safetensors; no tokenizer needed). The
tokens file is a JSON list of ids (or an object with a "tokens" list). With `--load-state` the
ids continue the saved state and the output covers only the new positions; `--save-state`
writes the state after the last id (single-file `.npz`, see `engine/state_file.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from ds4_agent.agent.cmd_common import fail
from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_path, fsync_dir


def _read_tokens(path: str) -> list[int]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--tokens-file {path}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--tokens-file {path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        data = data.get("tokens")
    if not isinstance(data, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in data
    ):
        raise ValueError(f"--tokens-file {path}: expected a JSON list of token ids")
    return data


def _write_logits(path: str, engine, state, tokens: list[int], chunk: int | None) -> tuple:
    """Stream [T, vocab] float32 rows chunk by chunk into a memory-mapped .npy (a long token
    file never holds all logits in RAM), then fsync and rename into place atomically."""
    out = Path(path)
    shape = (len(tokens), engine.config.vocab_size)
    # PRIVATE_MODE, no parent creation, strict directory fsync: as this file was always written.
    with atomic_path(out, mode=PRIVATE_MODE, parents=False, sync_dir=False) as tmp:
        if tokens:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            step = chunk or len(tokens)
            for a in range(0, len(tokens), step):
                rows = engine.forward_all(state, tokens[a : a + step])
                arr[a : a + len(rows)] = rows
            arr.flush()
            del arr
        else:  # only --load-state/--save-state: an empty [0, vocab] array
            with open(tmp, "wb") as f:  # a handle: np.save(path) would append ".npy"
                np.save(f, np.zeros(shape, dtype=np.float32))
    fsync_dir(out.parent, strict=True)
    return shape


def cmd_logits(args: argparse.Namespace) -> int:
    from ds4_agent.engine.config import ConfigError
    from ds4_agent.engine.generate import Engine
    from ds4_agent.engine.state_file import StateFileError, load_state, save_state

    try:
        tokens = _read_tokens(args.tokens_file)
        if args.chunk is not None and args.chunk <= 0:
            raise ValueError("--chunk must be a positive number of tokens")
        if not tokens and not args.load_state:
            raise ValueError(f"--tokens-file {args.tokens_file}: no token ids")
        engine = Engine.load(args.model, numerics=args.numerics)
        if args.load_state:
            state = engine.import_state(load_state(args.load_state, engine.fingerprint))
        else:
            state = engine.new_state()
        shape = _write_logits(args.out, engine, state, tokens, args.chunk)
        if args.save_state:
            save_state(args.save_state, state.export(), engine.fingerprint)
    except (ValueError, ConfigError, StateFileError, FileNotFoundError, KeyError) as e:
        return fail(str(e).strip("'\""))
    print(f"wrote {args.out}: logits {shape[0]}×{shape[1]} float32")
    return 0
