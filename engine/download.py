"""Download a model from the Hugging Face Hub: resumable, verified, disk-checked.

Only `ds4-agent model download` calls into this module; nothing else in ds4-agent touches the
network.

Flow (`download(plan, dest)`):

1. `plan_download(what, source)` asks the Hub which files the repository has at a revision
   (`HfApi.model_info(files_metadata=True)`): names, sizes, the LFS sha256 of large files and the
   git blob id of small ones. Gated, private and missing repositories become one-line errors
   that say what to do.
2. `check_free_disk` refuses to start when the files still to fetch plus the converted output
   do not fit the destination disk.
3. Each file is fetched to `<name>.part` with huggingface_hub's own HTTP transfer (`http_get`,
   which sends `Range` and retries transient failures); a `.part` left by an interrupted run is
   continued from its length, so rerunning the command resumes, even after a kill. (Xet-stored
   files are fetched through the Hub's HTTP bridge too: the Xet client restarts a killed
   transfer from scratch.)
4. Every file is verified before it is renamed into place: its size, and its sha256 (LFS) or git
   blob sha1 (small files) as published by the Hub. A mismatch deletes the file and says so.
   Verified files are remembered (size + mtime) in `.ds4-download.json`, so a rerun does not hash
   160 GB again.

The token comes from the usual places (`HF_TOKEN`, the token file `hf auth login` writes), via
huggingface_hub; `token=` overrides it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_write_json, fsync_dir

GGUF_REPO = "antirez/deepseek-v4-gguf"
OFFICIAL_REPO = "deepseek-ai/DeepSeek-V4-Flash"
GGUF_FILES = {
    "q2": "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2-imatrix.gguf",
    "q4": "DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out-chat-v2-imatrix.gguf",
    "mtp": "DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf",
}
# What a conversion of the official checkpoint needs: weights, index, config, tokenizer.
OFFICIAL_PATTERNS = ("*.safetensors", "*.json")
WHATS = ("q2", "q4", "lossless", "mtp")
STATE_FILE = ".ds4-download.json"
GIB = 1 << 30


class DownloadError(RuntimeError):
    """The download cannot proceed or failed; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1 (verifies small, non-LFS files)


@dataclass
class DownloadPlan:
    what: str  # q2 | q4 | lossless | mtp
    source: str  # "gguf" | "official"
    repo: str
    revision: str  # commit sha, so every file comes from the same snapshot
    endpoint: str
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def default_source(what: str) -> str:
    """Where each tier comes from unless --from says otherwise.

    q2 and mtp: ds4's GGUF files (81 GiB instead of 149 GiB to download, imatrix-quantized,
    89 GiB as MLX q2). q4 and lossless: the official checkpoint, whose FP4 experts become
    mxfp4 exactly (149 GiB); ds4's q4 file is as big a download (153 GiB) and its Q4_K
    experts need 5 bits per weight in MLX (≈ 170 GiB).
    """
    return "gguf" if what in ("q2", "mtp") else "official"


def endpoint() -> str:
    # Read at call time: huggingface_hub freezes HF_ENDPOINT when it is first imported.
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _select(what: str, source: str) -> tuple[str, Callable[[str], bool]]:
    if what not in WHATS:
        raise DownloadError(f"unknown model {what!r}; choose one of {', '.join(WHATS)}")
    if source == "gguf":
        if what == "lossless":
            raise DownloadError(
                "ds4's GGUF files are already quantized, so no lossless tier can come from them; "
                "use --from official"
            )
        wanted = GGUF_FILES[what]
        return GGUF_REPO, lambda name: name == wanted
    if source == "official":
        if what == "mtp":
            raise DownloadError(
                "the official checkpoint carries the MTP block inside its shards; download a tier "
                "with --from official (it converts MTP too), or use --from gguf for ds4's MTP file"
            )
        return (
            OFFICIAL_REPO,
            lambda name: (
                "/" not in name and any(fnmatch.fnmatch(name, p) for p in OFFICIAL_PATTERNS)
            ),
        )
    raise DownloadError(f"unknown source {source!r}; choose official or gguf")


def plan_download(
    what: str,
    source: str | None = None,
    *,
    repo: str | None = None,
    revision: str = "main",
    token: str | bool | None = None,
) -> DownloadPlan:
    """Ask the Hub which files to fetch (sizes and checksums) for `what` from `source`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    source = source or default_source(what)
    default_repo, keep = _select(what, source)
    repo = repo or default_repo
    ep = endpoint()
    try:
        info = HfApi(endpoint=ep).model_info(
            repo, revision=revision, files_metadata=True, token=token
        )
    except GatedRepoError:
        raise DownloadError(
            f"{repo} is gated: accept its terms at {ep}/{repo} with your account, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo} has no revision {revision!r}; check --revision") from None
    except RepositoryNotFoundError:
        raise DownloadError(
            f"{repo} was not found on {ep} (or it is private and you are not logged in: "
            "`hf auth login` or set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as e:
        raise DownloadError(f"{ep} refused the request for {repo}: {_first_line(e)}") from None
    except OSError as e:  # connection refused, DNS, TLS, timeouts (httpx errors are OSError-like)
        raise DownloadError(f"cannot reach {ep}: {_first_line(e)}; check the network") from None
    except Exception as e:  # noqa: BLE001 - httpx transport errors are not OSError subclasses
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise DownloadError(f"cannot reach {ep}: {_first_line(e)}; check the network") from None
        raise
    files = []
    for s in info.siblings or []:
        if not keep(s.rfilename):
            continue
        lfs = s.lfs
        size = lfs.size if lfs is not None else s.size
        if size is None:
            raise DownloadError(f"{repo}: the Hub did not report the size of {s.rfilename}")
        files.append(
            RemoteFile(s.rfilename, int(size), lfs.sha256 if lfs is not None else None, s.blob_id)
        )
    if not files:
        wanted = GGUF_FILES.get(what, "") if source == "gguf" else ", ".join(OFFICIAL_PATTERNS)
        raise DownloadError(f"{repo}@{revision} has no {wanted}; is this the right repository?")
    return DownloadPlan(what, source, repo, info.sha or revision, ep, files)


# --- disk ------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def remaining_bytes(plan: DownloadPlan, dest: Path) -> int:
    """Bytes still to fetch (finished files count 0, partial ones their missing tail)."""
    left = 0
    for f in plan.files:
        final = dest / f.name
        if final.is_file() and final.stat().st_size == f.size:
            continue
        part = _part(dest, f)
        have = part.stat().st_size if part.is_file() else 0
        left += max(f.size - have, 0)
    return left


def check_free_disk(dest: Path, needed: int, what: str) -> None:
    free = free_bytes(dest)
    if needed > free:
        raise DownloadError(
            f"{what} needs {needed / GIB:.1f} GiB free in {dest}, but only {free / GIB:.1f} GiB "
            "is available; free some space or pass --dir on a larger disk"
        )


# --- transfer and verification --------------------------------------------------------


def _part(dest: Path, f: RemoteFile) -> Path:
    return dest / f"{f.name}.part"


def _load_state(dest: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        data = json.loads((dest / STATE_FILE).read_text())
        if isinstance(data, dict):
            return data
    return {}


def _save_state(dest: Path, state: dict[str, Any]) -> None:
    # PRIVATE_MODE: the state file has always been written 0600 (tempfile.mkstemp).
    atomic_write_json(dest / STATE_FILE, state, mode=PRIVATE_MODE, indent=1, sort_keys=True)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def file_digests(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one pass."""
    size = path.stat().st_size
    sha = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            sha.update(chunk)
            blob.update(chunk)
            if progress:
                progress(len(chunk))
    return sha.hexdigest(), blob.hexdigest()


def verify_file(path: Path, f: RemoteFile, progress: Callable[[int], None] | None = None) -> str:
    """Check size and published checksum; returns which check was done ("sha256"/"git-sha1"/"size")."""
    size = path.stat().st_size
    if size != f.size:
        raise DownloadError(f"{f.name}: {size} bytes on disk, the Hub says {f.size}")
    if f.sha256 is None and f.blob_id is None:
        return "size"
    sha, blob = file_digests(path, progress)
    if f.sha256 is not None:
        if sha != f.sha256:
            raise DownloadError(f"{f.name}: sha256 {sha} does not match the published {f.sha256}")
        return "sha256"
    if blob != f.blob_id:
        raise DownloadError(f"{f.name}: git sha1 {blob} does not match the published {f.blob_id}")
    return "git-sha1"


def _http_fetch(plan: DownloadPlan, f: RemoteFile, dest: Path, token: Any, quiet: bool) -> Path:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = _part(dest, f)
    part.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(plan.repo, f.name, revision=plan.revision, endpoint=plan.endpoint)
    headers = build_hf_headers(token=token)
    meta = get_hf_file_metadata(url, token=token, endpoint=plan.endpoint)
    if meta.location and meta.location != url:
        url = meta.location  # a CDN redirect: fetch from there directly
    have = part.stat().st_size if part.is_file() else 0
    if have > f.size:  # a stale partial from another version: start over
        part.unlink()
        have = 0
    # Plain HTTP with Range works for every Hub file (Xet-stored ones through the Hub's HTTP
    # bridge; ds4's own downloader fetches its 87 GB file with `curl -C -`), and unlike the
    # Xet client it resumes across processes. huggingface_hub refuses to *start* files over
    # 50 GB this way as a policy; the size is checked here after the transfer instead.
    expected = None if f.size > constants.MAX_HTTP_DOWNLOAD_SIZE else f.size
    mode = "r+b" if part.exists() else "wb"
    with open(part, mode) as fh:
        fh.seek(have)
        fh.truncate()
        http_get(
            url,
            fh,
            resume_size=have,
            headers=headers,
            expected_size=expected,
            displayed_filename=f.name,
            tqdm_class=_quiet_tqdm() if quiet else None,
        )
        fh.flush()
        os.fsync(fh.fileno())
    return part


def _quiet_tqdm() -> Any:
    from tqdm.auto import tqdm

    class Quiet(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            k["disable"] = True
            super().__init__(*a, **k)

    return Quiet


@dataclass
class FetchResult:
    paths: list[Path]
    downloaded: int  # bytes transferred by this run
    checks: dict[str, str]  # file → "sha256" | "git-sha1" | "size" | "cached"


def download(
    plan: DownloadPlan,
    dest: str | Path,
    *,
    token: str | bool | None = None,
    extra_bytes: int = 0,
    quiet: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> FetchResult:
    """Fetch and verify every file of `plan` into `dest` (resuming partial files).

    `extra_bytes`: more disk the caller will need afterwards (the converted model), included
    in the free-space check made before anything is fetched.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    left = remaining_bytes(plan, dest)
    check_free_disk(dest, left + extra_bytes, f"{plan.repo} ({plan.what})")
    state = _load_state(dest)
    verified: dict[str, Any] = state.setdefault("verified", {})
    if state.get("revision") not in (None, plan.revision):
        verified.clear()  # another snapshot: every file is checked again
    state["revision"] = plan.revision
    state["repo"] = plan.repo
    paths, checks, moved = [], {}, 0
    for f in plan.files:
        final = dest / f.name
        rec = verified.get(f.name)
        if final.is_file() and rec is not None and rec.get("stamp") == _stamp(final):
            paths.append(final)
            checks[f.name] = "cached"
            continue
        if not (final.is_file() and final.stat().st_size == f.size):
            part = _part(dest, f)
            before = f.size - (part.stat().st_size if part.is_file() else 0)
            log(f"fetching {f.name} ({f.size / GIB:.2f} GiB, {before / GIB:.2f} GiB to go)")
            part = _fetch_with_errors(plan, f, dest, token, quiet)
            moved += before
            src_path = part
        else:
            src_path = final
        log(f"verifying {f.name}")
        try:
            how = _verify_with_progress(src_path, f, quiet)
        except DownloadError as e:
            src_path.unlink(missing_ok=True)
            raise DownloadError(
                f"{e}; the damaged file was deleted, run the command again"
            ) from None
        if src_path != final:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src_path, final)
            fsync_dir(final.parent)
        verified[f.name] = {"stamp": _stamp(final), "check": how}
        _save_state(dest, state)
        paths.append(final)
        checks[f.name] = how
    return FetchResult(paths, moved, checks)


def _verify_with_progress(path: Path, f: RemoteFile, quiet: bool) -> str:
    if quiet or f.size < (1 << 30):
        return verify_file(path, f)
    from tqdm.auto import tqdm

    # Hashing 80+ GB takes minutes: show it like the transfer.
    with tqdm(total=f.size, unit="B", unit_scale=True, desc=f"sha256 {f.name[-40:]}") as bar:
        return verify_file(path, f, bar.update)


def _fetch_with_errors(
    plan: DownloadPlan, f: RemoteFile, dest: Path, token: Any, quiet: bool
) -> Path:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    try:
        return _http_fetch(plan, f, dest, token, quiet)
    except GatedRepoError:
        raise DownloadError(
            f"{plan.repo} is gated: accept its terms at {plan.endpoint}/{plan.repo}, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from None
    except HfHubHTTPError as e:
        raise DownloadError(
            f"{f.name}: {_first_line(e)}; run the command again to resume"
        ) from None
    except OSError as e:
        raise DownloadError(
            f"{f.name}: {_first_line(e)}; run the command again to resume"
        ) from None
    except Exception as e:  # noqa: BLE001 - httpx transport errors after the retries ran out
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise DownloadError(
                f"{f.name}: connection lost ({_first_line(e)}); run the command again to resume"
            ) from None
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
