"""Concurrency: many streaming clients, disconnects mid-stream and mid-prefill."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from ds4_agent.agent.server_convert import GenRequest, Sampling
from ds4_agent.agent.server_events import Accepted, Done
from ds4_agent.agent.server_worker import Job
from ds4_agent.prompts.encoding import Segment
from server_harness import MODEL_NAME, Scripts, load_stack, start_server

N_CLIENTS = 16


@pytest.mark.slow
def test_sixteen_streaming_clients_some_disconnecting(tokenizer_json: Path, tmp_path: Path) -> None:
    with start_server(tokenizer_json, tmp_path / "kv") as srv:
        worker = srv.server.worker
        system = {"role": "system", "content": "You are a load-test target. Reply briefly."}
        results: dict[int, dict] = {}
        errors: list[BaseException] = []

        def client(i: int) -> None:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
            leaves = i % 4 == 1  # a quarter of the clients hang up after two chunks
            try:
                stream = c.chat.completions.create(
                    model=MODEL_NAME,
                    messages=[system, {"role": "user", "content": f"client {i} says hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=40 if leaves else 4,
                    seed=i,
                    extra_body={"thinking": {"type": "disabled"}},
                )
                out = {"chunks": 0, "finish": None, "usage": None, "left": leaves}
                for chunk in stream:
                    out["chunks"] += 1
                    out["usage"] = chunk.usage or out["usage"]
                    for ch in chunk.choices:
                        out["finish"] = ch.finish_reason or out["finish"]
                    if leaves and out["chunks"] == 2:
                        stream.close()
                        break
                results[i] = out
            except BaseException as e:  # collected and re-raised in the main thread
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(N_CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        elapsed = time.monotonic() - t0
        assert not errors, errors[0]
        assert len(results) == N_CLIENTS
        for i, r in results.items():
            if r["left"]:
                continue
            # Every completed response is well formed: a finish reason and usage.
            assert r["finish"] in ("stop", "length"), (i, r)
            assert r["usage"] is not None and r["usage"].completion_tokens <= 4
        # The disconnected clients' generations were cancelled, not run to 40 tokens.
        deadline = time.monotonic() + 60
        while (worker.busy or worker.queued()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.cancelled >= 1
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"

        # The server is still up and still reuses the cache.
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        msgs = [system, {"role": "user", "content": "client 3 says hi"}]
        r = c.chat.completions.create(
            model=MODEL_NAME,
            messages=msgs,
            max_tokens=3,
            extra_body={"thinking": {"type": "disabled"}},
        )
        assert r.usage.prompt_tokens_details.cached_tokens > 0
        print(f"\n{N_CLIENTS} clients in {elapsed:.1f}s; cancelled {worker.cancelled}")


def test_cancel_during_prefill_keeps_a_valid_live_state(tokenizer_json: Path) -> None:
    engine, tok = load_stack(str(tokenizer_json))
    scripts = Scripts(tok)
    with start_server(tokenizer_json, None, scripts) as srv:
        worker, cache = srv.server.worker, srv.server.cache
        worker.prefill_chunk = 16
        seen: list[int] = []

        def on_progress(job: Job, done: int, total: int) -> None:
            seen.append(done)
            if len(seen) == 2:
                job.cancel.set()  # what a client disconnect does

        worker.on_prefill_progress = on_progress
        prompt = (
            "<｜begin▁of▁sentence｜><｜User｜>"
            + "count the words " * 20
            + "<｜Assistant｜></think>"
        )
        gen = GenRequest([], "chat", None, 5, Sampling())
        segments = [Segment(prompt, "control")]

        async def run() -> list:
            job = Job(gen, prompt, asyncio.get_running_loop(), asyncio.Queue(), segments=segments)
            worker.submit(job)
            events = []
            while not events or not isinstance(events[-1], Done):
                events.append(await asyncio.wait_for(job.events.get(), 60))
            return events

        events = asyncio.run(run())
        assert isinstance(events[0], Accepted) and events[-1].finish_reason == "cancelled"
        total = events[0].prompt_tokens
        # Stopped between chunks: the live state holds exactly the chunks that completed.
        assert cache.state.n_tokens == 32 < total
        assert cache.state.tokens == tok.encode_trusted(prompt)[:32]

        # The same prompt again continues from those 32 tokens and completes.
        worker.on_prefill_progress = None
        scripts.push_text("done")

        async def again() -> list:
            job = Job(gen, prompt, asyncio.get_running_loop(), asyncio.Queue(), segments=segments)
            worker.submit(job)
            events = []
            while not events or not isinstance(events[-1], Done):
                events.append(await asyncio.wait_for(job.events.get(), 60))
            return events

        events = asyncio.run(again())
        assert events[0].cached_tokens == 32
        assert events[-1].finish_reason == "stop"


def test_non_streaming_client_that_hangs_up_cancels_its_generation(tokenizer_json: Path) -> None:
    with start_server(tokenizer_json, None) as srv:
        worker = srv.server.worker
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "write a long story"}],
            "max_tokens": 400,  # far more than fits in the client's patience below
            "thinking": {"type": "disabled"},
        }
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=3)
        deadline = time.monotonic() + 60
        while worker.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.cancelled == 1
        while worker.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        # Stopped long before 400 tokens (about 0.15 s each here).
        assert srv.server.cache.state.n_tokens < 200
        assert time.monotonic() - t0 < 60
