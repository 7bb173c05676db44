"""Property tests: our tokenizer gives HF `tokenizers`' ids on generated and mixed text; the
single tiktoken pre-tokenizer regex splits exactly like the three successive HF Split steps."""

from __future__ import annotations

import json

import pytest
from ds4_agent.engine import pretokenize
from ds4_agent.engine.tokenizer import Tokenizer, TokenizerError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mixed_corpus import mixed_text
from v4_tok import hf_ids, hf_plain, hf_trusted, ours

pytest.importorskip("tokenizers")

FRAGMENTS = [
    "def f(x):\n    return x + 1\n",
    "\tif (a && b) { return; }\n",
    "fn main() -> Result<(), E> {}",
    "const x = () => `${y}`;",
    "    ",
    "  \t ",
    "\n\n",
    "\r\n",
    "\r",
    " 123",
    "   4567",
    "000000000000",
    "你好世界",
    "カタカナ・ひらがな",
    "ア・イ゛",
    "한국어",
    "𠀀𪚥",
    "😀",
    "👨‍👩‍👧",
    "👍🏽",
    "🇯🇵",
    "1️⃣",
    "\x00",
    "\x1b[0m",
    "\u200d",
    "\u00a0",
    "\u3000",
    "e\u0301",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>",
    "<|EOT|>",
    "<｜User>",
    "Ⅻ",
    "¾",
]

any_char = st.characters(blacklist_categories=("Cs",))
pieces = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(alphabet=any_char, max_size=6),
    st.text(alphabet=st.sampled_from(" \t\n\r0123456789aZ.,;([{<>_-你ア"), max_size=12),
)
texts = st.lists(pieces, max_size=24).map("".join)

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(text=texts)
def test_matches_hf_on_generated_text(text, tokenizer_json):
    tok = ours(tokenizer_json)
    assert tok.encode_trusted(text) == hf_ids(hf_trusted(tokenizer_json), text)
    assert tok.encode_untrusted(text) == hf_ids(hf_plain(tokenizer_json), text)
    assert tok.decode(tok.encode_trusted(text)) == text
    assert tok.decode(tok.encode_untrusted(text)) == text


@SETTINGS
@given(text=texts)
def test_combined_regex_equals_three_split_steps(text):
    assert pretokenize.split_combined(text) == pretokenize.split_reference(text)


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_untrusted_never_yields_added_tokens(text, tokenizer_json):
    tok = ours(tokenizer_json)
    assert not any(tok.is_added(i) for i in tok.encode_untrusted(text))


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(
        st.one_of(st.integers(0, 129279), st.integers(3, 127999), st.integers(100, 400)),
        max_size=12,
    )
)
def test_decode_matches_hf_on_arbitrary_ids(ids, tokenizer_json):
    # Arbitrary id sequences include broken UTF-8; both replace it the same way.
    expected = hf_trusted(tokenizer_json).decode(ids, skip_special_tokens=False)
    assert ours(tokenizer_json).decode(ids) == expected


def test_one_megabyte_mixed_text(tokenizer_json):
    tok = ours(tokenizer_json)
    text = mixed_text(1_000_000)
    trusted = tok.encode_trusted(text)
    assert trusted == hf_ids(hf_trusted(tokenizer_json), text)
    assert tok.encode_untrusted(text) == hf_ids(hf_plain(tokenizer_json), text)
    assert tok.decode(trusted) == text


def test_pretokenizer_steps_are_the_files(tokenizer_json):
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    steps = data["pre_tokenizer"]["pretokenizers"]
    assert tuple(s["pattern"]["Regex"] for s in steps[:3]) == pretokenize.STEPS


def test_whitespace_before_digits_is_not_one_regex():
    # The reason for three steps: the whitespace run before a digit run ends its piece.
    assert pretokenize.split_reference("a   123") == ["a", "   ", "123"]
    assert pretokenize.split_reference("a   b") == ["a", "  ", " b"]
    assert pretokenize.split_combined("x ア・イ 1234") == [
        "x",
        " ",
        "ア",
        "・",
        "イ",
        " ",
        "123",
        "4",
    ]


def test_stream_decoder_never_emits_broken_utf8(tokenizer_json):
    tok = ours(tokenizer_json)
    text = "héllo 世界 😀👨‍👩‍👧 𪚥 ア\x00"
    ids = tok.encode_untrusted(text)
    assert len(ids) > 8
    dec = tok.stream_decoder()
    out = []
    for i in ids:
        piece = dec.feed(i)
        assert "\ufffd" not in piece
        out.append(piece)
    out.append(dec.flush())
    assert "".join(out) == text
    # Some token must end inside a character for this test to mean anything.
    assert any(not tok.token_bytes(i).decode("utf-8", "ignore") for i in ids) or any(
        _splits_char(tok.token_bytes(i)) for i in ids
    )


def _splits_char(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_stream_decoder_invalid_bytes_match_decode(tokenizer_json):
    tok = ours(tokenizer_json)
    # The single-byte token 0xE4 (a lead byte of a 3-byte character) then "a": never completes.
    lead = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\xe4")
    ids = [lead, *tok.encode_untrusted("a")]
    dec = tok.stream_decoder()
    first = dec.feed(ids[0])
    assert first == "" and dec.pending
    rest = dec.feed(ids[1]) + dec.flush()
    assert first + rest == tok.decode(ids)
    assert "\ufffd" in rest


def test_lone_surrogates_become_replacement_char(tokenizer_json):
    tok = ours(tokenizer_json)
    assert tok.encode_untrusted("a\ud800b") == tok.encode_untrusted("a\ufffdb")


def test_decode_rejects_out_of_range_ids(tokenizer_json):
    tok = ours(tokenizer_json)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode([1, 129280])


def test_model_directory_and_errors(tokenizer_json, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    tok = Tokenizer.from_file(tmp_path / "model")
    assert tok.encode_trusted("<｜User｜>hi") == [128803, 6366]
    with pytest.raises(TokenizerError, match="no tokenizer.json or .gguf"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(TokenizerError, match="no such file"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable HF tokenizer.json"):
        Tokenizer.from_file(tmp_path / "junk.json")


def test_refuses_other_pretokenizers(tokenizer_json, tmp_path):
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,4}"
    (tmp_path / "t.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="pre-tokenizer is not DeepSeek V4's"):
        Tokenizer.from_file(tmp_path / "t.json")


def _tiny(merges, extra=("ab", "ba")):
    from ds4_agent.engine.tokenizer import BOS, EOS, AddedToken, _byte_decoder

    by_byte = {b: ch for ch, b in _byte_decoder().items()}
    vocab = [by_byte[b] for b in range(256)] + list(extra)
    added = [AddedToken(len(vocab), BOS, True), AddedToken(len(vocab) + 1, EOS, True)]
    return Tokenizer(vocab, merges, added)


def test_small_vocab_and_merge_order_check():
    tok = _tiny([("a", "b"), ("b", "a")])
    assert tok.encode_untrusted("ab") == [256] and tok.encode_untrusted("ba") == [257]
    assert tok.encode_trusted("<｜begin▁of▁sentence｜>ab") == [258, 256]
    with pytest.raises(TokenizerError, match="rank = id"):
        _tiny([("b", "a"), ("a", "b")])
    with pytest.raises(TokenizerError, match="single-byte pieces"):
        Tokenizer(["a", "b"], [], [])
