"""A minimal Hugging Face Hub look-alike for download tests (point HF_ENDPOINT at it).

It answers the requests huggingface_hub's client makes:

- `GET /api/models/{repo}/revision/{rev}?blobs=true` → repo info: commit `sha` and `siblings`
  with `size`, `blobId` (git blob sha1) and, for large files, `lfs: {sha256, size, pointerSize}`.
- `HEAD|GET /{repo}/resolve/{rev}/{file}` → `X-Repo-Commit`, `ETag` (sha256 for LFS files, the
  blob id otherwise), `Content-Length`, `Accept-Ranges`; `GET` honours `Range: bytes=N-` (206).
- Errors as the Hub signals them: `X-Error-Code: RepoNotFound` (404), `GatedRepo` (403),
  `EntryNotFound` (404).

Test knobs: `gated` repos, `corrupt` (bytes served instead of the published content),
`throttle` (sleep per 64 KiB chunk, to interrupt a transfer from outside) and a request log.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_THRESHOLD = 1024  # files at least this big are "LFS" (sha256 published)


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    corrupt: dict[str, bytes] = field(default_factory=dict)

    def blob_id(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()

    def is_lfs(self, name: str) -> bool:
        return len(self.files[name]) >= LFS_THRESHOLD

    def etag(self, name: str) -> str:
        if self.is_lfs(name):
            return hashlib.sha256(self.files[name]).hexdigest()
        return self.blob_id(name)

    def info(self, repo_id: str) -> dict:
        siblings = []
        for name, data in sorted(self.files.items()):
            s = {"rfilename": name, "size": len(data), "blobId": self.blob_id(name)}
            if self.is_lfs(name):
                s["lfs"] = {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "pointerSize": 134,
                }
            siblings.append(s)
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": self.sha,
            "private": False,
            "gated": "manual" if self.gated else False,
            "siblings": siblings,
            "tags": [],
        }


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.throttle: dict[str, float] = {}  # file name → seconds per 64 KiB chunk
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        with self._lock:
            return [
                r
                for r in self.log
                if (method is None or r["method"] == method) and contains in r["path"]
            ]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _record(self) -> None:
                with server._lock:
                    server.log.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "range": self.headers.get("Range"),
                            "auth": self.headers.get("Authorization"),
                        }
                    )

            def _error(self, status: int, code: str) -> None:
                body = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, repo_id: str) -> Repo | None:
                repo = server.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound")
                    return None
                if repo.gated and not self.headers.get("Authorization"):
                    self._error(403, "GatedRepo")
                    return None
                return repo

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                self._record()
                path = unquote(urlparse(self.path).path)
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
                if m:
                    repo = self._repo(m.group(1))
                    if repo is None:
                        return
                    if m.group(2) not in (None, "main", repo.sha):
                        self._error(404, "RevisionNotFound")
                        return
                    body = json.dumps(repo.info(m.group(1))).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self._resolve(path, send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._record()
                self._resolve(unquote(urlparse(self.path).path), send_body=False)

            def _resolve(self, path: str, send_body: bool) -> None:
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if not m:
                    self._error(404, "RepoNotFound")
                    return
                repo = self._repo(m.group(1))
                if repo is None:
                    return
                if m.group(2) not in ("main", repo.sha):
                    self._error(404, "RevisionNotFound")
                    return
                name = m.group(3)
                if name not in repo.files:
                    self._error(404, "EntryNotFound")
                    return
                data = repo.corrupt.get(name, repo.files[name])
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    rm = re.match(r"bytes=(\d+)-$", rng)
                    start = int(rm.group(1)) if rm else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{repo.etag(name)}"')
                if repo.is_lfs(name):
                    self.send_header("X-Linked-Etag", f'"{repo.etag(name)}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not send_body:
                    return
                delay = server.throttle.get(name, 0.0)
                try:
                    for i in range(0, len(body), 64 << 10):
                        self.wfile.write(body[i : i + (64 << 10)])
                        self.wfile.flush()
                        if delay:
                            time.sleep(delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler
