"""`ds4-agent debug tokenize|render|parse`: the stable diagnostics contract."""

from __future__ import annotations

import json

import pytest
from conftest import GOLDEN
from ds4_agent.agent.cli import main

RENDER = sorted((GOLDEN / "dsv4-encoding" / "render").glob("*.json"))
PARSE = sorted((GOLDEN / "dsv4-encoding" / "parse").glob("*.json"))
TOKENS = json.loads((GOLDEN / "tokenizer" / "v4_public.json").read_text(encoding="utf-8"))


def test_tokenize_trusted_and_plain(tokenizer_json, tmp_path, capsys):
    case = next(c for c in TOKENS if c["ids"] != c["ids_plain"])
    assert (
        main(
            [
                "debug",
                "tokenize",
                "--tokenizer",
                str(tokenizer_json),
                "--trusted",
                "--text",
                case["text"],
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == case["ids"]
    f = tmp_path / "in.txt"
    f.write_bytes(case["text"].encode("utf-8"))
    assert main(["debug", "tokenize", "--tokenizer", str(tokenizer_json), "--file", str(f)]) == 0
    assert json.loads(capsys.readouterr().out) == case["ids_plain"]


def test_tokenize_errors(tokenizer_json, tmp_path, capsys):
    assert main(["debug", "tokenize", "--tokenizer", str(tmp_path / "none"), "--text", "x"]) == 1
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    assert main(["debug", "tokenize", "--tokenizer", str(tokenizer_json), "--file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not UTF-8" in err and err.count("\n") == 1


@pytest.mark.parametrize("path", RENDER, ids=[p.stem for p in RENDER])
def test_render(path, tmp_path, capsysbinary):
    case = json.loads(path.read_text(encoding="utf-8"))
    req = tmp_path / "req.json"
    req.write_text(
        json.dumps({"messages": case["messages"], **case["args"]}, ensure_ascii=False),
        encoding="utf-8",
    )
    code = main(["debug", "render", str(req)])
    out = capsysbinary.readouterr()
    if "expected_error" in case:
        assert code == 1 and b"Invalid reasoning effort: low" in out.err
    else:
        assert code == 0 and out.out == case["expected"].encode("utf-8")


def test_render_tools_field_and_bad_requests(tmp_path, capsysbinary):
    case = json.loads(RENDER[2].read_text(encoding="utf-8"))  # tools on the system message
    messages = [dict(m) for m in case["messages"]]
    tools = messages[0].pop("tools")
    req = tmp_path / "req.json"
    req.write_text(
        json.dumps({"messages": messages, "tools": tools, **case["args"]}), encoding="utf-8"
    )
    assert main(["debug", "render", str(req)]) == 0
    assert capsysbinary.readouterr().out == case["expected"].encode("utf-8")
    req.write_text('{"messages": [], "thinking_mode": "fast"}')
    assert main(["debug", "render", str(req)]) == 1
    assert b"thinking_mode" in capsysbinary.readouterr().err
    req.write_text("{oops")
    assert main(["debug", "render", str(req)]) == 1
    assert b"invalid JSON" in capsysbinary.readouterr().err


@pytest.mark.parametrize("path", PARSE, ids=[p.stem for p in PARSE])
def test_parse(path, tmp_path, capsys):
    case = json.loads(path.read_text(encoding="utf-8"))
    f = tmp_path / "completion.txt"
    f.write_bytes(case["completion"].encode("utf-8"))
    code = main(["debug", "parse", "--thinking-mode", case["thinking_mode"], str(f)])
    out = capsys.readouterr()
    if "expected_error" in case:
        assert code == 1 and out.out == "" and out.err.startswith("ds4-agent: invalid")
        return
    assert code == 0
    exp = case["expected"]
    assert json.loads(out.out) == {
        "content": exp["content"],
        "reasoning_content": exp["reasoning_content"],
        "tool_calls": [t["function"] for t in exp["tool_calls"]],
    }
