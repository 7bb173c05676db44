"""Rebuild a Hugging Face `tokenizer.json` from a ds4 GGUF's `tokenizer.ggml.*` metadata.

ds4's files carry the DeepSeek V4 byte-level BPE as llama.cpp stores it: the token strings
(ids = positions), the merges ("a b", rank = position), a type per token (1 normal,
3 control, 4 user-defined) and a pre-tokenizer name (`joyai-llm`). The pre-tokenizer itself is
not in the file, so it is supplied here from the V4 reference `tokenizer.json` (spec §5.1): three
`Isolated` regex splits followed by byte-level mapping without a prefix space. The result
tokenizes exactly like the reference file (the tests compare both on the public fixtures).
"""

from __future__ import annotations

from typing import Any

# The V4 pre-tokenizer (engine-spec §5.1), in the reference tokenizer.json's own form.
_V4_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    # CR and LF are literal characters inside the classes, as in the reference file.
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
    "|[^\r\n"
    r"\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+"
    "[\r\n]*"
    r"|\s*"
    "[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+",
)

# Pre-tokenizer names under which llama.cpp-style converters store this tokenizer.
V4_PRE_NAMES = ("joyai-llm", "deepseek-v3", "deepseek-v4")

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class GGUFTokenizerError(ValueError):
    pass


def _pre_tokenizer() -> dict[str, Any]:
    splits = [
        {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}
        for rx in _V4_SPLITS
    ]
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": False,
    }
    return {"type": "Sequence", "pretokenizers": [*splits, byte_level]}


def tokenizer_json_from_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` maps `tokenizer.ggml.*` keys to their contents (lists / scalars)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFTokenizerError(
            f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') files are supported"
        )
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in V4_PRE_NAMES:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.pre is {pre!r}, not the DeepSeek V4 pre-tokenizer "
            f"({', '.join(V4_PRE_NAMES)}); use the model's own tokenizer.json instead"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    types: list[int] = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
    if len(types) != len(tokens):
        raise GGUFTokenizerError(
            f"{len(tokens)} tokens but {len(types)} token types in the GGUF tokenizer metadata"
        )
    # Special-token ids (BOS/EOS/pad) sit inside the BPE vocabulary range in V4, so the BPE
    # vocabulary is every token up to the first added (control / user-defined) token that
    # follows the last merge-reachable one; the added tokens are listed separately as well.
    vocab: dict[str, int] = {}
    added: list[dict[str, Any]] = []
    first_tail = len(tokens)
    while first_tail > 0 and types[first_tail - 1] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
        first_tail -= 1
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
        if i < first_tail:
            vocab[tok] = i
        if typ in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            special = typ == TOKEN_TYPE_CONTROL
            added.append(
                {
                    "id": i,
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": not special,
                    "special": special,
                }
            )
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": []},
        "pre_tokenizer": _pre_tokenizer(),
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config_from_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """A minimal `tokenizer_config.json`: the special tokens by string, no automatic BOS."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])

    def tok(key: str) -> str | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(v)] if v is not None and 0 <= int(v) < len(tokens) else None

    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": tok("bos_token_id"),
        "eos_token": tok("eos_token_id"),
        "pad_token": tok("padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def tokenizer_metadata(source: Any) -> dict[str, Any]:
    """Collect the `tokenizer.ggml.*` fields of a `GGUFSource` (or anything with metadata())."""
    keys = [k for k in source.metadata_keys() if k.startswith("tokenizer.ggml.")]
    if "tokenizer.ggml.tokens" not in keys:
        raise GGUFTokenizerError(f"{source.path}: the GGUF file carries no tokenizer")
    return {k: source.metadata(k) for k in keys}
