"""The registry: data-driven schemas that match the argument models, and errors instead of raises."""

from __future__ import annotations

import json

import pytest
from ds4_agent.tools.registry import IMPLEMENTATIONS, ToolRegistry, load_data, parse_specs
from tools_helpers import Harness, assert_one_line_error


def test_schemas_shape_and_names(tmp_path):
    reg = ToolRegistry.from_data(tmp_path)
    try:
        schemas = reg.schemas()
        names = [s["function"]["name"] for s in schemas]
        assert names == [
            "Read",
            "Write",
            "Edit",
            "MultiEdit",
            "Grep",
            "Glob",
            "LS",
            "Bash",
            "BashOutput",
            "KillShell",
            "GitStatus",
            "GitDiff",
            "GitLog",
            "GitShow",
            "GitCommit",
        ]
        for s in schemas:
            assert set(s) == {"type", "function"} and s["type"] == "function"
            assert set(s["function"]) == {"name", "description", "parameters"}
            assert s["function"]["description"]
            assert s["function"]["parameters"]["type"] == "object"
        json.dumps(schemas)  # plain JSON, as the encoder renders it
    finally:
        reg.close()


ALL_SPECS = parse_specs(load_data(), enabled=[t["name"] for t in load_data()["tools"]])


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_data_file_matches_argument_models(spec):
    """The JSON schema the model sees and the pydantic model that validates must agree."""
    model, _ = IMPLEMENTATIONS[spec.impl]
    props = spec.parameters.get("properties", {})
    required = set(spec.parameters.get("required", []))
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    assert set(props) == set(fields), spec.name
    assert required == {n for n, f in fields.items() if f.is_required()}, spec.name
    for name, prop in props.items():
        for key in ("type", "description"):
            assert key in prop, f"{spec.name}.{name} lacks {key}"


def test_enabled_subset_and_bad_data(tmp_path):
    reg = ToolRegistry.from_data(tmp_path, enabled=["Read", "Grep"])
    try:
        assert reg.names() == ["Read", "Grep"]
        assert "unknown tool 'Edit'" in reg.call("Edit", {}).text
    finally:
        reg.close()
    with pytest.raises(ValueError, match="unknown tool"):
        ToolRegistry.from_data(tmp_path, enabled=["Nope"])
    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps({"tools": [{"name": "X", "impl": "nope", "kind": "read"}]}))
    with pytest.raises(ValueError, match="needs a name and an impl"):
        ToolRegistry.from_data(tmp_path, bad)
    # Descriptions are data: a tuned description reaches the schema without code changes.
    data = load_data()
    data["tools"][0]["description"] = "Custom read description."
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps(data))
    reg = ToolRegistry.from_data(tmp_path, custom)
    try:
        assert reg.schemas()[0]["function"]["description"] == "Custom read description."
    finally:
        reg.close()


def test_bad_arguments_become_retryable_errors(tmp_path):
    h = Harness(tmp_path)
    try:
        cases = [
            ("Edit", {"file_path": "a"}),
            ("Read", {"file_path": "a", "offset": "zero"}),
            ("Read", {"file_path": "a", "offset": 0}),
            ("Read", {"file_path": "a", "bogus": 1}),
            ("Grep", {"pattern": "x", "output_mode": "lines"}),
            ("Bash", {}),
            ("MultiEdit", {"file_path": "a", "edits": []}),
        ]
        for name, args in cases:
            res = h.reg.call(name, args)
            assert res.is_error, (name, args)
            assert res.text.startswith(f"Invalid arguments for {name}:"), res.text
            assert "\n" not in res.text
            assert_one_line_error(res.text)
        assert "unknown parameter" in h.reg.call("Read", {"file_path": "a", "bogus": 1}).text
        assert "not valid JSON" in h.reg.call("Read", "{file_path").text
        assert not h.reg.call("Read", '{"file_path": "x"}').text.startswith("Invalid")
        assert "must be an object" in h.reg.call("Read", ["a"]).text
    finally:
        h.close()


def test_string_values_are_coerced(tmp_path):
    """DSML passes string parameters verbatim; numbers and booleans may arrive as strings."""
    h = Harness(tmp_path)
    try:
        h.write_file("a.txt", "1\n2\n3\n")
        assert h.ok("Read", file_path="a.txt", offset="2", limit="1").startswith("     2\t2")
        h.ok("Edit", file_path="a.txt", old_string="2", new_string="two", replace_all="true")
        # Explicit nulls mean "use the default".
        assert h.ok("Read", file_path="a.txt", offset=None, limit=None).startswith("     1\t1")
        h.ok("Edit", file_path="a.txt", old_string="two", new_string="2", replace_all=None)
    finally:
        h.close()


def test_every_error_is_one_line_with_next_step(tmp_path):
    """A sweep over error paths of every tool."""
    h = Harness(tmp_path)
    try:
        h.write_file("a.txt", "x\nx\n")
        h.write_file("bin", b"\x00\x01")
        h.ok("Read", file_path="a.txt")
        calls = [
            ("Read", {"file_path": "missing.txt"}),
            ("Read", {"file_path": "bin"}),
            ("Read", {"file_path": "."}),
            ("Read", {"file_path": "a.txt", "offset": 99}),
            ("Read", {"file_path": "/etc/passwd"}),
            ("Write", {"file_path": ".", "content": "x"}),
            ("Edit", {"file_path": "a.txt", "old_string": "x", "new_string": "y"}),
            ("Edit", {"file_path": "a.txt", "old_string": "zz", "new_string": "y"}),
            ("Edit", {"file_path": "a.txt", "old_string": "x", "new_string": "x"}),
            (
                "MultiEdit",
                {"file_path": "a.txt", "edits": [{"old_string": "q", "new_string": "r"}]},
            ),
            ("Grep", {"pattern": "("}),
            ("Grep", {"pattern": "x", "path": "nowhere"}),
            ("Glob", {"pattern": "*", "path": "a.txt"}),
            ("LS", {"path": "a.txt"}),
            ("LS", {"path": "nowhere"}),
            ("Bash", {"command": "true", "timeout": 10**9}),
            ("BashOutput", {"bash_id": "bash_42"}),
            ("KillShell", {"shell_id": "nope"}),
            ("GitLog", {"ref": "-x"}),
            ("Nope", {}),
        ]
        for name, args in calls:
            res = h(name, **args)
            assert res.is_error, (name, args, res.text)
            assert_one_line_error(res.text)
    finally:
        h.close()


def test_list_sent_as_json_string_is_accepted(tmp_path):
    h = Harness(tmp_path)
    try:
        h.write_file("a.txt", "x = 1\n")
        h.ok("Read", file_path="a.txt")
        edits = '[{"old_string": "x = 1", "new_string": "x = 2"}]'
        h.ok("MultiEdit", file_path="a.txt", edits=edits)
        assert (tmp_path / "a.txt").read_text() == "x = 2\n"
        assert "Invalid arguments for MultiEdit" in h.err(
            "MultiEdit", file_path="a.txt", edits="[not json"
        )
    finally:
        h.close()
