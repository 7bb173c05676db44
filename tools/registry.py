"""The tool registry: tool set from the data file (tools.json), validation, permissions, dispatch.

`ToolRegistry.call()` never raises for anything the model sends: unknown tools, malformed or
invalid arguments, refused paths, denied permissions and tool failures all come back as a
`ToolResult` with `is_error=True` and a one-line message that says what to do next.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from . import bash, edit, files, gittools, patch, search
from .context import Limits, ToolContext, ToolEnv
from .jobs import JobManager
from .journal import UndoJournal
from .permissions import PermissionDecision, PermissionPolicy, ToolCall
from .result import ToolError, ToolResult
from .textutil import head_tail
from .workspace import Workspace

ToolFn = Callable[[Any, ToolEnv, ToolContext], ToolResult]

# impl name (the data file's "impl") -> (argument model, function)
IMPLEMENTATIONS: dict[str, tuple[type[BaseModel], ToolFn]] = {
    "read": (files.ReadArgs, files.tool_read),
    "write": (files.WriteArgs, files.tool_write),
    "ls": (files.LSArgs, files.tool_ls),
    "edit": (edit.EditArgs, edit.tool_edit),
    "multiedit": (edit.MultiEditArgs, edit.tool_multiedit),
    "grep": (search.GrepArgs, search.tool_grep),
    "glob": (search.GlobArgs, search.tool_glob),
    "bash": (bash.BashArgs, bash.tool_bash),
    "bash_output": (bash.BashOutputArgs, bash.tool_bash_output),
    "kill_shell": (bash.KillShellArgs, bash.tool_kill_shell),
    "git_status": (gittools.GitStatusArgs, gittools.tool_git_status),
    "git_diff": (gittools.GitDiffArgs, gittools.tool_git_diff),
    "git_log": (gittools.GitLogArgs, gittools.tool_git_log),
    "git_show": (gittools.GitShowArgs, gittools.tool_git_show),
    "git_commit": (gittools.GitCommitArgs, gittools.tool_git_commit),
    "apply_patch": (patch.ApplyPatchArgs, patch.tool_apply_patch),
}

KINDS = {"read", "edit", "shell", "shell_control", "git_read", "git_write", "info"}


@dataclass(frozen=True)
class ToolSpec:
    name: str
    impl: str
    kind: str
    description: str
    parameters: dict[str, Any]
    path_param: str | None = None

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def default_data_path() -> Path:
    return Path(str(resources.files("ds4_agent.tools") / "tools.json"))


def load_data(path: Path | None = None) -> dict[str, Any]:
    path = path or default_data_path()
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"cannot load tool definitions from {path}: {e}; fix or restore the file"
        ) from None
    return data


def parse_specs(data: dict[str, Any], enabled: Iterable[str] | None = None) -> list[ToolSpec]:
    wanted = set(enabled) if enabled is not None else None
    specs = []
    seen = set()
    for i, t in enumerate(data.get("tools", [])):
        name = t.get("name")
        where = f"tool #{i} ({name or 'unnamed'})"
        if not name or t.get("impl") not in IMPLEMENTATIONS:
            raise ValueError(f"{where}: needs a name and an impl from {sorted(IMPLEMENTATIONS)}")
        if t.get("kind") not in KINDS:
            raise ValueError(f"{where}: kind must be one of {sorted(KINDS)}")
        if name in seen:
            raise ValueError(f"{where}: duplicate tool name")
        seen.add(name)
        # An explicit selection overrides the data file's "enabled" flag.
        if (wanted is None and not t.get("enabled", True)) or (
            wanted is not None and name not in wanted
        ):
            continue
        specs.append(
            ToolSpec(
                name,
                t["impl"],
                t["kind"],
                t.get("description", ""),
                t.get("parameters", {"type": "object", "properties": {}}),
                t.get("path_param"),
            )
        )
    if wanted is not None and (missing := wanted - seen):
        raise ValueError(f"unknown tool(s) {sorted(missing)}; available: {sorted(seen)}")
    return specs


def load_limits(data: dict[str, Any]) -> Limits:
    known = {f.name for f in fields(Limits)}
    overrides = data.get("limits", {})
    bad = set(overrides) - known
    if bad:
        raise ValueError(
            f"unknown limit(s) {sorted(bad)} in the tool data file; known: {sorted(known)}"
        )
    return Limits(**overrides)


class ToolRegistry:
    def __init__(
        self,
        workspace: Workspace,
        specs: list[ToolSpec],
        limits: Limits | None = None,
        policy: PermissionPolicy | None = None,
        journal: UndoJournal | None = None,
    ) -> None:
        self.workspace = workspace
        self.limits = limits or Limits()
        self._specs = {s.name: s for s in specs}
        self.policy = policy or PermissionPolicy(mode="ask", root=workspace.root)
        if self.policy.is_secret is None:
            self.policy.is_secret = workspace.is_secret
        self.journal = journal or UndoJournal()
        self.jobs = JobManager(workspace.scratch_dir, kill_grace_s=self.limits.bash_kill_grace_s)
        self.env = ToolEnv(workspace, self.journal, self.jobs, self.limits)

    @classmethod
    def from_data(
        cls,
        workspace: Workspace | str | os.PathLike[str],
        data_path: Path | None = None,
        *,
        policy: PermissionPolicy | None = None,
        journal: UndoJournal | None = None,
        enabled: Iterable[str] | None = None,
    ) -> ToolRegistry:
        data = load_data(data_path)
        if not isinstance(workspace, Workspace):
            workspace = Workspace(Path(workspace))
        if globs := data.get("sandbox", {}).get("secret_globs"):
            workspace.set_secret_globs(globs)
        return cls(workspace, parse_specs(data, enabled), load_limits(data), policy, journal)

    # ---- what the model is told -----------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ToolSpec | None:
        return self._specs.get(name)

    def schemas(self) -> list[dict[str, Any]]:
        """Tool definitions as the DeepSeek V4 encoder takes them on the system message."""
        return [s.schema() for s in self._specs.values()]

    # ---- permissions ------------------------------------------------------------------------

    def tool_call(self, name: str, arguments: dict[str, Any]) -> ToolCall:
        spec = self._specs.get(name)
        if spec is None:
            return ToolCall(name, dict(arguments), "other", None)
        return self._make_call(spec, dict(arguments))

    def _make_call(self, spec: ToolSpec, arguments: dict[str, Any]) -> ToolCall:
        paths: tuple[str, ...] = ()
        if spec.impl == "apply_patch":
            # One call, many files: each one is checked against the sandbox and the rules.
            paths = tuple(patch.patch_paths(str(arguments.get("patch", ""))))
        return ToolCall(spec.name, arguments, spec.kind, spec.path_param, paths)

    def check(self, name: str, arguments: dict[str, Any]) -> PermissionDecision:
        return self.policy.check(self.tool_call(name, arguments))

    # ---- calling ----------------------------------------------------------------------------

    def call(
        self, name: str, arguments: dict[str, Any] | str | None, ctx: ToolContext | None = None
    ) -> ToolResult:
        ctx = ctx or ToolContext()
        spec = self._specs.get(name)
        if spec is None:
            return ToolResult.error(f"unknown tool {name!r}; use one of: {', '.join(self._specs)}")
        args, err = self._parse_args(spec, arguments)
        if err is not None:
            return err
        call = self._make_call(spec, args.model_dump(by_alias=True, exclude_none=True))
        # The sandbox answers before the user is asked: approving a path the tool will refuse
        # anyway would only waste the user's attention.
        for raw_path in call.all_paths():
            try:
                self.workspace.resolve(raw_path, for_write=spec.kind == "edit")
            except ToolError as e:
                return ToolResult.error(f"{name}: {e.message}")
        decision = self.policy.check(call)
        if decision.behavior != "allow":
            refused = self._refusal(call, decision, ctx)
            if refused is not None:
                return refused
        _, fn = IMPLEMENTATIONS[spec.impl]
        try:
            result = fn(args, self.env, ctx)
        except ToolError as e:
            return e.to_result()
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            return ToolResult.error(
                f"{name} failed: {e.strerror or e}{where}; check the path and permissions, then retry"
            )
        except Exception as e:  # a bug in a tool must not kill the agent loop
            return ToolResult.error(
                f"{name} failed with an internal error ({type(e).__name__}: {str(e)[:200]}); try another way"
            )
        if not isinstance(result, ToolResult):
            result = ToolResult(str(result))
        if len(result.text) > self.limits.result_max_chars:
            # Tools cap their own output; this guard only keeps a bug from flooding the context.
            result.text, _ = head_tail(result.text, self.limits.result_max_chars, what="result")
        return result

    def _parse_args(
        self, spec: ToolSpec, arguments: dict[str, Any] | str | None
    ) -> tuple[Any, ToolResult | None]:
        model, _ = IMPLEMENTATIONS[spec.impl]
        if arguments is None:
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return None, ToolResult.error(
                    f"arguments for {spec.name} are not valid JSON ({e.msg}); send a JSON object"
                )
        if not isinstance(arguments, dict):
            return None, ToolResult.error(
                f"arguments for {spec.name} must be an object with named parameters, not {type(arguments).__name__}"
            )
        # An explicit null means "not given": the default applies (models often send nulls).
        arguments = {k: v for k, v in arguments.items() if v is not None}
        try:
            return model.model_validate(arguments), None
        except ValidationError as e:
            # A list or object sent as a JSON string (a DSML parameter marked string="true")
            # is decoded and validated again before giving up.
            retried = dict(arguments)
            for err in e.errors():
                key = err["loc"][0] if err["loc"] else None
                value = retried.get(key) if isinstance(key, str) else None
                if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        retried[key] = json.loads(value)
            if retried != arguments:
                try:
                    return model.model_validate(retried), None
                except ValidationError as e2:
                    e = e2
            return None, ToolResult.error(format_validation_error(spec, e))

    def _refusal(
        self, call: ToolCall, decision: PermissionDecision, ctx: ToolContext
    ) -> ToolResult | None:
        record = {
            "tool_name": call.name,
            "tool_input": call.arguments,
            "reason": decision.reason,
            "rule": decision.rule,
        }
        if decision.behavior == "ask":
            if ctx.approve is not None:
                try:
                    if ctx.approve(call, decision):
                        return None
                except Exception as e:
                    decision = PermissionDecision("deny", f"the approval prompt failed ({e})")
                ctx.denials.append({**record, "decision": "declined"})
                return ToolResult.error(
                    f"The user declined this {call.name} call ({decision.reason}); do not retry it — ask the user how to proceed or take another approach",
                    display={"kind": "permission", "decision": "declined"},
                )
            ctx.denials.append({**record, "decision": "denied_headless"})
            return ToolResult.error(
                f"Permission denied: {decision.reason}, and nobody can approve it in this non-interactive run; do not retry — use an allowed tool or finish and report what is needed",
                display={"kind": "permission", "decision": "denied"},
            )
        ctx.denials.append({**record, "decision": "denied"})
        return ToolResult.error(
            f"Permission denied: {decision.reason}; do not retry this call — use another approach or ask the user to change the permissions",
            display={"kind": "permission", "decision": "denied"},
        )

    def close(self) -> None:
        """Stop running jobs and delete job output files."""
        self.jobs.close()
        self.workspace.close()


def format_validation_error(spec: ToolSpec, e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "arguments"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{loc}: {msg}")
    params = spec.parameters.get("properties", {})
    required = spec.parameters.get("required", [])
    sig = ", ".join(f"{p}{'' if p in required else '?'}" for p in params)
    return f"Invalid arguments for {spec.name}: {'; '.join(parts)}; call {spec.name} again with valid parameters ({sig})"
