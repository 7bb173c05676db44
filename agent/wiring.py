"""Builds the collaborators of a run: engine, tokenizer, tools, snapshot store, sampler.

Every factory turns "that part is missing or misconfigured" into a `CommandError` with one
line saying what to do, instead of a traceback. Heavy imports (MLX) happen here, lazily, so
`--help` and the `sessions` commands stay instant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ds4_agent.agent.cmd_common import CommandError
from ds4_agent.agent.paths import snapshots_dir


def resolve_model_dir(model: str | None) -> Path:
    """--model NAME|DIR, else $DS4_AGENT_MODEL, else the registry's default model."""
    from ds4_agent.engine.model_registry import RegistryError, resolve_model

    try:
        return resolve_model(model)
    except RegistryError as e:
        raise CommandError(str(e)) from None


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
    enabled: list[str] | None = None,
) -> Any:
    """The tool registry for `root`, with the permission policy from the settings files
    (user, project, local) overridden by the command line (--permission-mode/--allow/--deny).

    `DS4_AGENT_TOOLS=none` runs the model without tools (plain chat; returns None), and
    `DS4_AGENT_TOOLS=Read,Grep,…` offers only those tools (a smaller system prompt)."""
    env = os.environ.get("DS4_AGENT_TOOLS", "").strip()
    if env.lower() == "none":
        return None
    if env and enabled is None:
        enabled = [t.strip() for t in env.split(",") if t.strip()]
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
        return ToolRegistry.from_data(ws, policy=policy, enabled=enabled)
    except (RuleError, ValueError, OSError) as e:
        raise CommandError(f"could not set up the tools: {e}") from None


def open_snapshot_store() -> Any:
    """The shared KV snapshot store, or None (then sessions rebuild by prefill)."""
    from ds4_agent.sessions.store import SnapshotStore

    try:
        return SnapshotStore(snapshots_dir())
    except (OSError, ValueError):
        return None


def default_sampler() -> Any:
    """The model card's sampler; `DS4_AGENT_SCRIPT=FILE` (a JSON list of token ids) replays a
    fixed token script instead (reproducible demos and the end-to-end tests)."""
    from ds4_agent.engine.sampling import Sampler, SamplerConfig, ScriptedSampler

    script = os.environ.get("DS4_AGENT_SCRIPT", "")
    if script:
        try:
            ids = json.loads(Path(script).read_text())
        except (OSError, ValueError) as e:
            raise CommandError(
                f"DS4_AGENT_SCRIPT={script}: not a JSON list of token ids ({e})"
            ) from None
        return ScriptedSampler(ids)
    return Sampler(SamplerConfig())
