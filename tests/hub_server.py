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

For pushing (what `HfApi.create_repo`, `create_branch`, `preupload_lfs_files` and `create_commit` send,
with hf_xet disabled so that LFS goes over plain HTTP), every write needing the token:

    POST /api/repos/create                           create a repo (409 if it exists); first commit: .gitattributes
    POST /api/models/{repo}/branch/{branch}          create a branch at `startingPoint` (default main); 409 if it exists
    POST /api/models/{repo}/preupload/{rev}          upload mode per file (lfs/regular) and the oid the Hub has there
    POST /{repo}.git/info/lfs/objects/batch          LFS batch: an upload (+ verify) action pointing at this server
                                                     for each object the server lacks, no action for the others
    PUT  /lfs-upload/{oid}                           the object's bytes (checked against oid and size)
    POST /lfs-verify/{oid}                           200 if stored, 404 otherwise
    POST /api/validate-yaml                          README metadata check: always fine
    POST /api/models/{repo}/commit/{rev}             NDJSON: header, then file/lfsFile/deletedFile lines; applied
                                                     atomically as one new commit (files visible only after it)

`lfs` holds the uploaded objects (sha256 -> bytes), `uploads` the oids PUT in order, `pushes` each commit made
through the API (repo, revision, sha, paths), so tests can assert exactly what was sent.

Errors carry the headers `hf_raise_for_status` reads: 404 + `X-Error-Code: RepoNotFound` /
`RevisionNotFound` / `EntryNotFound` (with `X-Repo-Commit`), 401 + `RepoNotFound` for a private repo
and 401 + `GatedRepo` for a gated repo's files, both unless `Authorization: Bearer <token>` matches.
No redirects and no Xet headers: huggingface_hub then downloads over plain HTTP from the resolve URL.

Every request is recorded (method, decoded path, status) so tests can assert what was fetched; setting
`down = 503` makes every request fail as when the Hub is down, `refuse_commits = 400` only the commits.
The server runs in a daemon thread, answers each connection with a socket timeout, and shuts itself
down after `max_seconds` even if nobody calls `stop()`.
"""

from __future__ import annotations

import base64
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

    def add_tree(self, tree: dict[str, HubFile], refs: tuple[str, ...]) -> str:
        """Add a commit holding exactly `tree` and point `refs` at it."""
        digest = hashlib.sha1(self.repo_id.encode() + b"%d" % len(self.commits))
        for path in sorted(tree):
            digest.update(path.encode() + b"\0" + tree[path].oid.encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(tree)
        for ref in refs:
            self.refs[ref] = sha
        return sha

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """The files at `revision`, as bytes."""
        return {path: f.data for path, f in self.commits[self.refs.get(revision, revision)].items()}

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
        self.refuse_commits: int | None = None  # set to e.g. 400: every commit gets that status, uploads succeed
        self.log: list[tuple[str, str, int]] = []  # (method, decoded path, status)
        self.lfs: dict[str, bytes] = {}  # LFS objects pushed to this server, by sha256
        self.uploads: list[str] = []  # sha256 of each object PUT, in order
        self.pushes: list[tuple[str, str, str, tuple[str, ...]]] = []  # (repo, revision, new sha, paths) per commit
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


def use_in_process(server: "HubServer", monkeypatch) -> None:
    """Point this process's huggingface_hub at `server`. It reads HF_ENDPOINT and friends into `constants`
    at import, so the constants are patched; Xet is off so that uploads speak the LFS protocol served here."""
    from huggingface_hub import constants

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session runs offline
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)


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

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]  # decode each segment: a revision may hold %2F
        self.query = parse_qs(split.query)
        self.decoded = "/" + "/".join(parts)
        self.status = 0
        self.body = b""
        if method in ("POST", "PUT"):
            self.body = self._read_body()
        try:
            if self.hub.down:
                self._error(self.hub.down, None, "Service Unavailable")
            elif method == "POST" and parts == ["api", "repos", "create"]:
                self._create_repo()
            elif method == "POST" and parts == ["api", "validate-yaml"]:
                self._json({"warnings": []})  # README.md metadata: accepted as is
            elif method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == [
                    "info", "lfs", "objects", "batch"]:
                self._lfs_batch(parts[0] + "/" + parts[1][:-4])
            elif method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
                self._lfs_put(parts[1])
            elif method == "POST" and len(parts) == 2 and parts[0] == "lfs-verify":
                self._lfs_verify(parts[1])
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
        if method == "POST" and len(rest) >= 2 and rest[0] in ("branch", "preupload", "commit"):
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            if rest[0] == "branch":
                return self._create_branch(repo, "/".join(rest[1:]))
            if rest[0] == "preupload":
                return self._preupload(repo, "/".join(rest[1:]))
            if self.hub.refuse_commits:
                return self._error(self.hub.refuse_commits, None, "Bad Request")
            return self._push_commit(repo, "/".join(rest[1:]))
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

    # -- pushing ------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        payload = json.loads(self.body or b"{}")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # as the Hub: the 409 body still carries the url, which create_repo(exist_ok=True) returns
                return self._send(409, json.dumps({"error": "You already created this model repo", "url":
                                                   f"{self.hub.url}/{repo_id}"}).encode(),
                                  {"Content-Type": "application/json", "X-Error-Message": "You already created this model repo"})
            repo = HubRepo(repo_id, private=payload.get("visibility") == "private")
            repo.commit({})
            self.hub.repos[repo_id] = repo
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _create_branch(self, repo: HubRepo, branch: str) -> None:
        payload = json.loads(self.body or b"{}")
        with self.hub._lock:
            if branch in repo.refs:
                return self._error(409, None, f"Reference refs/heads/{branch} already exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {payload.get('startingPoint')}")
            repo.refs[branch] = start
        self._json({})

    def _lfs_mode(self, path: str, size: int) -> bool:
        return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE

    def _preupload(self, repo: HubRepo, revision: str) -> None:
        sha = self._commit(repo, revision)
        if sha is None:
            return
        tree = repo.commits[sha]
        files = []
        for f in json.loads(self.body)["files"]:
            lfs = self._lfs_mode(f["path"], f["size"])
            have = tree.get(f["path"])
            oid = None if have is None else (have.sha256 if have.lfs else have.oid)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": files, "commitOid": sha})

    def _lfs_batch(self, repo_id: str) -> None:
        if self.hub.repos.get(repo_id) is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        payload = json.loads(self.body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            have = self.hub.lfs.get(obj["oid"])
            if have is None or len(have) != obj["size"]:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{obj['oid']}", "header": {}},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            return self._error(400, None, f"content does not match oid {oid}")
        with self.hub._lock:
            self.hub.lfs[oid] = self.body
            self.hub.uploads.append(oid)
        self._send(200)

    def _lfs_verify(self, oid: str) -> None:
        payload = json.loads(self.body or b"{}")
        have = self.hub.lfs.get(oid)
        if have is None or len(have) != payload.get("size"):
            return self._error(404, None, f"object {oid} not uploaded")
        self._json({})

    def _push_commit(self, repo: HubRepo, revision: str) -> None:
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, None, "the first line must be the header")
        header = lines[0]["value"]
        with self.hub._lock:  # the whole commit or nothing: readers see the old tree until the ref moves
            sha = self._commit(repo, revision)
            if sha is None:
                return
            if header.get("parentCommit") not in (None, sha):
                return self._error(412, None, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[sha])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    tree[value["path"]] = HubFile(data, False)
                elif key == "lfsFile":
                    data = self.hub.lfs.get(value["oid"])
                    if data is None or ("size" in value and len(data) != value["size"]):
                        return self._error(422, None, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    tree[value["path"]] = HubFile(data, True)
                elif key == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        return self._error(404, "EntryNotFound", "A file with this name doesn't exist")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    tree = {p: f for p, f in tree.items() if not p.startswith(prefix)}
                else:
                    return self._error(400, None, f"unknown operation {key}")
            new = repo.add_tree(tree, refs=(revision,) if revision in repo.refs else ())
            self.hub.pushes.append((repo.repo_id, revision, new, tuple(line["value"]["path"] for line in lines[1:])))
        self._json({"success": True, "commitOid": new, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{new}",
                    "pullRequestUrl": None})
