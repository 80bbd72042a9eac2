"""A small, self-contained Hugging Face Hub API server for offline round-trip tests.

The server speaks the subset of the Hub HTTP API that ``huggingface_hub`` 2.x uses to create a repo, push a
folder (``upload_folder`` / ``create_commit``, regular base64 files and, optionally, the legacy git-LFS "basic"
transfer) and download files back (``hf_hub_download``, ``snapshot_download``, ``model_info``, ``list_repo_tree``,
``get_paths_info``), so that ``Trainer.push_to_hub()``, ``from_pretrained(repo_id)``, ``pipeline(model=repo_id)``
and ``timm.create_model("hf-hub:" + repo_id)`` run for real over HTTP against 127.0.0.1.

It only uses the standard library (``http.server.ThreadingHTTPServer`` in a daemon thread, ephemeral port) and keeps
everything under one directory:

    <root>/<type>s/<namespace>/<name>/repo.json           refs (branch -> commit id), visibility, creation date
    <root>/<type>s/<namespace>/<name>/commits/<sha>.json  one snapshot per commit: {path: file entry}, message, parent
    <root>/<type>s/<namespace>/<name>/blobs/<sha256>      content-addressed file contents (regular and LFS)

Usage from a test module (the ``tests`` folder is on ``sys.path`` under pytest's default import mode)::

    import hub_server
    from hub_server import TEST_TOKEN, HubServer

    hub = hub_server.hub  # registers the fixture for this module (an assignment, so ruff sees no F811)

    def test_push(hub: HubServer):  # HF_ENDPOINT / HF_TOKEN / HF_HOME already point at the running server
        ...
        assert hub.files("tester/my-model")["config.json"]

or, without the fixture::

    with local_hub(tmp_path / "hub") as server:
        point_hf_at(monkeypatch, server, hf_home=tmp_path / "hf_home", token=TEST_TOKEN)
        ...
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
import types
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

__all__ = [
    "TEST_TOKEN",
    "TEST_USER",
    "HubServer",
    "RequestRecord",
    "export_git_mirror",
    "fresh_hf_cache",
    "hub",
    "local_hub",
    "no_retry_sleep",
    "olah_mirror",
    "point_hf_at",
]

TEST_TOKEN = "hf_test_token_xyz"
TEST_USER = "tester"

_REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIXES = {"datasets": "dataset", "spaces": "space"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_API_ACTIONS = {"revision", "preupload", "commit", "paths-info", "tree", "refs", "commits", "branch"}
_MAX_BODY_BYTES = 1 << 30  # bound on any request body (1 GiB)
_GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@dataclass
class RequestRecord:
    """One request seen by the server (the body is not kept)."""

    method: str
    path: str
    route: str
    authorization: str | None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    """Turned into an error response with the Hub's ``X-Error-Code`` / ``X-Error-Message`` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _clean_path(path: str) -> str:
    """Validate a path inside a repo (no absolute paths, no ``..``, no empty segments)."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class HubServer:
    """Hub-API server storing repos under ``root``. Start/stop with ``with HubServer(root) as server:``.

    Args:
        root: directory holding all repos (created if missing).
        token: if set, the only accepted token; otherwise any ``Bearer`` token is accepted for writes.
        lfs_threshold: files of at least this many bytes are declared "lfs" by the preupload endpoint and must be
            sent through the git-LFS batch API (only honoured by ``huggingface_hub`` when ``hf_xet`` is disabled,
            see ``point_hf_at(..., disable_xet=True)``). ``None`` (default): every file is a regular git file.
        lfs_redirect: serve LFS files like the Hub does: ``/resolve`` answers 302 with ``X-Linked-Etag`` /
            ``X-Linked-Size`` to a "CDN" URL on another host name (``localhost`` instead of ``127.0.0.1``).
        user: the user name returned by ``whoami`` and used for repos created without a namespace.
        host: address to bind (keep an IP: the "CDN" host name is ``localhost``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        token: str | None = None,
        lfs_threshold: int | None = None,
        lfs_redirect: bool = True,
        user: str = TEST_USER,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.lfs_redirect = lfs_redirect
        self.user = user
        self.host = host
        self.requests: list[RequestRecord] = []
        self._lock = threading.RLock()
        self._failures: dict[str, list[Any]] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def cdn_endpoint(self) -> str:
        """Same server under another host name: the client treats it as a foreign (CDN) host."""
        return f"http://localhost:{self.port}"

    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        hub = self

        class Handler(_HubRequestHandler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def fail(self, route: str, status: int = 500, *, times: int | None = None, message: str = "Injected failure"):
        """Make ``route`` answer ``status`` (``times`` times, or until ``clear_failures()``).

        Routes: create_repo, delete_repo, whoami, validate_yaml, repo_info, preupload, commit, paths_info, tree,
        refs, commits, branch, lfs_batch, lfs_upload, resolve, cdn.
        """
        with self._lock:
            self._failures[route] = [status, times, message]

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _take_failure(self, route: str) -> HubError | None:
        with self._lock:
            entry = self._failures.get(route)
            if entry is None:
                return None
            status, times, message = entry
            if times is not None:
                entry[1] = times - 1
                if entry[1] <= 0:
                    del self._failures[route]
            return HubError(status, message)

    def requests_for(self, route: str) -> list[RequestRecord]:
        return [r for r in list(self.requests) if r.route == route]

    @property
    def authorization_headers(self) -> list[str | None]:
        """The ``Authorization`` header of every request, in order (``None`` when absent)."""
        return [r.authorization for r in list(self.requests)]

    @property
    def tokens_seen(self) -> set[str]:
        return {a.split(" ", 1)[1] for a in self.authorization_headers if a and a.startswith("Bearer ")}

    def find_bytes(self, needle: str | bytes) -> list[Path]:
        """Every file stored by the server (blobs and metadata) whose content contains ``needle``."""
        needle_b = needle.encode() if isinstance(needle, str) else needle
        return [p for p in sorted(self.root.rglob("*")) if p.is_file() and needle_b in p.read_bytes()]

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (self._repo_dir(repo_type, repo_id) / "repo.json").is_file()

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit id of ``revision`` (branch name or commit id)."""
        return self._resolve_revision(repo_type, repo_id, revision)[0]

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        """Commit history of ``revision``, newest first."""
        sha, snap = self._resolve_revision(repo_type, repo_id, revision)
        out = []
        while True:
            out.append({"id": sha, **{k: v for k, v in snap.items() if k != "files"}})
            if not snap.get("parent"):
                return out
            sha = snap["parent"]
            snap = self._read_commit(repo_type, repo_id, sha)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: content}`` of the repo at ``revision``."""
        _, snap = self._resolve_revision(repo_type, repo_id, revision)
        return {p: self._blob_path(repo_type, repo_id, e["sha256"]).read_bytes() for p, e in snap["files"].items()}

    def file_entries(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, dict]:
        """``{path: {"oid", "sha256", "size", "lfs"}}`` of the repo at ``revision``."""
        return dict(self._resolve_revision(repo_type, repo_id, revision)[1]["files"])

    def seed_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str | os.PathLike],
        *,
        repo_type: str = "model",
        message: str = "Seed",
        private: bool = False,
    ) -> str:
        """Create (if needed) ``repo_id`` and commit ``files`` server-side, without HTTP. Returns the commit id."""
        with self._lock:
            if not self.repo_exists(repo_id, repo_type):
                self._create_repo(repo_type, repo_id, private=private)
            ops = []
            for path, content in files.items():
                data = content.encode() if isinstance(content, str) else content
                if isinstance(data, os.PathLike):
                    data = Path(data).read_bytes()
                ops.append(("add", _clean_path(path), self._store_blob(repo_type, repo_id, data), False))
            return self._commit(repo_type, repo_id, "main", ops, message, "", None)

    # ------------------------------------------------------------------ storage

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def _read_repo(self, repo_type: str, repo_id: str) -> dict:
        meta = self._repo_dir(repo_type, repo_id) / "repo.json"
        if not meta.is_file():
            raise HubError(404, "Repository not found", "RepoNotFound")
        return json.loads(meta.read_text())

    def _write_json(self, path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _read_commit(self, repo_type: str, repo_id: str, sha: str) -> dict:
        return json.loads((self._repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json").read_text())

    def _blob_path(self, repo_type: str, repo_id: str, sha256: str) -> Path:
        return self._repo_dir(repo_type, repo_id) / "blobs" / sha256

    def _store_blob(self, repo_type: str, repo_id: str, data: bytes) -> dict:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(repo_type, repo_id, sha256)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return {"sha256": sha256, "oid": _git_blob_sha1(data), "size": len(data)}

    def _resolve_revision(self, repo_type: str, repo_id: str, revision: str) -> tuple[str, dict]:
        repo = self._read_repo(repo_type, repo_id)
        sha = repo["refs"].get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{40}", revision):
            sha = revision
        if sha is None or not (self._repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json").is_file():
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, self._read_commit(repo_type, repo_id, sha)

    def _create_repo(self, repo_type: str, repo_id: str, *, private: bool) -> None:
        self._write_json(
            self._repo_dir(repo_type, repo_id) / "repo.json",
            {"id": repo_id, "type": repo_type, "private": private, "createdAt": _now(), "refs": {}},
        )
        entry = self._store_blob(repo_type, repo_id, _GITATTRIBUTES)
        self._commit(repo_type, repo_id, "main", [("add", ".gitattributes", entry, False)], "initial commit", "", None)

    def _commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        ops: list[tuple],
        summary: str,
        description: str,
        parent_commit: str | None,
        *,
        create_branch: bool = True,
    ) -> str:
        with self._lock:
            repo = self._read_repo(repo_type, repo_id)
            head = repo["refs"].get(branch)
            if head is None and not (create_branch and not repo["refs"]):
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit is not None and head is not None and not head.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files: dict[str, dict] = dict(self._read_commit(repo_type, repo_id, head)["files"]) if head else {}
            for kind, path, entry, _ in ops:
                if kind == "add":
                    files[path] = entry
                elif kind == "delete_file":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif kind == "delete_folder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            self._counter += 1
            seed = json.dumps([head, summary, sorted(files.items()), time.time_ns(), self._counter], default=str)
            sha = hashlib.sha1(seed.encode()).hexdigest()
            snapshot = {
                "parent": head,
                "title": summary,
                "message": description,
                "date": _now(),
                "authors": [self.user],
                "files": files,
            }
            self._write_json(self._repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json", snapshot)
            repo["refs"][branch] = sha
            repo["lastModified"] = snapshot["date"]
            self._write_json(self._repo_dir(repo_type, repo_id) / "repo.json", repo)
            return sha

    # ------------------------------------------------------------------ auth

    def _bearer(self, authorization: str | None) -> str | None:
        if authorization and authorization.startswith("Bearer "):
            return authorization[len("Bearer ") :].strip() or None
        return None

    def _check_token(self, authorization: str | None, *, required: bool) -> str | None:
        token = self._bearer(authorization)
        if token is None:
            if required:
                raise HubError(401, "Invalid username or password.")
            return None
        if self.token is not None and token != self.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _check_read(self, repo_type: str, repo_id: str, authorization: str | None) -> dict:
        repo = self._read_repo(repo_type, repo_id)
        if repo.get("private") and self._check_token(authorization, required=False) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    # ------------------------------------------------------------------ JSON views

    def _file_info(self, path: str, entry: dict, sha: str, expand: bool) -> dict:
        info: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry.get("lfs"):
            info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": entry.get("pointerSize", 134)}
        if expand:
            info["lastCommit"] = {"id": sha, "title": "", "date": _now()}
        return info

    def _dir_info(self, path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    def _card_data(self, repo_type: str, repo_id: str, files: dict[str, dict]) -> dict | None:
        if "README.md" not in files:
            return None
        text = self._blob_path(repo_type, repo_id, files["README.md"]["sha256"]).read_text(errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, flags=re.S)
        if not match:
            return None
        try:
            import yaml

            data = yaml.safe_load(match.group(1))
        except Exception:
            return None
        return data if isinstance(data, dict) else None

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, authorization: str | None) -> dict:
        repo = self._check_read(repo_type, repo_id, authorization)
        sha, snap = self._resolve_revision(repo_type, repo_id, revision)
        files = snap["files"]
        card = self._card_data(repo_type, repo_id, files) or {}
        siblings = []
        for path in sorted(files):
            e = files[path]
            sib: dict[str, Any] = {"rfilename": path, "size": e["size"], "blobId": e["oid"]}
            if e.get("lfs"):
                sib["lfs"] = {"size": e["size"], "sha256": e["sha256"], "pointerSize": e.get("pointerSize", 134)}
            siblings.append(sib)
        config = None
        if "config.json" in files:
            with contextlib.suppress(Exception):
                config = json.loads(self._blob_path(repo_type, repo_id, files["config.json"]["sha256"]).read_bytes())
        namespace = repo_id.split("/")[0] if "/" in repo_id else None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": namespace,
            "sha": sha,
            "lastModified": snap["date"],
            "createdAt": repo["createdAt"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags") or []),
            "cardData": card or None,
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
            info["library_name"] = card.get("library_name")
            info["pipeline_tag"] = card.get("pipeline_tag")
            if isinstance(config, dict):
                info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        return info


class _HubRequestHandler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds of socket inactivity before a connection is dropped

    # silence the default stderr access log
    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ------------------------------------------------------------------ plumbing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > _MAX_BODY_BYTES:
                    raise HubError(413, "Payload Too Large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY_BYTES:
                raise HubError(413, "Payload Too Large")
            self._body = self.rfile.read(length) if length else b""
        return self._body

    def _json_body(self) -> Any:
        try:
            return json.loads(self._read_body() or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _send(
        self,
        status: int,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        content_length: int | None = None,
    ) -> None:
        self._record.status = status
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("X-Request-Id", f"local-{id(self._record):x}")
        if body is not None or content_length is not None:
            headers.setdefault("Content-Type", content_type)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(content_length if content_length is not None else len(body or b"")))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode(), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message}, status=err.status, headers=headers)

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        self._body: bytes | None = None
        split = urllib.parse.urlsplit(self.path)
        self._query = urllib.parse.parse_qs(split.query)
        self._record = RequestRecord(
            method=method,
            path=self.path,
            route="unknown",
            authorization=self.headers.get("Authorization"),
            headers={k: v for k, v in self.headers.items()},
        )
        hub.requests.append(self._record)
        try:
            if method in ("POST", "PUT"):
                try:
                    self._read_body()  # always drain the body (keep-alive), even when answering an error
                except HubError:
                    self.close_connection = True
                    raise
            route, handler, args = self._route(method, [urllib.parse.unquote(s) for s in split.path.split("/")[1:]])
            self._record.route = route
            injected = hub._take_failure(route)
            if injected is not None:
                raise injected
            handler(*args)
        except HubError as err:
            self._send_error(err)
        except Exception as err:  # pragma: no cover - surfaced to the client as a 500
            self.close_connection = True
            with contextlib.suppress(Exception):
                self._send_error(HubError(500, f"Internal error: {type(err).__name__}: {err}"))

    def _route(self, method: str, seg: list[str]) -> tuple[str, Any, tuple]:
        if seg and seg[-1] == "" and len(seg) > 1:
            seg = seg[:-1]
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:])
        internal = {("_lfs", "PUT"): "lfs_upload", ("_lfs-verify", "POST"): "lfs_verify"}
        internal.update({("_cdn", "GET"): "cdn", ("_cdn", "HEAD"): "cdn"})
        if seg and (seg[0], method) in internal:
            route = internal[(seg[0], method)]
            if len(seg) < 4 or seg[1][:-1] not in _REPO_TYPES:
                raise HubError(404, f"Not found: {method} {self.path}")
            handler = {"lfs_upload": self._lfs_upload, "lfs_verify": self._lfs_verify, "cdn": self._cdn}[route]
            return route, handler, (seg[1][:-1], "/".join(seg[2:-1]), seg[-1])
        repo_type = "model"
        if seg and seg[0] in _URL_PREFIXES:
            repo_type, seg = _URL_PREFIXES[seg[0]], seg[1:]
        # git-LFS batch API: /{repo}.git/info/lfs/objects/batch
        if (
            method == "POST"
            and len(seg) >= 5
            and seg[-4:] == ["info", "lfs", "objects", "batch"]
            and seg[-5].endswith(".git")
        ):
            repo_id = "/".join([*seg[:-5], seg[-5][: -len(".git")]])
            return "lfs_batch", self._lfs_batch, (repo_type, repo_id)
        # /{repo}/resolve/{revision}/{path}
        for n in (2, 1):
            if len(seg) > n + 2 and seg[n] == "resolve" and method in ("GET", "HEAD"):
                repo_id = "/".join(seg[:n])
                return "resolve", self._resolve, (repo_type, repo_id, seg[n + 1], "/".join(seg[n + 2 :]))
        raise HubError(404, f"Not found: {method} {self.path}")

    def _route_api(self, method: str, seg: list[str]) -> tuple[str, Any, tuple]:
        if seg == ["whoami-v2"] and method == "GET":
            return "whoami", self._whoami, ()
        if seg == ["repos", "create"] and method == "POST":
            return "create_repo", self._create_repo, ()
        if seg == ["repos", "delete"] and method == "DELETE":
            return "delete_repo", self._delete_repo, ()
        if seg == ["validate-yaml"] and method == "POST":
            return "validate_yaml", self._validate_yaml, ()
        if not seg or seg[0] not in ("models", "datasets", "spaces") or len(seg) < 2:
            raise HubError(404, f"Not found: {method} {self.path}")
        repo_type = seg[0][:-1]
        rest = seg[1:]
        if len(rest) >= 2 and rest[1] not in _API_ACTIONS:
            repo_id, tail = "/".join(rest[:2]), rest[2:]
        else:
            repo_id, tail = rest[0], rest[1:]
        action = tail[0] if tail else None
        rev = tail[1] if len(tail) > 1 else "main"
        if action is None and method == "GET":
            return "repo_info", self._repo_info, (repo_type, repo_id, "main")
        if action == "revision" and method == "GET" and len(tail) >= 2:
            return "repo_info", self._repo_info, (repo_type, repo_id, "/".join(tail[1:]))
        if action == "preupload" and method == "POST":
            return "preupload", self._preupload, (repo_type, repo_id, rev)
        if action == "commit" and method == "POST":
            return "commit", self._commit, (repo_type, repo_id, rev)
        if action == "paths-info" and method == "POST":
            return "paths_info", self._paths_info, (repo_type, repo_id, rev)
        if action == "tree" and method == "GET":
            return "tree", self._tree, (repo_type, repo_id, rev, "/".join(tail[2:]))
        if action == "refs" and method == "GET":
            return "refs", self._refs, (repo_type, repo_id)
        if action == "commits" and method == "GET":
            return "commits", self._commits, (repo_type, repo_id, rev)
        if action == "branch" and method == "POST" and len(tail) >= 2:
            return "branch", self._create_branch, (repo_type, repo_id, "/".join(tail[1:]))
        raise HubError(404, f"Not found: {method} {self.path}")

    # ------------------------------------------------------------------ API routes

    def _whoami(self) -> None:
        hub = self.server_hub
        hub._check_token(self.headers.get("Authorization"), required=True)
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(hub.user.encode()).hexdigest()[:24],
                "name": hub.user,
                "fullname": hub.user.title(),
                "email": f"{hub.user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
            }
        )

    def _create_repo(self) -> None:
        hub = self.server_hub
        hub._check_token(self.headers.get("Authorization"), required=True)
        body = self._json_body()
        name, org = body.get("name"), body.get("organization") or hub.user
        repo_type = body.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(org):
            raise HubError(400, f"Invalid repo name: {org}/{name}")
        repo_id = f"{org}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{hub.endpoint}/{prefix}{repo_id}"
        private = bool(body.get("private")) or body.get("visibility") == "private"
        with hub._lock:
            if hub.repo_exists(repo_id, repo_type):
                # create_repo(exist_ok=True) reads "url" from this 409 answer too
                self._send_json({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
                return
            hub._create_repo(repo_type, repo_id, private=private)
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self) -> None:
        hub = self.server_hub
        hub._check_token(self.headers.get("Authorization"), required=True)
        body = self._json_body()
        repo_id = f"{body.get('organization') or hub.user}/{body.get('name')}"
        repo_type = body.get("type") or "model"
        with hub._lock:
            hub._read_repo(repo_type, repo_id)
            shutil.rmtree(hub._repo_dir(repo_type, repo_id))
        self._send_json({})

    def _validate_yaml(self) -> None:
        body = self._json_body()
        content = body.get("content") or ""
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        if match:
            try:
                import yaml

                data = yaml.safe_load(match.group(1))
            except ImportError:
                data = {}
            except Exception as err:
                self._send_json({"errors": [{"message": f"Invalid YAML metadata: {err}"}]}, status=400)
                return
            if data is not None and not isinstance(data, dict):
                self._send_json({"errors": [{"message": "YAML metadata must be a mapping"}]}, status=400)
                return
        self._send_json({"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._send_json(self.server_hub._repo_info(repo_type, repo_id, revision, self.headers.get("Authorization")))

    def _check_write(self, repo_type: str, repo_id: str) -> None:
        hub = self.server_hub
        hub._check_token(self.headers.get("Authorization"), required=True)
        hub._read_repo(repo_type, repo_id)

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server_hub
        self._check_write(repo_type, repo_id)
        if self._query.get("create_pr") == ["1"]:
            raise HubError(400, "create_pr is not supported by the local hub")
        sha, snap = hub._resolve_revision(repo_type, repo_id, revision)
        out = []
        for f in self._json_body().get("files", []):
            path = _clean_path(f["path"])
            lfs = hub.lfs_threshold is not None and int(f.get("size", 0)) >= hub.lfs_threshold
            existing = snap["files"].get(path)
            oid = None
            if existing is not None:
                oid = existing["sha256"] if existing.get("lfs") else existing["oid"]
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": out, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server_hub
        self._check_write(repo_type, repo_id)
        if self._query.get("create_pr") == ["1"]:
            raise HubError(400, "create_pr is not supported by the local hub")
        header: dict = {}
        ops: list[tuple] = []
        for line in self._read_body().splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as err:
                raise HubError(400, f"Malformed ndjson line: {err}") from err
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                data = base64.b64decode(value["content"])
                ops.append(("add", _clean_path(value["path"]), hub._store_blob(repo_type, repo_id, data), False))
            elif key == "lfsFile":
                oid = value["oid"]
                blob = hub._blob_path(repo_type, repo_id, oid)
                if value.get("algo", "sha256") != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", oid):
                    raise HubError(400, f"Invalid LFS oid {oid!r}")
                if not blob.is_file():
                    raise HubError(422, f"LFS object {oid} was not uploaded for {value['path']}")
                size = blob.stat().st_size
                if "size" in value and int(value["size"]) != size:
                    raise HubError(422, f"LFS object {oid} has size {size}, not {value['size']}")
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()
                entry = {
                    "sha256": oid,
                    "oid": _git_blob_sha1(pointer),
                    "size": size,
                    "lfs": True,
                    "pointerSize": len(pointer),
                }
                ops.append(("add", _clean_path(value["path"]), entry, True))
            elif key == "deletedFile":
                ops.append(("delete_file", _clean_path(value["path"]), None, False))
            elif key == "deletedFolder":
                ops.append(("delete_folder", _clean_path(value["path"].rstrip("/")), None, False))
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        summary = header.get("summary")
        if not summary:
            raise HubError(400, "Missing commit header with a summary")
        sha = hub._commit(
            repo_type,
            repo_id,
            revision,
            ops,
            summary,
            header.get("description") or "",
            header.get("parentCommit"),
            create_branch=False,
        )
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{hub.endpoint}/{prefix}{repo_id}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server_hub
        hub._check_read(repo_type, repo_id, self.headers.get("Authorization"))
        sha, snap = hub._resolve_revision(repo_type, repo_id, revision)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            body = self._json_body()
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = urllib.parse.parse_qs(self._read_body().decode())
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() == "true"
        out = []
        for path in paths:
            path = path.strip("/")
            if path in snap["files"]:
                out.append(hub._file_info(path, snap["files"][path], sha, expand))
            elif any(p.startswith(path + "/") for p in snap["files"]):
                out.append(hub._dir_info(path))
        self._send_json(out)

    def _tree(self, repo_type: str, repo_id: str, revision: str, subpath: str) -> None:
        hub = self.server_hub
        hub._check_read(repo_type, repo_id, self.headers.get("Authorization"))
        sha, snap = hub._resolve_revision(repo_type, repo_id, revision)
        recursive = self._query.get("recursive", ["False"])[0].lower() == "true"
        expand = self._query.get("expand", ["False"])[0].lower() == "true"
        prefix = subpath.strip("/") + "/" if subpath.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in snap["files"]):
            raise HubError(404, f"Entry not found: {subpath}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for path in sorted(snap["files"]):
            if not path.startswith(prefix):
                continue
            rel = PurePosixPath(path[len(prefix) :])
            parents = [prefix + str(p) for p in reversed(rel.parents) if str(p) != "."]
            if recursive:
                for d in parents:
                    entries.setdefault(d, hub._dir_info(d))
                entries[path] = hub._file_info(path, snap["files"][path], sha, expand)
            elif parents:
                entries.setdefault(parents[0], hub._dir_info(parents[0]))
            else:
                entries[path] = hub._file_info(path, snap["files"][path], sha, expand)
        self._send_json(list(entries.values()))

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self.server_hub._check_read(repo_type, repo_id, self.headers.get("Authorization"))
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(repo["refs"].items())]
        self._send_json({"branches": branches, "tags": [], "converts": []})

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server_hub
        hub._check_read(repo_type, repo_id, self.headers.get("Authorization"))
        out = [
            {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "date": c["date"],
                "authors": [{"user": a} for a in c["authors"]],
            }
            for c in hub.commits(repo_id, revision, repo_type)
        ]
        self._send_json(out)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        hub = self.server_hub
        self._check_write(repo_type, repo_id)
        body = self._json_body() if self._read_body() else {}
        with hub._lock:
            repo = hub._read_repo(repo_type, repo_id)
            if branch in repo["refs"]:
                if body.get("exist_ok") or self._query.get("exist_ok") == ["true"]:
                    self._send_json({})
                    return
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            sha, _ = hub._resolve_revision(repo_type, repo_id, body.get("startingPoint") or "main")
            repo["refs"][branch] = sha
            hub._write_json(hub._repo_dir(repo_type, repo_id) / "repo.json", repo)
        self._send_json({})

    # ------------------------------------------------------------------ git-LFS (basic transfer)

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.server_hub
        self._check_write(repo_type, repo_id)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are supported by the local hub")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            out: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not hub._blob_path(repo_type, repo_id, oid).is_file():
                qid = urllib.parse.quote(repo_id)
                out["actions"] = {
                    "upload": {"href": f"{hub.endpoint}/_lfs/{repo_type}s/{qid}/{oid}", "header": {}},
                    "verify": {"href": f"{hub.endpoint}/_lfs-verify/{repo_type}s/{qid}/{oid}", "header": {}},
                }
            objects.append(out)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_upload(self, repo_type: str, repo_id: str, oid: str) -> None:
        hub = self.server_hub
        hub._read_repo(repo_type, repo_id)
        data = self._read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "LFS object content does not match its oid")
        hub._store_blob(repo_type, repo_id, data)
        self._send(200, b"")

    def _lfs_verify(self, repo_type: str, repo_id: str, oid: str) -> None:
        hub = self.server_hub
        self._check_write(repo_type, repo_id)
        if not hub._blob_path(repo_type, repo_id, oid).is_file():
            raise HubError(404, f"LFS object {oid} not found")
        self._send_json({"success": True})

    # ------------------------------------------------------------------ downloads

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.server_hub
        hub._check_read(repo_type, repo_id, self.headers.get("Authorization"))
        sha, snap = hub._resolve_revision(repo_type, repo_id, revision)
        entry = snap["files"].get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry.get("lfs"):
            headers.update(
                {
                    "ETag": f'"{entry["sha256"]}"',
                    "X-Linked-Etag": f'"{entry["sha256"]}"',
                    "X-Linked-Size": str(entry["size"]),
                }
            )
            if hub.lfs_redirect:
                qid = urllib.parse.quote(repo_id)
                name = urllib.parse.quote(PurePosixPath(path).name)
                headers["Location"] = f"{hub.cdn_endpoint}/_cdn/{repo_type}s/{qid}/{entry['sha256']}?filename={name}"
                self._send(302, b"", headers)
                return
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        self._send_blob(hub._blob_path(repo_type, repo_id, entry["sha256"]), headers)

    def _cdn(self, repo_type: str, repo_id: str, sha256: str) -> None:
        blob = self.server_hub._blob_path(repo_type, repo_id, sha256)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not blob.is_file():
            raise HubError(404, "Not found")
        self._send_blob(blob, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"})

    def _send_blob(self, blob: Path, headers: dict[str, str]) -> None:
        size = blob.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not match or (not match.group(1) and not match.group(2)):
                raise HubError(416, "Invalid range", headers={"Content-Range": f"bytes */{size}"})
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self._record.status = status
        self.send_response(status)
        for key, value in {"Content-Type": "application/octet-stream", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        with blob.open("rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(1 << 20, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


# ---------------------------------------------------------------------- client side


@contextlib.contextmanager
def local_hub(root: str | os.PathLike, **kwargs: Any) -> Iterator[HubServer]:
    """Start a :class:`HubServer` storing its repos under ``root``; stop it on exit. ``kwargs`` go to HubServer."""
    server = HubServer(root, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
        _close_hf_session()


def _close_hf_session() -> None:
    with contextlib.suppress(Exception):
        from huggingface_hub.utils import close_session

        close_session()


def fresh_hf_cache(monkeypatch: pytest.MonkeyPatch, cache_dir: str | os.PathLike) -> Path:
    """Point the Hub download cache (``HF_HUB_CACHE``) at a new, empty directory and return it."""
    import huggingface_hub.constants as hf_constants

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def point_hf_at(
    monkeypatch: pytest.MonkeyPatch,
    server: HubServer | str,
    *,
    hf_home: str | os.PathLike,
    token: str | None = TEST_TOKEN,
    disable_xet: bool | None = None,
) -> None:
    """Make ``huggingface_hub``, ``transformers``, ``timm`` (and ``datasets`` if imported) talk to ``server``.

    Everything is done through ``monkeypatch`` and undone at teardown: ``HF_ENDPOINT`` plus the copies of it
    computed at import time (``constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``, the endpoint
    of the module-level ``HfApi`` and of transformers' cached one), offline mode off, ``HF_HOME`` /
    ``HF_HUB_CACHE`` / token file under ``hf_home``, and ``HF_TOKEN`` set to ``token`` (removed when ``None``).
    ``disable_xet`` defaults to ``True`` when the server declares LFS files (the Xet upload protocol is not
    implemented), else leaves ``hf_xet`` alone (regular uploads never touch it).
    """
    import sys
    from urllib.parse import urlsplit

    import huggingface_hub.constants as hf_constants
    import huggingface_hub.hf_api as hf_api_module

    endpoint = server.endpoint if isinstance(server, HubServer) else str(server).rstrip("/")
    home = Path(hf_home)
    home.mkdir(parents=True, exist_ok=True)
    cache = home / "hub"

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")

    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    host = urlsplit(endpoint).hostname
    if host:
        monkeypatch.setattr(hf_constants, "HF_URL_HOSTS", frozenset(hf_constants.HF_URL_HOSTS | {host.lower()}))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    fresh_hf_cache(monkeypatch, cache)
    if hasattr(hf_constants, "HF_XET_CACHE"):
        monkeypatch.setattr(hf_constants, "HF_XET_CACHE", str(home / "xet"))
    if hasattr(hf_constants, "HF_ASSETS_CACHE"):
        monkeypatch.setattr(hf_constants, "HF_ASSETS_CACHE", str(home / "assets"))
    if disable_xet is None:
        disable_xet = isinstance(server, HubServer) and server.lfs_threshold is not None
    if disable_xet:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)

    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)
    git_credential = sys.modules.get("huggingface_hub.utils._git_credential")
    if git_credential is not None and hasattr(git_credential, "ENDPOINT"):
        monkeypatch.setattr(git_credential, "ENDPOINT", endpoint)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # re-created lazily with the patched endpoint
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        monkeypatch.setattr(datasets_config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(
            datasets_config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
        )
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    _close_hf_session()  # drop pooled connections / proxy settings of a previous client


def export_git_mirror(
    server: HubServer, repo_id: str, mirrors_root: str | os.PathLike, *, repo_type: str = "model"
) -> Path:
    """Write ``repo_id`` (its ``main`` head on ``server``) as a plain git repo ``<mirrors_root>/<type>s/<repo_id>``.

    That is the layout olah serves from its ``mirrors-path``. Needs the ``git`` executable; only touches
    ``mirrors_root`` (global/system git config is ignored).
    """
    import subprocess

    target = Path(mirrors_root) / f"{repo_type}s" / repo_id
    target.mkdir(parents=True, exist_ok=False)
    for path, data in server.files(repo_id, repo_type=repo_type).items():
        dest = target.joinpath(*path.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": server.user,
        "GIT_AUTHOR_EMAIL": f"{server.user}@example.invalid",
        "GIT_COMMITTER_NAME": server.user,
        "GIT_COMMITTER_EMAIL": f"{server.user}@example.invalid",
    }
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", f"Mirror of {repo_id}"]):
        subprocess.run(["git", *cmd], cwd=target, env=env, check=True, capture_output=True, timeout=60)
    return target


@contextlib.contextmanager
def olah_mirror(mirrors_root: str | os.PathLike, workdir: str | os.PathLike, *, timeout: float = 30) -> Iterator[str]:
    """Run olah (a real read-only Hub mirror) offline on 127.0.0.1, serving the git repos under ``mirrors_root``.

    Yields its endpoint. olah runs in a subprocess (cwd ``workdir``, where it writes ``logs/`` and ``olah.out``)
    that is terminated on exit. Caveat: olah answers missing files with 401 (not 404 ``EntryNotFound``), which
    huggingface_hub turns into ``RepositoryNotFoundError``; so loaders that probe optional files (e.g.
    ``AutoImageProcessor`` probing ``processor_config.json``, hence ``pipeline()``) fail through it, while
    ``from_pretrained`` of models and ``timm.create_model("hf-hub:...")`` work.
    """
    import socket
    import subprocess
    import sys

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = work / "olah.toml"
    config.write_text(
        "[basic]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f"repos-path = {json.dumps(str(work / 'olah-repos'))}\n"
        f"mirrors-path = [{json.dumps(str(Path(mirrors_root)))}]\n"
        "[accessibility]\n"
        "offline = true\n"
    )
    log = (work / "olah.out").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "olah.server", "--config", str(config)], cwd=work, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"olah exited with {proc.returncode}: {(work / 'olah.out').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"olah did not listen on port {port} within {timeout}s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        _close_hf_session()


class _NoSleepTime(types.ModuleType):
    """Stand-in for the ``time`` module whose ``sleep`` returns at once (everything else is the real module)."""

    def __init__(self) -> None:
        super().__init__("time")
        self.sleeps: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make ``huggingface_hub``'s HTTP back-off retry immediately; returns the list of skipped sleeps."""
    import huggingface_hub.utils._http as hf_http

    fake = _NoSleepTime()
    monkeypatch.setattr(hf_http, "time", fake)
    return fake.sleeps


@pytest.fixture
def hub(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running :class:`HubServer` (repos in ``tmp_path/"hub"``) that huggingface_hub / transformers / timm use.

    ``HF_TOKEN`` is :data:`TEST_TOKEN`, ``HF_HOME`` is ``tmp_path/"hf_home"`` (download cache in its ``hub``
    folder); all patches are undone at teardown. Extra ``HubServer`` arguments can be given with indirect
    parametrization, e.g. ``@pytest.mark.parametrize("hub", [{"lfs_threshold": 1024}], indirect=True)``.
    """
    options = {"token": TEST_TOKEN, **getattr(request, "param", {})}
    with local_hub(tmp_path / "hub", **options) as server:
        point_hf_at(monkeypatch, server, hf_home=tmp_path / "hf_home", token=TEST_TOKEN)
        yield server
