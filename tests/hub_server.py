"""A tiny stand-in for the Hugging Face Hub, on 127.0.0.1, for tests that must not touch the network.

It serves in-memory repos the way huggingface.co does for the endpoints huggingface_hub (2.x, and the
0.2x releases) calls when resolving and downloading files, so that huggingface_hub itself writes the
cache (snapshots/ of links into blobs/, refs/, trees/) exactly as it does for real downloads:

    GET  /api/models/{repo}                          model info at main: sha, siblings (blobs=true: sizes, lfs)
    GET  /api/models/{repo}/revision/{rev}           model info at a branch, tag or commit
    GET  /api/models/{repo}/tree/{rev}[/{path}]      tree listing (recursive=true/false), one page
    POST /api/models/{repo}/paths-info/{rev}         paths info (form field `paths`, repeated)
    HEAD /{repo}/resolve/{rev}/{path}                file metadata: X-Repo-Commit, ETag, Content-Length
                                                     (LFS files: X-Linked-Etag = sha256, X-Linked-Size)
    GET  /{repo}/resolve/{rev}/{path}                the bytes; `Range: bytes=a-b` answers 206

Errors carry the headers `hf_raise_for_status` reads: 404 + `X-Error-Code: RepoNotFound` /
`RevisionNotFound` / `EntryNotFound` (with `X-Repo-Commit`), 401 + `RepoNotFound` for a private repo
and 401 + `GatedRepo` for a gated repo's files, both unless `Authorization: Bearer <token>` matches.
No redirects and no Xet headers: huggingface_hub then downloads over plain HTTP from the resolve URL.

Every request is recorded (method, decoded path, status) so tests can assert what was fetched; setting
`down = 503` makes every request fail as when the Hub is down.
The server runs in a daemon thread, answers each connection with a socket timeout, and shuts itself
down after `max_seconds` even if nobody calls `stop()`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".model")
LFS_MIN_SIZE = 10 << 20  # like a repo's .gitattributes: big files go to LFS whatever their name
DATE = "2024-05-01T12:00:00.000Z"


@dataclass(frozen=True)
class HubFile:
    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def oid(self) -> str:
        """The git blob id (sha1 of 'blob <size>\\0' + content), the ETag of a non-LFS file."""
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class HubRepo:
    """A model repo: commits (sha -> {path: file}) and refs (branch or tag -> sha)."""

    repo_id: str
    private: bool = False
    gated: bool = False
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes] | str | Path, refs: tuple[str, ...] = ("main",)) -> str:
        """Add a commit holding `files` (a mapping, or every file under a folder) and point `refs` at it."""
        if not isinstance(files, dict):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", **files}
        tree = {path: HubFile(data, path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE) for path, data in files.items()}
        digest = hashlib.sha1(self.repo_id.encode() + b"%d" % len(self.commits))
        for path in sorted(tree):
            digest.update(path.encode() + b"\0" + tree[path].oid.encode())
        sha = digest.hexdigest()
        self.commits[sha] = tree
        for ref in refs:
            self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class HubServer:
    """`with HubServer([repo, ...]) as hub:` ... `hub.url` is the HF_ENDPOINT to use."""

    def __init__(self, repos, *, token: str = "hf_lorafuse_test_token", max_seconds: float = 300):
        self.repos = {r.repo_id: r for r in repos}
        self.token = token
        self.max_seconds = max_seconds
        self.down: int | None = None  # set to e.g. 503: every request gets that status, as when the Hub is down
        self.log: list[tuple[str, str, int]] = []  # (method, decoded path, status)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self.max_seconds, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what was asked ----------------------------------------------------------------------------
    def record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def reset(self) -> None:
        with self._lock:
            self.log.clear()

    def requests(self, method: str | None = None) -> list[tuple[str, str, int]]:
        with self._lock:
            return [r for r in self.log if method is None or r[0] == method]

    def file_requests(self, method: str = "GET", repo_id: str | None = None) -> Counter:
        """Count of `method` requests to /{repo}/resolve/{rev}/{file}, by file path."""
        counts: Counter = Counter()
        for m, path, _ in self.requests(method):
            found = _RESOLVE.match(path)
            if found and (repo_id is None or found["repo"] == repo_id):
                counts[found["file"]] += 1
        return counts


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a connection may sit idle: a stuck client cannot hold a thread for ever
    server_version = "lorafuse-test-hub"

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- dispatch --------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]  # decode each segment: a revision may hold %2F
        self.query = parse_qs(split.query)
        self.decoded = "/" + "/".join(parts)
        self.status = 0
        self.body = b""
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length)
        try:
            if self.hub.down:
                self._error(self.hub.down, None, "Service Unavailable")
            elif parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(method, parts[2] + "/" + parts[3], parts[4:])
            elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                self._resolve(method, parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]))
            else:
                self._send(404, b"Not Found", {"Content-Type": "text/plain"})
        finally:
            self.hub.record(method, self.decoded, self.status)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.status = status
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str | None, message: str, head: bool = False, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _repo(self, repo_id: str, head: bool = False) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        if repo.private and not self._authorized():
            self._error(401, "RepoNotFound", "Invalid username or password.", head)
            return None
        return repo

    def _commit(self, repo: HubRepo, revision: str, head: bool = False) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return sha

    # -- /api/models/... --------------------------------------------------------------------------
    def _api(self, method: str, repo_id: str, rest: list[str]) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if method == "GET" and not rest:
            return self._model_info(repo, "main")
        if method == "GET" and len(rest) >= 2 and rest[0] == "revision":
            return self._model_info(repo, "/".join(rest[1:]))
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            return self._tree(repo, rest[1], "/".join(rest[2:]))
        if method == "POST" and len(rest) >= 2 and rest[0] == "paths-info":
            return self._paths_info(repo, "/".join(rest[1:]))
        self._send(404, b"Not Found", {"Content-Type": "text/plain"})

    def _model_info(self, repo: HubRepo, revision: str) -> None:
        sha = self._commit(repo, revision)
        if sha is None:
            return
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, f in sorted(repo.commits[sha].items()):
            entry: dict = {"rfilename": path}
            if blobs:
                entry.update(size=f.size, blobId=f.oid)
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(entry)
        org, _, name = repo.repo_id.partition("/")
        self._json({
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": org, "sha": sha, "lastModified": DATE, "createdAt": DATE, "private": repo.private,
            "gated": "auto" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": ["transformers", "safetensors"], "library_name": "transformers", "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.commits[sha].values()),
        })

    def _entry(self, path: str, f: HubFile) -> dict:
        entry = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        return entry

    def _folders(self, files: dict[str, HubFile]) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def _folder_entry(self, path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    def _tree(self, repo: HubRepo, revision: str, under: str) -> None:
        sha = self._commit(repo, revision)
        if sha is None:
            return
        files = repo.commits[sha]
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = under.rstrip("/") + "/" if under else ""
        folders = self._folders(files)
        if under and under.rstrip("/") not in folders:
            return self._error(404, "EntryNotFound", f"{under} does not exist on {revision}", extra={"X-Repo-Commit": sha})
        entries = []
        for path in sorted(folders | set(files)):
            if not path.startswith(prefix):
                continue
            if not recursive and "/" in path[len(prefix):]:
                continue
            entries.append(self._entry(path, files[path]) if path in files else self._folder_entry(path))
        self._json(entries)

    def _paths_info(self, repo: HubRepo, revision: str) -> None:
        sha = self._commit(repo, revision)
        if sha is None:
            return
        form = parse_qs(self.body.decode())
        paths = form.get("paths", [])
        if len(paths) == 1 and paths[0].startswith("["):  # some clients send a JSON list
            paths = json.loads(paths[0])
        files = repo.commits[sha]
        folders = self._folders(files)
        out = [self._entry(p, files[p]) if p in files else self._folder_entry(p) for p in paths if p in files or p in folders]
        self._json(out)

    # -- /{repo}/resolve/{rev}/{path} -------------------------------------------------------------
    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        head = method == "HEAD"
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        sha = self._commit(repo, revision, head)
        if sha is None:
            return
        if repo.gated and not self._authorized():
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                               "and be authenticated to access it. Please log in.", head)
        f = repo.commits[sha].get(path)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", head, {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers.update({"ETag": f'"{f.sha256}"', "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        else:
            headers["ETag"] = f'"{f.oid}"'
        body = f.data
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            found = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if not found or (not found[1] and not found[2]):
                return self._error(416, None, f"bad range {wanted}", head, {"Content-Range": f"bytes */{f.size}"})
            if found[1]:
                start = int(found[1])
                end = min(int(found[2]), f.size - 1) if found[2] else f.size - 1
            else:  # suffix range: the last N bytes
                start, end = max(f.size - int(found[2]), 0), f.size - 1
            if start >= f.size or start > end:
                return self._error(416, None, f"range {wanted} outside 0-{f.size - 1}", head,
                                   {"Content-Range": f"bytes */{f.size}"})
            body = f.data[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        self._send(status, body, headers, head=head)
