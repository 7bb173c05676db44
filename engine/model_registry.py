"""Installed models: a small registry in the user's data directory.

`<data dir>/models.json` lists every model `ds4-agent model download` (or `convert
--register`) installed, by name, with its directory, tier and source, and which one is the
default. `ds4-agent` without `--model` runs the default; `--model` takes a registered name or
a directory. The data directory is `$DS4_AGENT_HOME/data` when that is set, else
`$XDG_DATA_HOME/ds4-agent` (default `~/.local/share/ds4-agent`), the same rule as the
sessions store. Models are installed under `<data dir>/models/<name>` unless `--dir` says
otherwise.

The registry is rewritten atomically (temp file, fsync, rename, directory fsync) under an
advisory lock, so two concurrent downloads cannot lose each other's entries.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_write_text
from pydantic import BaseModel, Field, ValidationError

APP = "ds4-agent"
REGISTRY_FILE = "models.json"
REGISTRY_VERSION = 1


class RegistryError(ValueError):
    """The registry or a requested model is unusable; the message says what to do."""


class NoModelError(RegistryError):
    """No model was given and none is installed."""


class ModelEntry(BaseModel):
    name: str
    path: str  # absolute directory of the converted model (or of the file for kind "mtp")
    tier: str = ""  # q2 | q3 | q4 | lossless
    source: str = ""  # "gguf" | "official" | "local"
    repo: str = ""  # Hugging Face repo it came from, if downloaded
    revision: str = ""  # commit sha downloaded
    kind: str = "model"  # "model" | "mtp"
    size_bytes: int = 0
    installed_at: str = ""


class Registry(BaseModel):
    version: int = REGISTRY_VERSION
    default: str | None = None
    models: dict[str, ModelEntry] = Field(default_factory=dict)


def data_dir() -> Path:
    home = os.environ.get("DS4_AGENT_HOME", "")
    if home:
        return Path(home).expanduser().resolve() / "data"
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / APP


def models_dir() -> Path:
    """Where downloaded models are installed by default."""
    return data_dir() / "models"


def registry_path() -> Path:
    return data_dir() / REGISTRY_FILE


def no_model_message() -> str:
    """What to tell a user who runs `ds4-agent` with no model installed (a few lines)."""
    return (
        "No model is installed yet. To get one:\n"
        "  ds4-agent doctor                  # what this machine can run\n"
        "  ds4-agent model download q2       # 128 GB Macs (≈ 89 GiB on disk)\n"
        "  ds4-agent model download q4       # 256 GB+ Macs (≈ 149 GiB on disk)\n"
        "Or point at a converted model directory: ds4-agent --model DIR"
    )


# --- reading and writing -------------------------------------------------------------


def load_registry(path: Path | None = None) -> Registry:
    path = path or registry_path()
    if not path.is_file():
        return Registry()
    try:
        return Registry.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError) as e:
        raise RegistryError(
            f"{path} is unreadable ({str(e).splitlines()[0]}); fix or delete it, then re-register "
            "your models with `ds4-agent model download`"
        ) from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # no advisory locks on this platform: single-writer assumption
            pass
        yield


def save_registry(reg: Registry, path: Path | None = None) -> None:
    path = path or registry_path()
    # PRIVATE_MODE: the registry has always been written 0600 (tempfile.mkstemp).
    atomic_write_text(path, reg.model_dump_json(indent=2) + "\n", mode=PRIVATE_MODE)


def register_model(entry: ModelEntry, make_default: bool | None = None) -> Registry:
    """Add or replace `entry`; it becomes the default when asked, or when there is none."""
    path = registry_path()
    with _locked(path):
        reg = load_registry(path)
        if not entry.installed_at:
            entry = entry.model_copy(update={"installed_at": _now()})
        entry = entry.model_copy(update={"path": str(Path(entry.path).expanduser().resolve())})
        reg.models[entry.name] = entry
        wants_default = make_default if make_default is not None else reg.default is None
        if entry.kind == "model" and wants_default:
            reg.default = entry.name
        save_registry(reg, path)
        return reg


def unregister_model(name: str) -> Registry:
    path = registry_path()
    with _locked(path):
        reg = load_registry(path)
        if name not in reg.models:
            raise RegistryError(f"no installed model named {name!r} (see `ds4-agent model list`)")
        del reg.models[name]
        if reg.default == name:
            reg.default = next((n for n, e in reg.models.items() if e.kind == "model"), None)
        save_registry(reg, path)
        return reg


def set_default(name: str) -> Registry:
    path = registry_path()
    with _locked(path):
        reg = load_registry(path)
        entry = reg.models.get(name)
        if entry is None or entry.kind != "model":
            raise RegistryError(f"no installed model named {name!r} (see `ds4-agent model list`)")
        reg.default = name
        save_registry(reg, path)
        return reg


# --- resolution ----------------------------------------------------------------------


def resolve_model(arg: str | None = None) -> Path:
    """The model directory to run.

    `arg` (from `--model`) is a registered name or a directory; without it the environment
    variable `DS4_AGENT_MODEL`, then the registry's default, are used. Raises NoModelError
    (message = `no_model_message()`) when nothing is installed, RegistryError otherwise.
    """
    value = arg or os.environ.get("DS4_AGENT_MODEL", "")
    reg = load_registry()
    if value:
        entry = reg.models.get(value)
        if entry is not None:
            return _existing(Path(entry.path), f"installed model {value!r}")
        p = Path(value).expanduser()
        if p.exists():
            return p.resolve()
        names = ", ".join(sorted(n for n, e in reg.models.items() if e.kind == "model"))
        hint = f"installed: {names}" if names else "no models are installed"
        raise RegistryError(
            f"--model {value!r} is neither a directory nor an installed model ({hint})"
        )
    if reg.default is None or reg.default not in reg.models:
        raise NoModelError(no_model_message())
    return _existing(Path(reg.models[reg.default].path), f"default model {reg.default!r}")


def _existing(p: Path, what: str) -> Path:
    if not p.exists():
        raise RegistryError(
            f"{what} points at {p}, which no longer exists; run `ds4-agent model download` again "
            "or `ds4-agent model list` to pick another"
        )
    return p


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
