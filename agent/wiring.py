"""Builds the collaborators of a run: engine, tokenizer, tools, snapshot store, sampler.

Every factory turns "that part is missing or misconfigured" into a `CommandError` with one
line saying what to do, instead of a traceback. Heavy imports (MLX) happen here, lazily, so
`--help` and the `sessions` commands stay instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ds4_agent.agent.cmd_common import CommandError
from ds4_agent.agent.paths import snapshots_dir


def resolve_model_dir(model: str | None) -> Path:
    value = model or os.environ.get("DS4_AGENT_MODEL", "")
    if not value:
        raise CommandError(
            "no model given: pass --model DIR or set DS4_AGENT_MODEL (see `ds4-agent model list`)"
        )
    p = Path(value).expanduser()
    if not p.exists():
        raise CommandError(f"model directory {p} does not exist; check --model")
    return p


def load_engine(model_dir: Path) -> Any:
    try:
        from ds4_agent.engine.generate import Engine
    except ImportError as e:
        raise CommandError(f"the engine is not available in this build ({e})") from None
    try:
        return Engine.load(model_dir)
    except (OSError, ValueError) as e:
        raise CommandError(f"could not load the model from {model_dir}: {e}") from None


def load_tokenizer(model_dir: Path) -> Any:
    try:
        from ds4_agent.engine.tokenizer import Tokenizer
    except ImportError as e:
        raise CommandError(f"the tokenizer is not available in this build ({e})") from None
    try:
        return Tokenizer.from_file(model_dir)
    except (OSError, ValueError) as e:
        raise CommandError(f"could not load the tokenizer from {model_dir}: {e}") from None


def build_tools(
    root: Path,
    mode: str | None = None,
    allow: list[str] | None = None,
    deny: list[str] | None = None,
) -> Any:
    """The tool registry for `root`, with the permission policy from the settings files
    (user, project, local) overridden by the command line (--permission-mode/--allow/--deny)."""
    from ds4_agent.agent.paths import config_dir
    from ds4_agent.tools.permissions import Rule, RuleError
    from ds4_agent.tools.registry import ToolRegistry
    from ds4_agent.tools.settings import load_permission_settings
    from ds4_agent.tools.workspace import Workspace

    try:
        settings = load_permission_settings(root, config_dir())
        settings.allow += [Rule.parse(r, "command line") for r in allow or []]
        settings.deny += [Rule.parse(r, "command line") for r in deny or []]
        ws = Workspace(root, extra_dirs=settings.additional_directories)
        policy = settings.policy(root, is_secret=ws.is_secret, mode=mode)
        return ToolRegistry.from_data(ws, policy=policy)
    except (RuleError, ValueError, OSError) as e:
        raise CommandError(f"could not set up the tools: {e}") from None


def open_snapshot_store() -> Any:
    """The shared KV snapshot store, or None (then sessions rebuild by prefill)."""
    try:
        from ds4_agent.sessions.store import SnapshotStore
    except ImportError:
        return None
    try:
        return SnapshotStore(snapshots_dir())
    except (OSError, ValueError):
        return None


def default_sampler() -> Any:
    from ds4_agent.engine.sampling import Sampler, SamplerConfig

    return Sampler(SamplerConfig())
