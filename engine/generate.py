"""`Engine`: load a DeepSeek V4 checkpoint, prefill in chunks, decode, generate.

    engine = Engine.load(model_dir, numerics="official")   # or "exact"
    state = engine.new_state()
    logits = engine.prefill(state, ids, chunk_size=256, progress=cb, should_stop=cb)
    for tok in engine.generate(state, Sampler(SamplerConfig()), max_tokens=100):
        ...

`prefill` and `decode` return the last position's logits as an `mx.array` float32 [vocab].
The device is synchronised once per chunk / per decoded token (`mx.eval`), never inside the
layer loop. Cancellation is checked between chunks and raises `Cancelled`; the state then
holds exactly the chunks that completed (a valid prefix).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
from ds4_agent.engine.config import ModelConfig
from ds4_agent.engine.decode_step import FastDecoder
from ds4_agent.engine.model import NUMERICS, Model
from ds4_agent.engine.qtensor import Weight
from ds4_agent.engine.sampling import Sampler
from ds4_agent.engine.state import DecodeState, new_layer_state
from ds4_agent.engine.state_export import StateExport
from ds4_agent.engine.weights import load_weights, materialize

DEFAULT_CHUNK = 256
DECODE_PATHS = ("fast", "reference")
# Forces the decode path of every Engine built without an explicit `decode_path`.
DECODE_PATH_ENV = "DS4_DECODE_PATH"


class Cancelled(Exception):
    """Prefill stopped between chunks because `should_stop()` returned True."""

    def __init__(self, done: int, total: int):
        super().__init__(f"prefill cancelled after {done} of {total} tokens")
        self.done, self.total = done, total


def _load_weights(model_dir: Path) -> dict[str, Weight]:
    weights = load_weights(model_dir)
    materialize(weights)  # one layer at a time: bounded peak memory, no lazy reads later
    return weights


def _upcast_dense(weights: dict[str, Weight]) -> dict[str, Weight]:
    """bf16/f16 matrices → float32 once at load (a new dict; the caller's is untouched).

    The forward pass runs activations in float32 (as the official reference runs its
    compressors and head); multiplying by a bf16 matrix would materialise a float32 copy of it
    on every call. The embedding table stays bf16 (only rows are gathered), and so do stacked
    bf16 experts (their matmul casts the activations instead: doubling them would not fit).
    """
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        if (
            isinstance(w, mx.array)
            and w.ndim == 2
            and w.dtype in (mx.bfloat16, mx.float16)
            and name != "embed.weight"
        ):
            w = w.astype(mx.float32)
            mx.eval(w)
        out[name] = w
    return out


def checkpoint_fingerprint(model_dir: Path, numerics: str) -> str:
    """Cheap content fingerprint: config, index, every shard's header (names, dtypes, shapes =
    the quantization scheme) and sampled data blocks, plus the numerics mode."""
    h = hashlib.sha256()
    h.update(f"numerics={numerics}\n".encode())
    for name in ("config.json", "model.safetensors.index.json"):
        p = model_dir / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(f"{shard.name}:{size}\n".encode())
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(n))
            for off in (8 + n, (8 + n + size) // 2, max(8 + n, size - 65536)):
                f.seek(off)
                h.update(f.read(65536))
    return h.hexdigest()[:32]


class Engine:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, Weight],
        numerics: str = "official",
        fingerprint: str | None = None,
        decode_path: str | None = None,
        fuse_experts: bool = False,
        upcast_scales: bool = False,
    ):
        """`decode_path`: "fast" (the compiled single-token step, engine/decode_step.py) or
        "reference" (`Model.forward`, the general chunk path); default from the environment
        variable DS4_DECODE_PATH, else "fast". `fuse_experts` stacks each layer's routed w1|w3
        into one [2E, I, D] array at load so one gather computes both (w1 / w3 become views of
        it: no extra memory after load, one layer's stack of transient peak while building).
        `upcast_scales` stores affine scales/biases float32 at load, which saves a cast of each
        whole expert stack's scales per token and layer (exact; costs memory, see
        `decode_step.upcast_affine_scales`)."""
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        self.config = config
        self.numerics = numerics
        self.model = Model(config, _upcast_dense(weights), numerics)
        self.fingerprint = (
            fingerprint
            or hashlib.sha256((config.model_dump_json() + numerics).encode()).hexdigest()[:32]
        )
        path = decode_path or os.environ.get(DECODE_PATH_ENV) or "fast"
        if path not in DECODE_PATHS:
            raise ValueError(
                f"decode path must be one of {DECODE_PATHS}, got {path!r} "
                f"(argument decode_path or environment variable {DECODE_PATH_ENV})"
            )
        self.decode_path = path
        self.fuse_experts = fuse_experts
        self.upcast_scales = upcast_scales
        self._fast: FastDecoder | None = None
        if path == "fast":
            self._fast = self._build_fast()

    @property
    def fast_decoder(self) -> FastDecoder:
        """The compiled decode step (packed at load when the engine decodes on the fast path,
        on first use otherwise)."""
        if self._fast is None:
            self._fast = self._build_fast()
        return self._fast

    def _build_fast(self) -> FastDecoder:
        return FastDecoder(
            self.model, fuse_experts=self.fuse_experts, upcast_scales=self.upcast_scales
        )

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        numerics: str = "official",
        decode_path: str | None = None,
        fuse_experts: bool = False,
        upcast_scales: bool = False,
    ) -> Engine:
        model_dir = Path(model_dir)
        cfg = ModelConfig.from_dir(model_dir)
        weights = _load_weights(model_dir)
        return cls(
            cfg,
            weights,
            numerics,
            checkpoint_fingerprint(model_dir, numerics),
            decode_path=decode_path,
            fuse_experts=fuse_experts,
            upcast_scales=upcast_scales,
        )

    # ------------------------------------------------------------------ state

    def new_state(self) -> DecodeState:
        return DecodeState.new(self.config, self.numerics)

    def import_state(self, export: StateExport) -> DecodeState:
        if export.numerics != self.numerics:
            raise ValueError(
                f"state was computed with numerics {export.numerics!r}; "
                f"this engine runs {self.numerics!r} (load it with numerics={export.numerics!r})"
            )
        st = DecodeState.from_export(self.config, export)
        mx.eval(*st.arrays())
        return st

    # ------------------------------------------------------------------ forward

    def _check_ids(self, ids: list[int]) -> None:
        v = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {v})")

    def _advance(
        self, state: DecodeState, ids: list[int], all_logits: bool = False, fast: bool = False
    ) -> mx.array:
        """Run one chunk transactionally: on an exception (or Ctrl-C) the state is rolled back
        to exactly what it was (a valid prefix).

        The rollback snapshot holds only the small arrays and the row counts, not second
        references to the growable row buffers: an append then finds its buffer referenced
        once and MLX updates it in place (donation) instead of copying the whole cache per
        row. Rows below the old counts are never written, so rolling back the counts suffices.
        """
        snap = state.checkpoint()
        try:
            if fast:
                logits = self.fast_decoder.step(state, ids[0])
            else:
                logits = self.model.forward(state, ids, all_logits=all_logits)
            mx.eval(logits, *state.arrays())
        except BaseException:
            state.rollback(snap)
            raise
        state.tokens.extend(ids)
        return logits

    def prefill(
        self,
        state: DecodeState,
        token_ids: Iterable[int],
        chunk_size: int | None = DEFAULT_CHUNK,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> mx.array:
        """Append tokens to the state; returns the last position's logits float32 [vocab]."""
        ids = [int(t) for t in token_ids]
        if not ids:
            if state.logits is None:
                raise ValueError("prefill needs at least one token on an empty state")
            return state.logits
        self._check_ids(ids)
        step = chunk_size or len(ids)
        done = 0
        logits = None
        while done < len(ids):
            if should_stop is not None and should_stop():
                raise Cancelled(done, len(ids))
            chunk = ids[done : done + step]
            logits = self._advance(state, chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, len(ids))
        return logits

    def forward_all(
        self, state: DecodeState, token_ids: Iterable[int], chunk_size: int | None = None
    ) -> np.ndarray:
        """Like prefill but returns the logits of every input position, float32 [T, vocab]."""
        ids = [int(t) for t in token_ids]
        self._check_ids(ids)
        step = chunk_size or max(len(ids), 1)
        out = []
        for a in range(0, len(ids), step):
            lg = self._advance(state, ids[a : a + step], all_logits=True)
            out.append(np.array(lg, dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.config.vocab_size), np.float32)

    def decode(self, state: DecodeState, token_id: int) -> mx.array:
        """Append one token; returns the logits for the next position, float32 [vocab]."""
        self._check_ids([int(token_id)])
        return self._advance(state, [int(token_id)], fast=self.uses_fast_path(state))

    def uses_fast_path(self, state: DecodeState) -> bool:
        """Whether `decode` on this state runs the compiled single-token step."""
        return self.decode_path == "fast" and self.fast_decoder.supports(state)

    def generate(
        self,
        state: DecodeState,
        sampler: Sampler,
        max_tokens: int,
        stop_ids: Iterable[int] | None = None,
        on_token: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        greedy_when: Callable[[DecodeState], bool] | None = None,
    ) -> Iterator[int]:
        """Sample up to `max_tokens` tokens after a prefill, yielding each id.

        Every yielded token except a stop token is decoded into the state, so after the loop
        the state holds the prompt plus the generated text; a stop token (EOS or one of
        `stop_ids`) is yielded but *not* fed, leaving it to the next prefill. `greedy_when`
        is asked before each step and forces argmax when it returns True (e.g. while DSML
        structure is being emitted).
        """
        if state.logits is None:
            raise ValueError("generate needs logits: prefill the prompt first")
        stops = {self.config.eos_token_id, *(int(t) for t in (stop_ids or ()))}
        logits = state.logits
        for _ in range(max_tokens):
            if should_stop is not None and should_stop():
                return
            greedy = bool(greedy_when(state)) if greedy_when is not None else False
            tok = sampler.sample(logits, greedy=greedy)
            if on_token is not None:
                on_token(tok)
            yield tok
            if tok in stops:
                return
            logits = self.decode(state, tok)

    # ------------------------------------------------------------------ MTP

    def mtp_draft(self, state: DecodeState, token_id: int) -> mx.array:
        """One MTP draft step for the token that follows the state: draft logits for the
        position after it. The block's raw window lives on the state (not exported)."""
        if not self.model.has_mtp():
            raise ValueError("this checkpoint has no MTP block (mtp.0.* tensors)")
        if state.last_streams is None:
            raise ValueError("mtp_draft needs a prefilled state")
        if state.mtp_layer is None:
            state.mtp_layer = new_layer_state(self.config, 0)
            state.mtp_layer.raw_pos = np.full(self.config.sliding_window, -1, dtype=np.int64)
        mtp = state.mtp_layer
        logits, _ = self.model.mtp_step(state.last_streams, int(token_id), state.n_tokens, mtp)
        mx.eval(logits, mtp.raw)
        return logits


def describe(engine: Engine) -> str:
    c = engine.config
    return json.dumps(
        {
            "layers": c.num_hidden_layers,
            "ratios": c.ratios,
            "hidden": c.hidden_size,
            "vocab": c.vocab_size,
            "numerics": engine.numerics,
            "fingerprint": engine.fingerprint,
        }
    )
