"""Assemble a server (engine, tokenizer, cache, worker, app) and run it under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds4_agent.agent.server_app import AppConfig, create_app
from ds4_agent.agent.server_cache import CachePolicy, PromptCache
from ds4_agent.agent.server_replay import ReplayMap
from ds4_agent.agent.server_snapshots import open_backend
from ds4_agent.agent.server_worker import SamplerFactory, Worker

log = logging.getLogger("ds4_agent.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: could resolve anywhere


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose the model beyond this machine without a key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"refusing to listen on {host} without --api-key: anyone who can reach this port "
            "could use the model; pass --api-key KEY (or bind to 127.0.0.1 and use an SSH tunnel)"
        )


def load_tokenizer(model_dir: Path, tokenizer: Path | None = None) -> Any:
    from ds4_agent.engine.tokenizer import Tokenizer

    return Tokenizer.from_file(tokenizer or model_dir)


@dataclass
class Server:
    app: Any
    worker: Worker
    cache: PromptCache
    replay: ReplayMap
    config: AppConfig

    def shutdown(self) -> None:
        self.worker.stop(save=True)


def build_server(
    engine: Any,
    tokenizer: Any,
    *,
    model_name: str,
    ctx: int,
    kv_disk_dir: Path | None = None,
    kv_disk_space_mb: int = 4096,
    api_key: str | None = None,
    policy: CachePolicy | None = None,
    sampler_factory: SamplerFactory | None = None,
    default_thinking: bool = True,
    keepalive_s: float = 10.0,
    max_body_bytes: int | None = None,
    aliases: list[str] | None = None,
) -> Server:
    backend = None
    index_path = None
    replay_dir = None
    if kv_disk_dir is not None:
        kv_disk_dir = Path(kv_disk_dir)
        kv_disk_dir.mkdir(parents=True, exist_ok=True)
        # The directory is a plain snapshot store (it can be the agent's own, to share the
        # cache); the server's text index and tool-call replay map sit in `server/` inside it.
        backend = open_backend(engine, kv_disk_dir, kv_disk_space_mb)
        index_path = kv_disk_dir / "server" / "index.json"
        replay_dir = kv_disk_dir / "server" / "tool-replay"
    replay = ReplayMap(replay_dir)
    cache = PromptCache(engine, tokenizer, backend, index_path, policy)
    worker = Worker(engine, tokenizer, cache, replay, ctx, sampler_factory)
    config = AppConfig(
        model_name=model_name,
        fingerprint=str(getattr(engine, "fingerprint", ""))[:32],
        api_key=api_key,
        default_thinking=default_thinking,
        keepalive_s=keepalive_s,
        aliases=list(aliases or []),
        ctx=ctx,
    )
    if max_body_bytes is not None:
        config.max_body_bytes = max_body_bytes
    app = create_app(worker, replay, config)
    worker.start()
    return Server(app, worker, cache, replay, config)


class BackgroundServer:
    """uvicorn in a thread on an already-bound socket (tests, embedding)."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        check_bind(host, server.config.api_key)
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"
        cfg = uvicorn.Config(
            server.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5
        )
        self.uv = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        import time

        deadline = time.monotonic() + 120  # generous: CI machines can be very busy
        while not self.uv.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)
        self.server.shutdown()
        self.sock.close()


def run_server(server: Server, host: str, port: int) -> None:
    import uvicorn

    try:
        uvicorn.run(server.app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        # uvicorn returns after SIGINT/SIGTERM; snapshot the live state before exiting.
        server.shutdown()
