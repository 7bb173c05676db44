"""Property tests: an edit applies exactly what was asked (modulo reported whitespace tolerance)
or changes nothing."""

from __future__ import annotations

import os
import tempfile

from ds4_agent.tools.match import plan_edit
from ds4_agent.tools.result import ToolError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tools_helpers import Harness

ALPHABET = "ab \t\n\r"
texts = st.text(alphabet=ALPHABET, max_size=40)
snippets = st.text(alphabet=ALPHABET, min_size=1, max_size=12)


def norm_lines(s: str) -> list[str]:
    lines = [ln.strip() for ln in s.replace("\r\n", "\n").split("\n")]
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return lines


@st.composite
def edit_cases(draw):
    text = draw(texts)
    if text and draw(st.booleans()):
        i = draw(st.integers(0, len(text) - 1))
        j = draw(st.integers(i + 1, len(text)))
        old = text[i:j]
    else:
        old = draw(snippets)
    new = draw(st.text(alphabet=ALPHABET + "XY", max_size=12))
    return text, old, new, draw(st.booleans())


@settings(max_examples=600, deadline=None)
@given(edit_cases())
def test_plan_applies_exactly_or_refuses(case):
    text, old, new, replace_all = case
    try:
        plan = plan_edit(text, old, new, replace_all)
    except ToolError:
        # Refusals are only allowed when the exact request is ambiguous or impossible.
        if old != new and old and not replace_all:
            occurrences = sum(1 for i in range(len(text)) if text.startswith(old, i))
            assert occurrences != 1
        elif old != new and old and replace_all:
            assert old not in text
        return
    result = plan.apply(text)
    if plan.strategy == "exact":
        expected = text.replace(old, new) if replace_all else text.replace(old, new, 1)
        assert result == expected
        return
    # A tolerant match: each replaced region equals old, and each inserted text equals new,
    # once line endings and the whitespace around each line are ignored.
    assert old not in text
    pos = 0
    for (s, e), rep in zip(plan.spans, plan.replacements, strict=True):
        assert pos <= s <= e
        assert norm_lines(text[s:e]) == norm_lines(old.replace("\r\n", "\n"))
        assert norm_lines(rep) == norm_lines(new)
        pos = e
    if not replace_all:
        assert len(plan.spans) == 1


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts,
    st.lists(
        st.tuples(snippets, st.text(alphabet=ALPHABET + "XY", max_size=8)), min_size=1, max_size=3
    ),
)
def test_multiedit_on_disk_is_all_or_nothing(text, ops):
    with tempfile.TemporaryDirectory() as d:
        h = Harness(d)
        try:
            path = h.write_file("f.txt", text.encode())
            h.ok("Read", file_path="f.txt")
            before = path.read_bytes()
            res = h(
                "MultiEdit",
                file_path="f.txt",
                edits=[{"old_string": o, "new_string": n} for o, n in ops],
            )
            after = path.read_bytes()
            expected = text
            try:
                for o, n in ops:
                    expected = plan_edit(expected, o, n).apply(expected)
            except ToolError:
                expected = None
            if res.is_error:
                assert after == before
                assert expected is None
            else:
                assert after.decode() == expected
            assert sorted(os.listdir(d)) == ["f.txt"]
        finally:
            h.close()
