"""The workspace sandbox: every path a tool touches resolves (symlinks included) inside its roots.

Also remembers which files the model has read, so edits can refuse to act on a file the model
has not seen or that changed on disk since it was read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pathspec

from .result import ToolError

# Files whose contents are credentials more often than not. The data file (tools.json) can
# replace this list; these are the defaults when it says nothing.
DEFAULT_SECRET_GLOBS = (
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.p12",
    "*.pfx",
    ".netrc",
    ".pypirc",
    ".npmrc",
)


@dataclass(frozen=True)
class FileStamp:
    """What the model last saw of a file: content hash plus cheap stat facts."""

    sha256: str
    mtime_ns: int
    size: int


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Workspace:
    """The directory tree the tools may touch.

    `root` is where relative paths start. `extra_dirs` are further directories the user allowed
    (read and write). `scratch` holds job output files; the model may read them but they are not
    part of the project.
    """

    root: Path
    extra_dirs: list[Path] = field(default_factory=list)
    secret_globs: tuple[str, ...] = DEFAULT_SECRET_GLOBS
    scratch: Path | None = None
    read_state: dict[Path, FileStamp] = field(default_factory=dict)

    def __post_init__(self) -> None:
        root = Path(os.path.realpath(os.path.expanduser(str(self.root))))
        if not root.is_dir():
            raise ValueError(
                f"workspace root {root} is not a directory; pass an existing directory"
            )
        self.root = root
        self.extra_dirs = [
            Path(os.path.realpath(os.path.expanduser(str(d)))) for d in self.extra_dirs
        ]
        self._secret_spec = pathspec.GitIgnoreSpec.from_lines(self.secret_globs)
        self._owns_scratch = False

    def set_secret_globs(self, globs: Iterable[str]) -> None:
        self.secret_globs = tuple(globs)
        self._secret_spec = pathspec.GitIgnoreSpec.from_lines(self.secret_globs)

    # ---- scratch space for job output -------------------------------------------------------

    def scratch_dir(self) -> Path:
        """A private directory for tool output files (created on first use, removed by close())."""
        if self.scratch is None:
            self.scratch = Path(os.path.realpath(tempfile.mkdtemp(prefix="ds4-agent-jobs-")))
            self._owns_scratch = True
        self.scratch.mkdir(parents=True, exist_ok=True)
        return self.scratch

    def close(self) -> None:
        if self._owns_scratch and self.scratch is not None:
            import shutil

            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
            self._owns_scratch = False

    # ---- path resolution --------------------------------------------------------------------

    def roots(self, for_write: bool = False) -> list[Path]:
        roots = [self.root, *self.extra_dirs]
        if not for_write and self.scratch is not None:
            roots.append(self.scratch)
        return roots

    def resolve(self, path: str | os.PathLike[str], *, for_write: bool = False) -> Path:
        """The real absolute path for `path`, or a ToolError when it leaves the workspace."""
        raw = os.fspath(path)
        if not raw or not raw.strip():
            raise ToolError(
                "empty path; pass a file path relative to the workspace root or absolute"
            )
        if "\x00" in raw:
            raise ToolError("path contains a NUL byte; pass a plain file path")
        expanded = os.path.expanduser(raw)
        joined = expanded if os.path.isabs(expanded) else os.path.join(self.root, expanded)
        lexical = os.path.normpath(joined)
        real = Path(os.path.realpath(joined))
        if self.contains(real, for_write=for_write):
            if for_write and ".git" in real.parts:
                # Hooks and config under .git run code on the next git command.
                raise ToolError(
                    f"refusing to write inside .git ({raw}); change the repository through git commands (GitCommit, Bash) instead"
                )
            return real
        via = ""
        if self.contains(Path(lexical), for_write=for_write):
            via = " through a symlink"
        raise ToolError(
            f"path '{raw}' resolves{via} to {real}, outside the workspace {self.root}; "
            f"use a path inside the workspace, or ask the user to allow that directory"
        )

    def contains(self, real: Path, *, for_write: bool = False) -> bool:
        return any(_is_within(real, r) for r in self.roots(for_write=for_write))

    def display(self, path: Path) -> str:
        """How a path is shown to the model: relative to the root when inside it."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return str(path)
        return rel.as_posix() or "."

    def is_secret(self, path: Path) -> bool:
        """True for files that usually hold credentials (.env*, keys): reading them needs permission."""
        if self._secret_spec.match_file(path.name):
            return True
        try:
            rel = path.relative_to(self.root).as_posix()
        except ValueError:
            return False
        return self._secret_spec.match_file(rel)

    # ---- read-before-edit guard -------------------------------------------------------------

    def note_read(self, path: Path, data: bytes) -> None:
        st = path.stat()
        self.read_state[path] = FileStamp(digest(data), st.st_mtime_ns, st.st_size)

    def export_read_state(self) -> dict[str, dict[str, int | str]]:
        """What the model has seen, as JSON-able data (sessions save it so guards survive a resume)."""
        return {
            str(p): {"sha256": s.sha256, "mtime_ns": s.mtime_ns, "size": s.size}
            for p, s in self.read_state.items()
        }

    def import_read_state(self, data: dict[str, dict[str, int | str]]) -> None:
        for p, s in data.items():
            self.read_state[Path(p)] = FileStamp(
                str(s["sha256"]), int(s["mtime_ns"]), int(s["size"])
            )

    def forget(self, path: Path) -> None:
        self.read_state.pop(path, None)

    def check_fresh(self, path: Path, current: bytes, tool: str) -> None:
        """Refuse to modify a file the model has not read, or that changed since it read it."""
        shown = self.display(path)
        stamp = self.read_state.get(path)
        if stamp is None:
            raise ToolError(
                f"{tool}: {shown} has not been read in this session; Read it first, then retry"
            )
        if stamp.sha256 != digest(current):
            raise ToolError(
                f"{tool}: {shown} changed on disk since you last read it; Read it again and redo the change against the current content"
            )


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def iter_parents(path: Path, stop: Path) -> Iterable[Path]:
    """`path`'s ancestors up to and including `stop` (nearest first)."""
    cur = path.parent
    while True:
        yield cur
        if cur == stop or cur.parent == cur:
            return
        cur = cur.parent
