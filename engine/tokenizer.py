"""DeepSeek V4 tokenizer: byte-level BPE on tiktoken, loaded from tokenizer.json or GGUF metadata.

Why tiktoken is exact here: the V4 vocabulary ids follow the merge order (checked at load), and
every vocabulary string is reachable by its own merges, so tiktoken's "merge the adjacent pair
whose concatenation has the lowest rank" with rank = id picks the same merges as HF's BPE. The
pre-tokenizer (three successive HF `Split` steps) is folded into one regex, see `pretokenize`.

Two entry points:
- `encode_trusted`: our own prompt scaffolding. Every added token (all 1,283 of them, whether
  flagged special or not, as HF `tokenizers` does by default) is matched by string.
- `encode_untrusted`: everything else (user text, files, tool output, model-written text that is
  re-tokenized). Special strings stay plain text, so nothing read from disk can inject a control
  token.

Added-token matching: HF matches non-normalized added tokens first and normalized ones in the
gaps, each leftmost-longest; tiktoken matches all of them in one leftmost-first scan. The two agree
when no added token is a prefix of another and no non-normalized token can start inside a
normalized one (`_check_added_tokens_disjoint`, true for V4), so tiktoken's
Aho-Corasick special matcher does the work. Lone surrogates in input text are replaced by U+FFFD (they cannot be UTF-8 encoded).
"""

from __future__ import annotations

import codecs
import functools
import json
import mmap
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from ds4_agent.engine import pretokenize

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for the 256 byte values (char -> byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@functools.cache
def _byte_table() -> dict[int, str]:
    """str.translate table: alphabet char -> the latin-1 char of its byte; the latin-1 chars that
    are not in the alphabet map to a non-latin-1 char so that the final encode rejects them."""
    table: dict[int, str] = {c: "\U0010ffff" for c in range(256)}
    table.update({ord(ch): chr(b) for ch, b in _byte_decoder().items()})
    return table


def _piece_bytes(piece: str) -> bytes | None:
    """Byte-level BPE piece -> raw bytes; None when the string is not in the byte alphabet."""
    try:
        return piece.translate(_byte_table()).encode("latin-1")
    except UnicodeEncodeError:
        return None


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool = False  # informational: trusted mode matches every added token
    normalized: bool = False  # HF matches non-normalized added tokens before normalized ones


class TokenizerError(ValueError):
    """A tokenizer file that this implementation cannot load exactly."""


class Tokenizer:
    """Byte-level BPE with DeepSeek V4's pre-tokenizer; see the module docstring."""

    def __init__(
        self,
        vocab: Sequence[str | None],
        merges: Iterable[tuple[str, str]],
        added: Sequence[AddedToken],
        *,
        source: str = "<memory>",
    ) -> None:
        self.source = source
        added_by_id = {t.id: t for t in added}
        ranks: dict[bytes, int] = {}
        for i, piece in enumerate(vocab):
            if piece is None or i in added_by_id:
                continue
            raw = _piece_bytes(piece)
            if raw is None:
                raise TokenizerError(
                    f"{source}: token {i} {piece!r} is neither a byte-level BPE piece nor an added token"
                )
            if raw in ranks:
                raise TokenizerError(f"{source}: tokens {ranks[raw]} and {i} have the same bytes")
            ranks[raw] = i
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(f"{source}: the vocabulary lacks single-byte pieces {missing[:8]}")
        _check_merge_order(merges, vocab, source)
        _check_added_tokens_disjoint(added, source)

        self.added_tokens: dict[str, int] = {t.content: t.id for t in added}
        self._added_by_id = added_by_id
        self.vocab_size = max([len(vocab) - 1, *added_by_id]) + 1
        self._enc = tiktoken.Encoding(
            name=f"ds4-v4:{source}",
            pat_str=pretokenize.COMBINED,
            mergeable_ranks=ranks,
            special_tokens=dict(self.added_tokens),
        )
        self._token_bytes: list[bytes] = [b""] * self.vocab_size
        for raw, i in ranks.items():
            self._token_bytes[i] = raw
        for t in added:
            self._token_bytes[t.id] = t.content.encode("utf-8")
        self.bos_id = self.token_id(BOS)
        self.eos_id = self.token_id(EOS)
        self.pad_id = self.added_tokens.get(PAD)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, a model directory holding one, or a `.gguf` file."""
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                return cls.from_tokenizer_json(p / "tokenizer.json")
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return cls.from_gguf(ggufs[0])
            raise TokenizerError(f"{p}: no tokenizer.json or .gguf file in this directory")
        if not p.is_file():
            raise TokenizerError(f"{p}: no such file (pass tokenizer.json, a model dir or a .gguf)")
        if p.suffix == ".gguf":
            return cls.from_gguf(p)
        return cls.from_tokenizer_json(p)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            model = data["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{p}: not a readable HF tokenizer.json ({e})") from e
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges"):
            raise TokenizerError(f"{p}: expected a plain byte-level BPE model")
        _check_pretokenizer(data.get("pre_tokenizer"), p)
        vocab_map: dict[str, int] = model["vocab"]
        vocab: list[str | None] = [None] * (max(vocab_map.values()) + 1)
        for s, i in vocab_map.items():
            vocab[i] = s
        merges = [
            tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]
        ]
        added = [
            AddedToken(
                int(t["id"]),
                t["content"],
                bool(t.get("special", False)),
                bool(t.get("normalized", False)),
            )
            for t in data.get("added_tokens", [])
        ]
        return cls(vocab, merges, added, source=str(p))  # type: ignore[arg-type]

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.ggml.tokens/merges/token_type` (control = 3 and user-defined = 4 tokens
        are the added tokens; special tokens are still resolved by string)."""
        p = Path(path)
        meta = read_gguf_metadata(p, _GGUF_KEYS)
        model = meta.get("tokenizer.ggml.model")
        if model is not None and model != "gpt2":
            raise TokenizerError(
                f"{p}: tokenizer.ggml.model is {model!r}, not gpt2 (byte-level BPE)"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in meta:
                raise TokenizerError(f"{p}: GGUF metadata lacks {key}")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        types: list[int] = meta.get("tokenizer.ggml.token_type", [])
        added = [AddedToken(i, tokens[i], t == 3) for i, t in enumerate(types) if t in (3, 4)]
        return cls(tokens, merges, added, source=str(p))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ encoding
    def encode_trusted(self, text: str) -> list[int]:
        """Prompt scaffolding: added-token strings become their ids."""
        return self._enc.encode(text, allowed_special="all", disallowed_special=())

    def encode_untrusted(self, text: str) -> list[int]:
        """Plain text: special strings are ordinary characters (no control-token injection)."""
        return self._enc.encode_ordinary(text)

    def token_id(self, special: str) -> int:
        """Id of an added token, by its exact string."""
        try:
            return self.added_tokens[special]
        except KeyError:
            raise KeyError(f"{special!r} is not an added token of {self.source}") from None

    def is_added(self, token_id: int) -> bool:
        return token_id in self._added_by_id

    # ------------------------------------------------------------------ decoding
    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(
                f"token id {token_id} outside the vocabulary (0..{self.vocab_size - 1})"
            )
        return self._token_bytes[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        tb = self._token_bytes
        try:
            return b"".join(tb[i] for i in ids)
        except (IndexError, TypeError):
            bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
            raise IndexError(f"token ids outside the vocabulary: {bad[:8]}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Special tokens are kept as their strings; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Token ids in, text out, never emitting a broken UTF-8 character.

    Bytes of an incomplete character are held until the next token completes it; bytes that can
    never form a valid character are emitted as U+FFFD (exactly what `decode` does on the whole
    sequence, so the concatenated output equals `decode(all_ids)` once `flush` is called).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token_id))

    def feed_many(self, ids: Iterable[int]) -> str:
        return self._dec.decode(self._tok.decode_bytes(ids))

    @property
    def pending(self) -> bool:
        """True while bytes of an unfinished character are held back."""
        return bool(self._dec.getstate()[0])

    def flush(self) -> str:
        """End of stream: held bytes (an incomplete character) become U+FFFD."""
        return self._dec.decode(b"", final=True)


# ---------------------------------------------------------------------- GGUF metadata
_GGUF_KEYS = frozenset(
    {
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
    }
)
# GGUF value types: fixed-size scalars (struct format) and the two variable-size ones.
_GGUF_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path, keys: frozenset[str]) -> dict[str, object]:
    """The wanted key/value pairs of a little-endian GGUF v2/v3 header.

    Hand-written because `gguf.GGUFReader` builds one numpy view per array element: about a
    minute for V4's 129,280 tokens and 127,741 merges, against well under a second here. Only
    the metadata section is read (memory-mapped), never the tensors.
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse_gguf_kv(mm, keys)
    except (OSError, ValueError, struct.error, UnicodeDecodeError, IndexError) as e:
        raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from e


def _parse_gguf_kv(buf: mmap.mmap, keys: frozenset[str]) -> dict[str, object]:
    if buf[:4] != b"GGUF":
        raise ValueError("bad magic")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n : pos].decode("utf-8")

    def value(vtype: int, keep: bool) -> object:
        nonlocal pos
        if vtype in _GGUF_SCALARS:
            fmt = "<" + _GGUF_SCALARS[vtype]
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return v
        if vtype == _GGUF_STRING:
            return string()
        if vtype != _GGUF_ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[etype]
            size = struct.calcsize(fmt) * count
            out = list(struct.unpack_from(f"<{count}{fmt}", buf, pos)) if keep else None
            pos += size
            return out
        return [value(etype, keep) for _ in range(count)]

    found: dict[str, object] = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        v = value(vtype, key in keys)
        if key in keys:
            found[key] = v
            if len(found) == len(keys):
                break
    return found


# ---------------------------------------------------------------------- load checks
def _check_pretokenizer(pre: object, path: Path) -> None:
    """Only DeepSeek V4's pre-tokenizer is implemented; refuse anything else loudly."""
    try:
        steps = pre["pretokenizers"]  # type: ignore[index]
        patterns = tuple(s["pattern"]["Regex"] for s in steps[:3])
        ok = (
            pre["type"] == "Sequence"  # type: ignore[index]
            and len(steps) == 4
            and all(s["type"] == "Split" and s["behavior"] == "Isolated" for s in steps[:3])
            and not any(s.get("invert") for s in steps[:3])
            and patterns == pretokenize.STEPS
            and steps[3]["type"] == "ByteLevel"
            and not steps[3].get("use_regex", True)
            and not steps[3].get("add_prefix_space", True)
        )
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise TokenizerError(
            f"{path}: pre-tokenizer is not DeepSeek V4's (3 Isolated Splits + ByteLevel); "
            "only the DeepSeek V4 tokenizer is supported"
        )


def _check_merge_order(
    merges: Iterable[tuple[str, str]], vocab: Sequence[str | None], source: str
) -> None:
    """rank = id is only exact if merge results appear in increasing id order."""
    index = {s: i for i, s in enumerate(vocab) if s is not None}
    prev = -1
    for n, (a, b) in enumerate(merges):
        i = index.get(a + b)
        if i is None or i <= prev:
            raise TokenizerError(
                f"{source}: merge {n} ({a!r} {b!r}) breaks the rank = id order that this "
                "tiktoken-based BPE relies on"
            )
        prev = i


def _check_added_tokens_disjoint(added: Sequence[AddedToken], source: str) -> None:
    """tiktoken scans leftmost-first over all added tokens; HF scans leftmost-longest, first over
    non-normalized tokens, then over normalized ones in the gaps. The results agree when no token
    is a prefix of another and no non-normalized token can start inside a normalized one."""
    strings = [t.content for t in added]
    if any(not s for s in strings):
        raise TokenizerError(f"{source}: empty added token")
    ordered = sorted(strings)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.startswith(a):
            raise TokenizerError(f"{source}: added token {a!r} is a prefix of {b!r}")
    # A normalized token loses to a non-normalized one in HF only when the latter starts inside
    # it (overlapping from the right or contained); tiktoken would keep the leftmost one.
    normalized = [t.content for t in added if t.normalized]
    plain = [t.content for t in added if not t.normalized]
    plain_set = set(plain)
    plain_prefixes = {m[:k] for m in plain for k in range(1, len(m))}
    for n in normalized:
        for i in range(1, len(n)):
            if n[i:] in plain_prefixes:
                raise TokenizerError(f"{source}: added token {n!r} can overlap a later one")
            for j in range(i + 1, len(n) + 1):
                if n[i:j] in plain_set:
                    raise TokenizerError(f"{source}: added token {n[i:j]!r} occurs in {n!r}")
