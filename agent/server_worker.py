"""The single inference worker: one thread owns the engine and the live state.

Requests wait in a FIFO queue (first come, first served, so no client starves). Each job
carries a cancel flag that the HTTP side sets when its client disconnects; the engine checks
it between prefill chunks and between decoded tokens (`should_stop`), so a dropped request
stops within one chunk, including during a long prefill. Whatever the engine already
processed stays in the live state, which remains valid: its token list always says exactly
what it holds, and the cache matches on that.

Events go back to the asyncio side through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ds4_agent.agent.server_cache import ContextOverflow, PromptCache
from ds4_agent.agent.server_completion import CompletionParser
from ds4_agent.agent.server_convert import GenRequest, Sampling
from ds4_agent.agent.server_events import (
    Accepted,
    Done,
    Event,
    Failed,
    StopMatcher,
    TextDelta,
    ToolStart,
    Usage,
)
from ds4_agent.agent.server_replay import ReplayMap, ReplayRecord
from ds4_agent.engine.generate import Cancelled

log = logging.getLogger("ds4_agent.server")

EOS_TEXT = "<｜end▁of▁sentence｜>"
THINK_END = "</think>"
PREFILL_CHUNK = 512


@dataclass
class Job:
    gen: GenRequest
    prompt: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event]
    id_prefix: str = "call_"
    segments: list[Any] = field(default_factory=list)  # control/data pieces of `prompt`
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0

    def emit(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:
            self.cancel.set()  # the event loop is gone: nobody is listening


SamplerFactory = Callable[[Sampling], Any]


def default_sampler_factory(s: Sampling) -> Any:
    from ds4_agent.engine.sampling import Sampler, SamplerConfig

    knobs = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed}
    if s.min_p is not None:  # otherwise the engine's default (0.05, as ds4 and the model card)
        knobs["min_p"] = s.min_p
    return Sampler(SamplerConfig(**knobs))


class Worker:
    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        cache: PromptCache,
        replay: ReplayMap,
        ctx: int,
        sampler_factory: SamplerFactory | None = None,
    ) -> None:
        self.engine = engine
        self.tok = tokenizer
        self.cache = cache
        self.replay = replay
        self.ctx = ctx
        self.sampler_factory = sampler_factory or default_sampler_factory
        self.eos_id = tokenizer.eos_id
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="ds4-inference", daemon=True)
        self.busy = False
        self.completed = 0
        self.cancelled = 0
        self.prefill_chunk = PREFILL_CHUNK
        # Called from the worker thread after each prefill chunk: (job, done, total).
        self.on_prefill_progress: Callable[[Job, int, int], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._q.put(job)

    def queued(self) -> int:
        return self._q.qsize()

    def stop(self, save: bool = True) -> None:
        """Finish the current job (cancelled), then snapshot the live state and exit."""
        self._stopping.set()
        self._q.put(None)
        self._thread.join()
        if save:
            self.cache.save_live("shutdown")

    def _main(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if job.cancel.is_set() or self._stopping.is_set():
                self.cancelled += 1
                job.emit(Done("cancelled"))
                continue
            self.busy = True
            job.started = time.monotonic()
            try:
                self._run(job)
            except Exception as e:  # keep serving: one bad job must not kill the worker
                log.exception("inference job failed")
                job.emit(Failed(500, f"inference failed: {type(e).__name__}: {e}"))
                self._recover()
            finally:
                self.busy = False
                self.completed += 1

    def _recover(self) -> None:
        # After an unexpected engine error the live state may be inconsistent; start clean.
        try:
            self.cache.reset()
        except Exception:
            log.exception("could not reset the live state")

    # -- one request ----------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        stop = lambda: job.cancel.is_set() or self._stopping.is_set()  # noqa: E731
        # Thinking without tools: the encoder drops this turn's reasoning next time, so the
        # next prompt diverges right after this prompt's <｜Assistant｜> (see server_cache).
        gen = job.gen
        try:
            plan = self.cache.plan(
                job.prompt,
                job.segments,
                turn_snapshot=gen.thinking_mode == "thinking" and not gen.has_tools,
                ctx=self.ctx,
            )
            total = plan.prompt_tokens
        except ContextOverflow as e:
            total = e.total
        if total >= self.ctx:
            job.emit(
                Failed(
                    400,
                    f"the prompt has {total} tokens but the context is {self.ctx}; "
                    "shorten the conversation or start the server with a larger --ctx",
                    "messages",
                )
            )
            return
        room = self.ctx - total
        max_tokens = min(job.gen.max_tokens or room, room)
        job.emit(Accepted(total, plan.cached_tokens))

        # Prefill the suffix, pausing at snapshot checkpoints.
        state = self.cache.state
        done = plan.cached_tokens
        cuts = [*plan.checkpoints, total]
        t0 = time.monotonic()
        for cut in cuts:
            if cut <= done:
                continue
            ids = plan.suffix_ids[done - plan.cached_tokens : cut - plan.cached_tokens]
            # On cancel the engine raises between chunks; the state then holds the chunks
            # that completed, which is still a valid prefix.
            progress = self._progress_for(job, state, total)
            with contextlib.suppress(Cancelled):
                self.engine.prefill(
                    state, ids, chunk_size=self.prefill_chunk, progress=progress, should_stop=stop
                )
            if stop() or state.n_tokens != cut:
                self.cancelled += 1
                job.emit(Done("cancelled", Usage(total, plan.cached_tokens, 0)))
                return
            done = cut
            if cut != total or cut in plan.checkpoints:
                self.cache.save_live("prefill")
        if total - plan.cached_tokens:
            log.info(
                "prefill %d tokens (%d cached) in %.2fs",
                total - plan.cached_tokens,
                plan.cached_tokens,
                time.monotonic() - t0,
            )
        self._generate(job, state, plan.cached_tokens, total, max_tokens, stop)

    def _progress_for(self, job: Job, state: Any, total: int) -> Callable[[int, int], None] | None:
        hook = self.on_prefill_progress
        if hook is None:
            return None
        return lambda _done, _n: hook(job, state.n_tokens, total)

    def _generate(
        self,
        job: Job,
        state: Any,
        cached: int,
        total: int,
        max_tokens: int,
        stop: Callable[[], bool],
    ) -> None:
        gen = job.gen
        decode = self.cache.text.decoder()
        mode = "chat" if gen.continues_assistant else gen.thinking_mode
        parser = CompletionParser(mode, lambda: job.id_prefix + secrets.token_hex(12))
        stopper = StopMatcher(gen.stops)
        sampler = self.sampler_factory(gen.sampling)
        completion: list[str] = []
        visible: list[str] = []
        calls: list[str] = []
        n = 0
        finish = None
        saw_eos = False
        frontier = self.cache.policy.frontier_tokens
        next_frontier = (state.n_tokens // frontier + 1) * frontier if frontier else 0

        def route(events: list[Event]) -> bool:
            """Emit parser events; True once a stop string ended the answer."""
            for ev in events:
                if isinstance(ev, TextDelta):
                    out = stopper.push(ev.text)
                    if out:
                        visible.append(out)
                        job.emit(TextDelta(out))
                    if stopper.matched is not None:
                        return True
                else:
                    if isinstance(ev, ToolStart):
                        calls.append(ev.call_id)
                    job.emit(ev)
            return False

        for tid in self.engine.generate(
            state,
            sampler,
            max_tokens,
            stop_ids=[self.eos_id],
            should_stop=stop,
            # DSML structure (tags, parameter headers) is sampled greedily, payloads normally:
            # a structural slip costs the whole call, a payload choice does not (as ds4-server).
            greedy_when=lambda _state: parser.in_structure,
        ):
            n += 1
            if frontier and state.n_tokens == next_frontier:
                next_frontier += frontier
                # Aligned snapshots during long generations too, but not once a tool call
                # has started: that text is about to be replayed from the live state anyway.
                if not calls and not parser.in_structure:
                    self.cache.save_live("decode frontier")
            if tid == self.eos_id:
                finish = "stop"
                saw_eos = True
                route(parser.feed(decode.flush() + EOS_TEXT))
                break
            text = decode.feed(tid)
            completion.append(text)
            if route(parser.feed(text)):
                finish = "stop"
                break
            if parser.calls_done:
                finish = "tool_calls"
                break
            if parser.failed:
                # Malformed output (a stray special token, broken DSML): end the answer here.
                log.info("ending the answer early: %s", parser.error)
                finish = "stop"
                break
        if finish is None:
            finish = "cancelled" if stop() else ("length" if n >= max_tokens else "stop")
        if finish == "cancelled":
            self.cancelled += 1
        if finish != "tool_calls" and not saw_eos:
            tail = decode.flush()
            if tail:
                completion.append(tail)
            route(parser.feed(tail) if tail else [])
            route(parser.finish())
        rest = stopper.flush()
        if rest and stopper.matched is None:
            visible.append(rest)
            job.emit(TextDelta(rest))
        if parser.calls and finish in ("stop", "length") and parser.calls_done:
            finish = "tool_calls"
        if parser.calls_done and calls and not gen.continues_assistant:
            self._remember(gen.thinking_mode, "".join(completion), "".join(visible), calls)
        usage = Usage(total, cached, n)
        log.info(
            "request done: %d prompt tokens (%d cached), %d generated, finish=%s, %.2fs in queue",
            total,
            cached,
            n,
            finish,
            job.started - job.enqueued,
        )
        job.emit(Done(finish, usage, stopper.matched))

    def _remember(self, mode: str, completion: str, content: str, call_ids: list[str]) -> None:
        reasoning = ""
        rest = completion
        if mode == "thinking":
            at = completion.find(THINK_END)
            if at < 0:
                return
            reasoning, rest = completion[:at], completion[at + len(THINK_END) :]
        if not rest.startswith(content):
            return
        dsml = rest[len(content) :]
        if dsml.endswith(EOS_TEXT):
            dsml = dsml[: -len(EOS_TEXT)]
        try:
            self.replay.put(ReplayRecord(reasoning, content, dsml, tuple(call_ids)))
        except OSError as e:
            log.warning("could not persist the tool-call replay record: %s", e)
