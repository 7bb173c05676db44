"""Permission settings from the user and project config files, merged (deny from anywhere wins).

Files, lowest precedence first:
  <user config dir>/settings.json      (ds4-agent's XDG config directory)
  <workspace>/.ds4/settings.json       (shared with the team, committed)
  <workspace>/.ds4/settings.local.json (personal, git-ignored)
Each may hold {"permissions": {"defaultMode": "ask", "allow": [...], "ask": [...], "deny": [...],
"additionalDirectories": [...]}}. Rule lists are concatenated; the mode of the most specific file
that sets one wins. CLI flags are applied on top by the caller.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .permissions import MODE_ALIASES, PermissionPolicy, Rule, RuleError, parse_mode


class PermissionsSection(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    default_mode: str | None = Field(default=None, alias="defaultMode")
    allow: list[str] = Field(default_factory=list)
    ask: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    additional_directories: list[str] = Field(default_factory=list, alias="additionalDirectories")

    @field_validator("default_mode")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        if v is not None and v not in MODE_ALIASES:
            raise ValueError(f"unknown mode {v!r}")
        return v


class SettingsFile(BaseModel):
    # Other sections of the same file belong to other parts of the agent.
    model_config = ConfigDict(extra="allow")

    permissions: PermissionsSection = Field(default_factory=PermissionsSection)


@dataclass
class PermissionSettings:
    mode: str = "ask"
    allow: list[Rule] = field(default_factory=list)
    ask: list[Rule] = field(default_factory=list)
    deny: list[Rule] = field(default_factory=list)
    additional_directories: list[Path] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)

    def policy(self, root: Path, is_secret=None, mode: str | None = None) -> PermissionPolicy:
        return PermissionPolicy(
            mode=parse_mode(mode or self.mode),
            allow=list(self.allow),
            ask=list(self.ask),
            deny=list(self.deny),
            root=Path(os.path.realpath(root)),
            is_secret=is_secret,
        )


def settings_files(workspace_root: Path, user_config_dir: Path | None) -> list[Path]:
    files = []
    if user_config_dir is not None:
        files.append(Path(user_config_dir) / "settings.json")
    files.append(Path(workspace_root) / ".ds4" / "settings.json")
    files.append(Path(workspace_root) / ".ds4" / "settings.local.json")
    return files


def load_permission_settings(
    workspace_root: Path, user_config_dir: Path | None = None
) -> PermissionSettings:
    """Merge the permission sections of the settings files that exist; bad files raise ValueError."""
    out = PermissionSettings()
    for path in settings_files(workspace_root, user_config_dir):
        if not path.is_file():
            continue
        try:
            data = SettingsFile.model_validate(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file"
            ) from None
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{path}: {loc}: {err['msg']}; fix the permissions section") from None
        sec = data.permissions
        try:
            out.allow += [Rule.parse(r, str(path)) for r in sec.allow]
            out.ask += [Rule.parse(r, str(path)) for r in sec.ask]
            out.deny += [Rule.parse(r, str(path)) for r in sec.deny]
        except RuleError as e:
            raise ValueError(str(e)) from None
        if sec.default_mode is not None:
            out.mode = parse_mode(sec.default_mode)
        base = path.parent.parent if path.parent.name == ".ds4" else path.parent
        for d in sec.additional_directories:
            p = Path(os.path.expanduser(d))
            out.additional_directories.append(p if p.is_absolute() else base / p)
        out.sources.append(path)
    return out
