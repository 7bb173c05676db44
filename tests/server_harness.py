"""Test helpers for the HTTP server: a tiny real-vocabulary model behind a loopback server.

Generation is forced where a test needs specific output (a tool call, a given answer): the
server's sampler factory takes the next script from a queue, else samples normally.
"""

from __future__ import annotations

import collections
import functools
import threading
from pathlib import Path
from typing import Any

from ds4_agent.agent.server_cache import CachePolicy
from ds4_agent.agent.server_convert import Sampling
from ds4_agent.agent.server_runtime import BackgroundServer, build_server
from ds4_agent.agent.server_worker import default_sampler_factory
from tiny_model import REAL_VOCAB, build_tiny_model

MODEL_NAME = "ds4-tiny"
THINK_END = "</think>"
EOS = "<｜end▁of▁sentence｜>"


@functools.lru_cache(maxsize=2)
def load_stack(tokenizer_json: str) -> tuple[Any, Any]:
    from ds4_agent.engine.generate import Engine
    from ds4_agent.engine.tokenizer import Tokenizer

    model_dir = build_tiny_model("window", vocab=REAL_VOCAB)
    return Engine.load(model_dir), Tokenizer.from_file(tokenizer_json)


class Scripts:
    """Queue of forced completions (token id lists); empty queue = real sampling."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._q: collections.deque[list[int]] = collections.deque()
        self._lock = threading.Lock()

    def push_text(self, *parts: str, eos: bool = True) -> list[int]:
        ids: list[int] = []
        for p in parts:
            ids += self.tok.encode_trusted(p)
        if eos:
            ids.append(self.tok.eos_id)
        with self._lock:
            self._q.append(ids)
        return ids

    def factory(self, s: Sampling) -> Any:
        from ds4_agent.engine.sampling import ScriptedSampler

        with self._lock:
            ids = self._q.popleft() if self._q else None
        return default_sampler_factory(s) if ids is None else ScriptedSampler(ids)


def start_server(
    tokenizer_json: Path,
    kv_dir: Path | None,
    scripts: Scripts | None = None,
    **kwargs: Any,
) -> BackgroundServer:
    engine, tok = load_stack(str(tokenizer_json))
    host = kwargs.pop("host", "127.0.0.1")
    server = build_server(
        engine,
        tok,
        model_name=MODEL_NAME,
        ctx=kwargs.pop("ctx", 4096),
        kv_disk_dir=kv_dir,
        policy=kwargs.pop("policy", CachePolicy(min_snapshot_tokens=8, frontier_tokens=0)),
        sampler_factory=(scripts or Scripts(tok)).factory,
        **kwargs,
    )
    try:
        return BackgroundServer(server, host=host)
    except BaseException:
        server.shutdown()
        raise


def dsml_call(name: str, params: list[tuple[str, str, bool]]) -> str:
    """A tool-call block as the model writes it (params: name, raw value, is_string)."""
    body = "\n".join(
        f'<｜DSML｜parameter name="{k}" string="{"true" if s else "false"}">{v}</｜DSML｜parameter>'
        for k, v, s in params
    )
    return (
        f'\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="{name}">\n{body}\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    )
